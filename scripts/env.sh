# Sourced by the other scripts: a project virtual environment with everything installed.
# CPU machines get torch==2.13.0 (a CPU build); with a CUDA torch already in the active
# environment, set PMI_USE_SYSTEM_TORCH=1 to build the venv on top of it instead.
# pmi_kernels is installed editable with its C++ kernels (and, with a CUDA torch and nvcc, its CUDA
# kernels) compiled now, against the venv's torch (--no-build-isolation: pip's isolated build would
# fetch another torch), so the first call compiles nothing. It is reinstalled only when what the
# install depends on changes (pyproject.toml, setup.py, the build flags, csrc/).
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
install_inputs=$(cat pyproject.toml setup.py pmi_kernels/backends/native/build_spec.py \
    $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.pmi-kernels-installed 2>/dev/null)" != "$install_inputs" ]; then
    # setup.py compiles with torch's BuildExtension: setuptools and ninja must be there first.
    .venv/bin/pip install -q "setuptools>=70.1" ninja
    .venv/bin/pip install -q --no-build-isolation -e ".[dev]"
    echo "$install_inputs" > .venv/.pmi-kernels-installed
fi
export PATH="$PWD/.venv/bin:$PATH"
# Where the kernels are (the compiled pmi_kernels._C), or, had the compile failed at install, a
# just-in-time build now with the compiler's output; the library runs without them if that fails.
python -m pmi_kernels.backends.native.build || echo "(the library runs without them: backend 'auto' falls back)"
