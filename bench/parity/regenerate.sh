#!/usr/bin/env bash
# Regenerate the golden fixtures of the official code (PARITY.md), in one command:
#
#   bash bench/parity/regenerate.sh --pai /work/official/PAI [--paint /work/official/PAINT] [--pm /work/official/PM]
#        [--official-venv /work/venvs/official] [--python /work/venvs/fresh/bin/python]
#
# 1. builds the LLaVA-1.5-shaped tiny model in both layouts (tiny_llava15.py, our venv);
# 2. creates the official stack's venv if missing (official_env.sh);
# 3. per technique: runs the official code unmodified (with cpu_shim.py) in that venv and writes
#    tests/fixtures/official/<technique>/, then compares our preset=official with it in our venv
#    and writes provenance.json (with max abs diffs over the full vocabulary).
# Checkouts: a git clone at the commit, or an exported tree (`git -C <mirror> archive HEAD | tar -x -C
# /work/official/PAI`) with PAI_COMMIT=<full hash> in the environment (recorded in provenance.json).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LOCHEAD_NUMPY=${LOCHEAD_NUMPY:-2.2.6} LOCHEAD_SCIPY=${LOCHEAD_SCIPY:-1.15.3} LOCHEAD_VENV=${LOCHEAD_VENV:-}
PAI="" PAINT="" PM="" LOCHEAD="" VLMINTERP="" VIRAL="" REGIMES="" OFFICIAL_VENV=/work/venvs/official OURS=${PYTHON:-python}
while [ $# -gt 0 ]; do
  case "$1" in
    --pai) PAI=$2; shift 2 ;;
    --paint) PAINT=$2; shift 2 ;;
    --pm) PM=$2; shift 2 ;;
    --vlminterp) VLMINTERP=$2; shift 2 ;;  # vlm-interp @ 8f38051 (modified_llava_files/, mllm/); its LLaVA fork from VLMINTERP_LLAVA=DIR
    --lochead) LOCHEAD=$2; shift 2 ;;  # HEAD_CHECKOUT:V2_CHECKOUT (8ce33b0 and 9ffe219); LLaVA-1.5's llava/ from LOCHEAD_LLAVA=DIR or --pai
    --viral) VIRAL=$2; shift 2 ;;  # VIRAL_CHECKOUT:DINOV2_CHECKOUT (cvlab-kaist/VIRAL @ adc0791, facebookresearch/dinov2; DINOV2_COMMIT=<hash> for an exported tree)
    --regimes) REGIMES=$2; shift 2 ;;  # PM_CHECKOUT:HEAD_CHECKOUT:V2_CHECKOUT (58c2c0f, 8ce33b0, 9ffe219): the official analyses on planted attention
    --lochead-numpy) LOCHEAD_NUMPY=$2; shift 2 ;;  # numpy of the lochead analysis venv (default 2.2.6, 8ce33b0's pin; scipy: LOCHEAD_SCIPY)
    --lochead-venv) LOCHEAD_VENV=$2; shift 2 ;;  # that venv (default OFFICIAL_VENV-numpyVER, built by official_env.sh if missing)
    --official-venv) OFFICIAL_VENV=$2; shift 2 ;;
    --python) OURS=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
[ -x "$OFFICIAL_VENV/bin/python" ] || bash "$HERE/official_env.sh" "$OFFICIAL_VENV"
"$OURS" "$HERE/tiny_llava15.py" "$WORK/model"

if [ -n "$PAI" ]; then
  "$OFFICIAL_VENV/bin/python" "$HERE/pai_official.py" --pai "$PAI" --model "$WORK/model" \
    --out "$REPO/tests/fixtures/official/pai" --scratch "$WORK/scratch"
  "$OURS" "$HERE/pai_compare.py" --fixtures "$REPO/tests/fixtures/official/pai" --model "$WORK/model" \
    --scratch "$WORK/scratch" --pai "$PAI" --official-python "$OFFICIAL_VENV/bin/python"
fi

if [ -n "$PAINT" ]; then
  # hook for PAINT: paint_regenerate.sh CHECKOUT MODEL_DIR OFFICIAL_VENV OURS_PYTHON WORK_DIR
  bash "$HERE/paint_regenerate.sh" "$PAINT" "$WORK/model" "$OFFICIAL_VENV" "$OURS" "$WORK"
fi

if [ -n "$PM" ]; then
  # PM: attention_resampler.py imports scipy (not in official_env.sh); PM_COMMIT=<full hash> for an exported tree
  "$OFFICIAL_VENV/bin/python" -c "import scipy" 2>/dev/null || "$OFFICIAL_VENV/bin/pip" install -q "scipy<1.14"
  "$OFFICIAL_VENV/bin/python" "$HERE/pm_official.py" --official "$PM" --model "$WORK/model" --out "$REPO/tests/fixtures/official/pm"
  "$OURS" -m pytest -q "$REPO/tests/test_parity_pm.py" "$REPO/tests/test_parity_pm_first_token.py"
fi

if [ -n "$LOCHEAD" ]; then
  # localization heads: LLaVA-1.5's forward (PAI's bundled llava/) in the official venv, then both official
  # analyses in a venv with the numpy and scipy of 8ce33b0's dependency_pip.txt (2.2.6, 1.15.3): under
  # numpy >= 2 (NEP 50) its entropies are float32, under 1.x float64 (docs/lochead.md)
  LH_VENV=${LOCHEAD_VENV:-$OFFICIAL_VENV-numpy$LOCHEAD_NUMPY}
  [ -x "$LH_VENV/bin/python" ] || NUMPY=$LOCHEAD_NUMPY SCIPY=$LOCHEAD_SCIPY bash "$HERE/official_env.sh" "$LH_VENV"
  "$LH_VENV/bin/python" -c "import yaml" 2>/dev/null || "$LH_VENV/bin/pip" install -q pyyaml
  LH_HAVE=$("$LH_VENV/bin/python" -c "import numpy, scipy; print(numpy.__version__, scipy.__version__)")
  if [ "$LH_HAVE" != "$LOCHEAD_NUMPY $LOCHEAD_SCIPY" ]; then
    echo "$LH_VENV has numpy/scipy $LH_HAVE, not $LOCHEAD_NUMPY $LOCHEAD_SCIPY (--lochead-numpy, LOCHEAD_SCIPY)" >&2
    exit 1
  fi
  "$OFFICIAL_VENV/bin/python" "$HERE/lochead_official.py" collect --llava "${LOCHEAD_LLAVA:-${PAI:?--lochead needs the LLaVA-1.5 llava package: --pai DIR or LOCHEAD_LLAVA=DIR}}" --model "$WORK/model" --scratch "$WORK/lochead"
  "$LH_VENV/bin/python" "$HERE/lochead_official.py" analyze --head "${LOCHEAD%%:*}" --v2 "${LOCHEAD##*:}" \
    --scratch "$WORK/lochead" --out "$REPO/tests/fixtures/official/lochead"
  "$OURS" "$HERE/lochead_compare.py" --scratch "$WORK/lochead" --model "$WORK/model" --fixtures "$REPO/tests/fixtures/official/lochead"
  "$OURS" -m pytest -q "$REPO/tests/test_parity_lochead.py"
fi

if [ -n "$VLMINTERP" ]; then
  # knockout, pruning, FastV, compressed context (OmriKaduri/vlm-interp @ 8f38051) run unmodified: its patched
  # transformers files over a scratch copy of 4.37.2, the LLaVA fork (OmriKaduri/LLaVA @ 9a20030) over llava-torch
  "$OFFICIAL_VENV/bin/python" -c "import llava" 2>/dev/null || "$OFFICIAL_VENV/bin/pip" install -q --no-deps llava-torch==1.2.2.post1
  "$OFFICIAL_VENV/bin/python" "$HERE/vlminterp_official.py" --official "$VLMINTERP" \
    --llava-fork "${VLMINTERP_LLAVA:?--vlminterp needs the LLaVA fork: VLMINTERP_LLAVA=DIR holding llava/model/...}" \
    --model "$WORK/model" --out "$REPO/tests/fixtures/official" --scratch "$WORK/vlminterp"
  "$OURS" "$HERE/vlminterp_compare.py" --fixtures "$REPO/tests/fixtures/official/knockout" --scratch "$WORK/vlminterp" --official-python "$OFFICIAL_VENV/bin/python"
  "$OURS" "$HERE/vlminterp_compare.py" --prune --fixtures "$REPO/tests/fixtures/official/reprompt" --scratch "$WORK/vlminterp" --official-python "$OFFICIAL_VENV/bin/python"
fi

if [ -n "$VIRAL" ]; then
  # VIRAL (cvlab-kaist/VIRAL @ adc0791): its own llava/ package (not llava-torch), timm for the position table, peft
  "$OFFICIAL_VENV/bin/python" -c "import timm, peft" 2>/dev/null || { "$OFFICIAL_VENV/bin/pip" install -q timm; "$OFFICIAL_VENV/bin/pip" install -q --no-deps "peft==0.10.0"; }
  "$OFFICIAL_VENV/bin/python" "$HERE/viral_official.py" --viral "${VIRAL%%:*}" --dinov2 "${VIRAL##*:}" --model "$WORK/model" \
    --out "$REPO/tests/fixtures/official/viral" --scratch "$WORK/viral"
  # the data path (--version v1 ids and labels on a tiny Llama-style tokenizer) and the preset's official values
  "$OFFICIAL_VENV/bin/python" "$HERE/viral_data_official.py" --viral "${VIRAL%%:*}" --dinov2 "${VIRAL##*:}" \
    --out "$REPO/tests/fixtures/official/viral" --scratch "$WORK/viral_data"
  # the training loop: LLaVATrainer.train() for 4 optimizer steps (about 1 CPU-minute)
  "$OFFICIAL_VENV/bin/python" "$HERE/viral_loop_official.py" --viral "${VIRAL%%:*}" --dinov2 "${VIRAL##*:}" --model "$WORK/model" \
    --out "$REPO/tests/fixtures/official/viral" --scratch "$WORK/viral_loop"
  "$OURS" -m pytest -q "$REPO/tests/test_parity_viral.py" "$REPO/tests/test_parity_viral_data.py" "$REPO/tests/test_parity_viral_loop.py"
fi

if [ -n "$REGIMES" ]; then
  # non-degenerate regimes (planted attention, regimes.py): the official lochead analyses and PM's search loop
  "$OFFICIAL_VENV/bin/python" -c "import scipy, yaml" 2>/dev/null || "$OFFICIAL_VENV/bin/pip" install -q "scipy<1.14" pyyaml
  IFS=: read -r R_PM R_HEAD R_V2 <<< "$REGIMES"
  # PM's half in the official venv (numpy 1.x), the lochead half with 8ce33b0's numpy/scipy (as --lochead)
  "$OFFICIAL_VENV/bin/python" "$HERE/regimes_official.py" --part pm --pm "$R_PM" \
    --out "$REPO/tests/fixtures/official/regimes" --scratch "$WORK/regimes"
  RLH_VENV=${LOCHEAD_VENV:-$OFFICIAL_VENV-numpy$LOCHEAD_NUMPY}
  [ -x "$RLH_VENV/bin/python" ] || NUMPY=$LOCHEAD_NUMPY SCIPY=$LOCHEAD_SCIPY bash "$HERE/official_env.sh" "$RLH_VENV"
  "$RLH_VENV/bin/python" -c "import yaml" 2>/dev/null || "$RLH_VENV/bin/pip" install -q pyyaml
  "$RLH_VENV/bin/python" "$HERE/regimes_official.py" --part lochead --head "$R_HEAD" --v2 "$R_V2" \
    --out "$REPO/tests/fixtures/official/regimes" --scratch "$WORK/regimes"
  "$OURS" -m pytest -q "$REPO/tests/test_parity_regimes.py"
fi
