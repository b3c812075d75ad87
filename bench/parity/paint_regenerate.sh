#!/usr/bin/env bash
# PAINT step of regenerate.sh: golden fixtures from hasanar1f/PAINT, then our parity tests on them.
#   bash bench/parity/paint_regenerate.sh CHECKOUT MODEL_DIR OFFICIAL_VENV OURS_PYTHON WORK_DIR
# CHECKOUT: a git clone of hasanar1f/PAINT at 2a9e8f8, or an exported tree with PAINT_COMMIT=<full hash>.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CHECKOUT=$1 MODEL=$2 OFFICIAL_VENV=$3 OURS=$4 WORK=$5
"$OFFICIAL_VENV/bin/python" "$HERE/paint_official.py" --official "$CHECKOUT" --model "$MODEL" \
  --out "$REPO/tests/fixtures/official/paint"
(cd "$REPO" && "$OURS" -m pytest -q -p no:cacheprovider tests/test_parity_paint.py)
