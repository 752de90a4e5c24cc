# Sourced by the other scripts: a project virtual environment with everything installed.
# CPU machines get torch==2.13.0 (a CPU build); with a CUDA torch already in the active
# environment, set PMI_USE_SYSTEM_TORCH=1 to build the venv on top of it instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    if [ "${PMI_USE_SYSTEM_TORCH:-0}" = 1 ]; then
        python3 -m venv --system-site-packages .venv
    else
        python3 -m venv .venv
        .venv/bin/pip install -q torch==2.13.0
    fi
fi
.venv/bin/pip install -q -e ".[dev]"
export PATH="$PWD/.venv/bin:$PATH"
# The C++ (and, with a CUDA torch and nvcc, CUDA) kernels, built now into their cache rather
# than at the first call; a failed build is reported, and the library falls back without them.
python -m pmi_kernels.backends.native.build || echo "(the library runs without them: backend 'auto' falls back)"
