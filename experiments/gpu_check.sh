#!/usr/bin/env bash
# The GPU check of issue 5, for one lent NVIDIA machine (H100/H200; Python 3.12 with its own jax,
# flax, optax, torch; no network, no tfds/grain/ml-collections). From the repository root:
#
#   bash experiments/gpu_check.sh            # about 6-8 minutes; JSON lines on stdout
#   bash experiments/gpu_check.sh --quick --attention einsum   # tiny sizes: a CPU smoke run
#
# Missing pure-Python packages travel as wheels in .gpu_wheels/ (gitignored). Fill it here, where
# PyPI is reachable, before copying the tree over:
#
#   pip download --no-deps ml-collections==1.1.0 -d .gpu_wheels
#
# (ml-collections needs absl-py and PyYAML, which that machine has.) Every other flag is
# experiments/gpu_check.py's (--batches, --attention, --remat, --seq-len, --budget, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if compgen -G ".gpu_wheels/*.whl" > /dev/null; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .gpu_wheels/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import ml_collections" 2>/dev/null || {
  echo "gpu_check: ml_collections is missing: run 'pip download --no-deps ml-collections==1.1.0 -d .gpu_wheels' where PyPI is reachable and carry .gpu_wheels" >&2
  exit 2
}
export PYTHONUNBUFFERED=1
# A rerun on the same (still warm) machine skips the XLA compiles.
export GPU_CHECK_COMPILATION_CACHE=${GPU_CHECK_COMPILATION_CACHE:-/tmp/amd135m_gpu_check_jax_cache}
# Children run one at a time: let each preallocate most of the GPU, not JAX's default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec "$PYTHON" experiments/gpu_check.py "$@"
