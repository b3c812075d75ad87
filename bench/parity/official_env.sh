#!/usr/bin/env bash
# Create the official stack's virtual environment (CPU, fp32) for the parity harness.
#   bash bench/parity/official_env.sh /work/venvs/official
# The versions are the ones LLaVA-1.5 (and PAI / PAINT, which bundle its `llava/` package)
# were written against; torch is the project's own (a CPU build), which transformers 4.37
# runs unchanged for these models. PAI and PAINT ship their own `llava/` package: the
# harness puts the checkout on PYTHONPATH instead of installing llava-torch.
# NUMPY=2.2.6 SCIPY=1.15.3 pins numpy (default numpy<2, as LLaVA-1.5's stack) and installs scipy:
# regenerate.sh --lochead builds its analysis venv this way with the numpy 8ce33b0 pins.
set -euo pipefail
VENV=${1:?usage: official_env.sh VENV_DIR}
TORCH=${TORCH_VERSION:-2.14.1}
NUMPY_SPEC=${NUMPY:+numpy==$NUMPY}
SCIPY_SPEC=${SCIPY:+scipy==$SCIPY}
if [ ! -x "$VENV/bin/python" ]; then
  python3.11 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$TORCH" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
"$VENV/bin/pip" install -q \
  "transformers==4.37.2" "tokenizers==0.15.2" "accelerate==0.21.0" "${NUMPY_SPEC:-numpy<2}" ${SCIPY_SPEC:+"$SCIPY_SPEC"} \
  sentencepiece einops shortuuid safetensors protobuf pyyaml pillow timm
# PAI's bundled llava/ imports peft at import time (its InternVL encoder); peft's own
# dependencies would upgrade transformers/accelerate, so install it alone.
"$VENV/bin/pip" install -q "peft==0.10.0" --no-deps
"$VENV/bin/python" -c "import numpy, torch, transformers; print('official stack:', torch.__version__, transformers.__version__, 'numpy', numpy.__version__)"
