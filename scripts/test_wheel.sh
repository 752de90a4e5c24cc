#!/usr/bin/env bash
# The wheel as a cluster node gets it: built here with the compiled C++ kernels (`pip wheel
# --no-build-isolation --no-deps .`, against .venv's torch), installed into a fresh venv, and
# smoke-tested there (tests/smoke_installed.py: every CPU backend against the reference) with no C++
# compiler on the PATH and an unwritable HOME, outside the checkout. The fresh venv reuses .venv's
# packages (torch, triton, numpy) through a .pth file instead of downloading them again; .venv's
# editable pmi_kernels is not visible there (its finder is registered by a .pth of its own).
source "$(dirname "$0")/env.sh"
root=$PWD
work=$(mktemp -d)
trap 'chmod -R u+w "$work"; rm -rf "$work"' EXIT
start=$SECONDS
# The checkout's files (tracked, and untracked ones git does not ignore): no build/ leftovers in the wheel.
mkdir "$work/src"
git ls-files -co --exclude-standard -z | tar -cf - --null -T - | tar -xf - -C "$work/src"
PMI_KERNELS_BUILD_NATIVE=1 pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" "$work/src"
wheel=$(ls "$work"/wheel/pmi_kernels-*.whl)
echo "built $(basename "$wheel") in $((SECONDS - start)) s"

start=$SECONDS
python3 -m venv --without-pip "$work/venv"
fresh_site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$fresh_site/project-venv.pth"
python -m pip --python "$work/venv/bin/python" install -q --no-deps --no-index "$wheel"
echo "installed into a fresh venv in $((SECONDS - start)) s"

# HOME is a path under a regular file: nothing can be created there, even by root.
touch "$work/not-a-directory"
(cd "$work" && env -i PATH="$work/venv/bin" HOME="$work/not-a-directory/home" TRITON_INTERPRET=1 \
    "$work/venv/bin/python" "$root/tests/smoke_installed.py")
