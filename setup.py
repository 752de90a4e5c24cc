"""The ahead-of-time build of the C++ kernels (and of the CUDA kernels, with a CUDA torch and nvcc) into the
package, as pmi_kernels._C; pyproject.toml holds the metadata and the build-system table.

    pip install --no-build-isolation .          # torch already installed: the kernels are compiled now
    pip wheel --no-build-isolation --no-deps .  # a wheel with the compiled kernels, for machines like this one

PMI_KERNELS_BUILD_NATIVE=0 skips the native build (a pure-Python install: the kernels are then built just in
time, on first use); PMI_KERNELS_BUILD_NATIVE=1 requires it (a failed compile fails the install). Unset, the
kernels are built where torch is importable in the build environment, and a failed compile leaves a
pure-Python install with a warning. --no-build-isolation matters: pip's isolated build environment has no
torch (listing it there would fetch a second, unpinned torch, and the library must be compiled against the
torch that loads it), so an isolated build is pure Python. The sources and flags come from
pmi_kernels/backends/native/build_spec.py, which the just-in-time build reads too.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_spec():
    """build_spec.py, loaded by its path: pmi_kernels itself is not importable while it is being built."""
    path = ROOT / "pmi_kernels" / "backends" / "native" / "build_spec.py"
    spec = importlib.util.spec_from_file_location("_pmi_kernels_build_spec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SPEC = _build_spec()


def _say(message: str) -> None:
    print(f"pmi_kernels setup: {message}", file=sys.stderr, flush=True)


def native_mode() -> str:
    value = os.environ.get(SPEC.BUILD_SWITCH, "")
    if value not in ("", "0", "1"):
        sys.exit(
            f"pmi_kernels setup: {SPEC.BUILD_SWITCH} must be 0 (skip the native build) or 1 (require it), got {value!r}"
        )
    return value or "auto"


def _relative(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def native_build(mode: str) -> dict:
    """setup()'s ext_modules, cmdclass and options for the native build; empty for a pure-Python install."""
    if mode == "0":
        _say(f"{SPEC.BUILD_SWITCH}=0: a pure-Python install; the kernels build on first use")
        return {}
    try:
        import torch  # noqa: F401 (the extension is compiled against this torch)
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        if mode == "1":
            sys.exit(
                f"pmi_kernels setup: {SPEC.BUILD_SWITCH}=1 needs torch in the build environment "
                f"(install torch first, then pip install --no-build-isolation): {err}"
            )
        _say(
            "torch is not importable in this build environment (pip's isolated build): a pure-Python install; "
            "the kernels build on first use. Install torch first and use pip install --no-build-isolation "
            "to build them now"
        )
        return {}

    with_cuda = SPEC.torch_has_cuda() and SPEC.nvcc() is not None
    kind, flags = (
        (CUDAExtension, {"cxx": SPEC.cxx_flags(True), "nvcc": SPEC.cuda_flags()})
        if with_cuda
        else (CppExtension, {"cxx": SPEC.cxx_flags(False)})
    )
    extension = kind(
        SPEC.PACKAGE_EXTENSION,
        _relative(SPEC.sources(with_cuda, python_module=True)),
        include_dirs=_relative(SPEC.include_dirs()),
        extra_compile_args=flags,
        extra_link_args=SPEC.ld_flags(),
        py_limited_api=True,
        optional=mode != "1",
    )

    class BuildNative(BuildExtension):
        """torch's BuildExtension (ninja), which also writes what the library was built against beside it,
        and, unless the build is required, turns a failed compile into a pure-Python install."""

        def build_extension(self, ext):
            _say(f"building the {'C++ and CUDA' if with_cuda else 'C++'} kernels as {ext.name}")
            try:
                super().build_extension(ext)
            except Exception as err:  # noqa: BLE001 (a compiler error surfaces as several types)
                if mode == "1":
                    raise
                _say(
                    f"the native build failed ({type(err).__name__}: {err}); a pure-Python install: the kernels "
                    f"build on first use. Set {SPEC.BUILD_SWITCH}=1 to make this an error"
                )
                return
            self._info_path(ext).write_text(json.dumps(SPEC.build_info(with_cuda), indent=1) + "\n")

        def _info_path(self, ext) -> Path:
            return Path(self.get_ext_fullpath(ext.name)).with_name(SPEC.BUILD_INFO)

        def _get_output_mapping(self):
            """An editable install copies the library into the source tree: its build info goes with it."""
            yield from super()._get_output_mapping()
            if self.inplace:
                build_py = self.get_finalized_command("build_py")
                for ext in self.extensions:
                    inplace, regular = (
                        Path(p).with_name(SPEC.BUILD_INFO) for p in self._get_inplace_equivalent(build_py, ext)
                    )
                    yield str(regular), str(inplace)

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            for regular, inplace in self._get_output_mapping():
                if regular.endswith(SPEC.BUILD_INFO) and os.path.exists(regular):
                    self.copy_file(regular, inplace, level=self.verbose)

        def get_outputs(self):
            infos = [str(self._info_path(ext)) for ext in self.extensions if self._info_path(ext).exists()]
            built = [path for path in super().get_outputs() if os.path.exists(path)]
            return built + infos

    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": BuildNative.with_options(use_ninja=True)},
        "options": {"bdist_wheel": {"py_limited_api": SPEC.LIMITED_API_TAG}},
    }


setup(zip_safe=False, **native_build(native_mode()))
