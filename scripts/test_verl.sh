#!/usr/bin/env bash
# The verl integration's tests (tests/test_integrations_verl.py), in their own environment
# (.venv-verl): verl 0.9 pins transformers<5.11, the main environment has a newer one. On this
# CPU machine torch==2.13.0 (+cpu) goes first, then triton (the tests' conftest imports the
# Triton kernels, run by its interpreter); verl's base wheel adds no CUDA wheels (ray, pandas,
# pyarrow, wandb, tensorboard, hydra, tensordict, ...). Measured on the 2-core CI machine: docs/verl.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-verl/bin/python ]; then
    python3 -m venv .venv-verl
    .venv-verl/bin/pip install -q torch==2.13.0 triton==3.9.0
fi
# A pure-Python install here, as in scripts/test_vllm.sh: the kernels scripts/env.sh compiled into the
# checkout (pmi_kernels/_C) are loaded under this venv's torch too; otherwise they build on first use.
PMI_KERNELS_BUILD_NATIVE=0 .venv-verl/bin/pip install -q -e ".[verl]" pytest
.venv-verl/bin/python -c "import verl"  # here the verl tests must run, not skip
.venv-verl/bin/python -m pytest tests/test_integrations_verl.py "$@"
