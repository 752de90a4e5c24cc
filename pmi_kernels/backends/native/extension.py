"""Loading csrc/ (the C++ kernels, and the CUDA kernels where CUDA is here) as one torch extension that
registers the ops pmi_kernels::rows and pmi_kernels::diagnostics_rows.

Where the library comes from, in this order:
1. pmi_kernels._C, compiled at install by setup.py (docs/install.md), when the torch it was compiled
   against (recorded beside it, in _C.build.json) is the torch here: an extension must be loaded by the
   exact torch it was compiled against (torch's C++ ABI changes between releases). Under another torch it
   is not loaded: one warning, and the just-in-time build serves.
2. A just-in-time build on first use into a cache (~/.cache/pmi_kernels, or $PMI_KERNELS_CACHE), one
   directory per (sources, flags, torch, Python), with one printed line.

The just-in-time build never breaks or hangs a call. It compiles in a private directory and renames the
library into place, with a manifest (size, sha256) written after it, so no process loads a half-written
library; concurrent first calls take turns through a lock on the cache entry that the system releases
when its holder dies (a killed build leaves nothing behind that blocks), with a bounded wait. An entry
that fails to load is rebuilt; a failed build is remembered (later processes fall back at once) until
what it depended on changes (a compiler found, another compiler), or until
`python -m pmi_kernels.backends.native.build` retries it; a successful build clears it. An unwritable
cache means a build into a temporary directory for this process, or, failing that, no extension: the
reason is returned (backend "auto" falls back to plain torch with one warning; "cpu" and "cuda" raise it).
PMI_KERNELS_NO_EXTENSION=1 turns the extension off, without a warning.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch

from . import build_spec
from .build_spec import cuda_flags, source_dir, sources  # noqa: F401 (tests and tools read them here)

NAME = build_spec.JIT_NAME
HOW_TO_BUILD = (
    "rebuild it with `python -m pmi_kernels.backends.native.build` (needs a C++17 compiler and ninja; "
    "for the CUDA kernels also nvcc, found through CUDA_HOME)"
)
FAILURE_MARKER = "BUILD_FAILED"
MANIFEST = "BUILT"
# How long a first call waits for another process's build of the same entry before it builds its own copy
# alongside (a dead builder's lock is released at once by the system; this bounds a hung one).
LOCK_WAIT_S = 600.0


def cuda_wanted() -> bool:
    """Whether this torch can run CUDA kernels here and nvcc is there to build them."""
    return torch.version.cuda is not None and torch.cuda.is_available() and build_spec.nvcc() is not None


def cache_root() -> Path:
    return Path(os.environ.get("PMI_KERNELS_CACHE") or Path.home() / ".cache" / "pmi_kernels")


def build_dir(with_cuda: bool) -> Path:
    """One directory per (sources, flags, torch, Python): a change to any of them rebuilds."""
    digest = hashlib.sha256(build_spec.source_digest().encode())
    flags = [*build_spec.cxx_flags(with_cuda), *build_spec.ld_flags(), *cuda_flags()]
    digest.update(" ".join([torch.__version__, sys.version, str(with_cuda), *flags]).encode())
    return cache_root() / f"{NAME}-{digest.hexdigest()[:16]}"


def _warn(message: str) -> None:
    warnings.warn(f"pmi_kernels: {message}", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------------------
# The library setup.py compiled into the package


def installed_library() -> Optional[Path]:
    """pmi_kernels._C's file, as the import system finds it (in the package, or an editable install's tree)."""
    spec = importlib.util.find_spec(build_spec.PACKAGE_EXTENSION)
    return None if spec is None or spec.origin is None else Path(spec.origin)


def prebuilt_library(with_cuda: bool) -> Optional[Path]:
    """pmi_kernels._C when it was compiled against this torch (and with the CUDA kernels, where they would be
    built here); None when not installed, or, with one warning, when it does not fit."""
    library = installed_library()
    if library is None:
        return None
    try:
        info = json.loads(library.with_name(build_spec.BUILD_INFO).read_text())
    except (OSError, ValueError) as err:
        _warn(f"{library} has no readable {build_spec.BUILD_INFO} ({err}); building the kernels just in time")
        return None
    if info.get("torch") != torch.__version__:
        _warn(
            f"{library} was compiled against torch {info.get('torch')}, this is torch {torch.__version__}: "
            "building the kernels just in time (reinstall pmi_kernels to compile them for this torch)"
        )
        return None
    if info.get("sources") != build_spec.source_digest():
        _warn(
            f"{library} was compiled from other sources than {source_dir()} holds now: building the kernels just "
            "in time (`pip install --no-build-isolation -e .` compiles them into the package again)"
        )
        return None
    if with_cuda and not info.get("cuda"):
        _warn(
            f"{library} was compiled without the CUDA kernels, which nvcc can build here: building them just in "
            "time (reinstall pmi_kernels with nvcc found to compile them at install)"
        )
        return None
    return library


# ----------------------------------------------------------------------------------------------------------
# The just-in-time build's cache entries


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    """Written under a temporary name and renamed into place: a reader sees the old file or the whole new one."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(text)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def built_library(entry: Path) -> Optional[Path]:
    """The entry's library when the manifest written after it vouches for it (its whole size and hash): a
    half-written or damaged file is never loaded (a truncated library mapped in is a SIGBUS)."""
    library = entry / f"{NAME}.so"
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if library.stat().st_size == manifest["size"] and _sha256(library) == manifest["sha256"]:
            return library
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _build_inputs() -> dict:
    """What a failed build depended on beyond the entry's own key (sources, flags, torch, Python): when any of
    these changes (a compiler installed, another one chosen), the failure is retried."""
    ninja = shutil.which("ninja")
    return {"compiler": build_spec.compiler(), "ninja": ninja, "nvcc": build_spec.nvcc() if cuda_wanted() else None}


def remembered_failure(entry: Path) -> Optional[str]:
    """The recorded error of the entry's last build, while what that build depended on is unchanged."""
    try:
        failure = json.loads((entry / FAILURE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(failure, dict) or failure.get("inputs") != _build_inputs():
        return None
    return str(failure.get("error", "unknown error"))


def _record_failure(entry: Path, error: str) -> None:
    try:
        _write_atomically(entry / FAILURE_MARKER, json.dumps({"inputs": _build_inputs(), "error": error}) + "\n")
    except OSError:
        pass  # remembering it only saves later processes the attempt


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _entry_lock(entry: Path) -> Iterator[None]:
    """One build of an entry at a time: an advisory lock the system releases when its holder exits, however
    it exits. After LOCK_WAIT_S the waiter builds its own copy (builds are private until renamed into place)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent builds each rename a whole library into place
        yield
        return
    with open(entry / "lock", "a+") as handle:
        deadline, said = time.monotonic() + LOCK_WAIT_S, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() > deadline:
                    _warn(
                        f"another process has been building the kernels into {entry} for {LOCK_WAIT_S:.0f} s; "
                        "building a copy alongside it"
                    )
                    yield
                    return
                if not said:
                    print(
                        f"pmi_kernels: waiting for another process building the kernels into {entry}",
                        file=sys.stderr,
                        flush=True,
                    )
                    said = True
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def torch_build(work: Path, with_cuda: bool) -> Path:
    """torch's just-in-time build into `work`, which also loads the library; returns its file."""
    from torch.utils.cpp_extension import load as build_and_load

    build_and_load(
        name=NAME,
        sources=[str(p) for p in sources(with_cuda)],
        build_directory=str(work),
        extra_cflags=build_spec.cxx_flags(with_cuda),
        extra_cuda_cflags=cuda_flags(),
        extra_ldflags=build_spec.ld_flags(),
        extra_include_paths=[str(p) for p in build_spec.include_dirs()],
        is_python_module=False,
        verbose=False,
    )
    return work / f"{NAME}.so"


def _compile(entry: Path, with_cuda: bool) -> Path:
    """Builds the library in a private directory of the entry (torch's build, and its own lock, stay there),
    loads it, and renames it into the entry with its manifest. Returns the entry's library."""
    work = Path(tempfile.mkdtemp(prefix=f"build-{os.getpid()}-", dir=entry))
    print(
        f"pmi_kernels: building the {'C++/CUDA' if with_cuda else 'C++'} kernels once into {entry} "
        "(about 20 s; `pip install --no-build-isolation .` compiles them at install instead)",
        file=sys.stderr,
        flush=True,
    )
    try:
        built = torch_build(work, with_cuda)
        library = entry / f"{NAME}.so"
        manifest = {"size": built.stat().st_size, "sha256": _sha256(built), "torch": torch.__version__}
        os.replace(built, library)
        _write_atomically(entry / MANIFEST, json.dumps(manifest) + "\n")
        return library
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _load_library(library: Path) -> Optional[str]:
    try:
        torch.ops.load_library(str(library))
    except Exception as err:  # noqa: BLE001 (dlopen and registration errors surface as several types)
        return f"{type(err).__name__}: {err}"
    return None


def _build_or_reuse(entry: Path, with_cuda: bool, force_build: bool, retry_failed: bool) -> Optional[str]:
    """Loads the entry's library, building it first where needed; None when loaded, else why not."""
    library = None if force_build else built_library(entry)
    if library is not None and _load_library(library) is None:
        return None
    # Not built, or it did not load (a damaged entry): that is not a failed build, it is built again.
    rebuild = force_build or library is not None
    failure = None if retry_failed or rebuild else remembered_failure(entry)
    if failure is not None:
        return f"the C++/CUDA extension failed to build earlier ({entry / FAILURE_MARKER}); {HOW_TO_BUILD}"
    with _entry_lock(entry):
        library = None if rebuild else built_library(entry)
        if library is None:  # nobody built it while this process waited
            try:
                library = _compile(entry, with_cuda)
            except Exception as err:  # noqa: BLE001 (a compiler error can surface as many types)
                _record_failure(entry, f"{type(err).__name__}: {err}")
                return f"the C++/CUDA extension failed to build ({entry / FAILURE_MARKER}); {HOW_TO_BUILD}"
            (entry / FAILURE_MARKER).unlink(missing_ok=True)
            return None  # torch's build loaded it
    load_error = _load_library(library)
    return None if load_error is None else f"the C++/CUDA extension built in {entry} fails to load ({load_error})"


def _jit(with_cuda: bool, force_build: bool, retry_failed: bool) -> Tuple[Path, Optional[str]]:
    """The cache entry used (a temporary one where the cache is not writable), and None when its library
    is loaded, else why not."""
    entry = build_dir(with_cuda)
    if not force_build and built_library(entry) is not None:  # a read-only cache may hold a good build
        return entry, _build_or_reuse(entry, with_cuda, force_build, retry_failed)
    if not _writable(entry):
        try:
            scratch = Path(tempfile.mkdtemp(prefix="pmi_kernels-"))
            atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # the loaded library outlives its file
        except OSError as err:
            return entry, (
                f"neither the kernel cache {cache_root()} nor a temporary directory is writable ({err}): "
                f"set PMI_KERNELS_CACHE to a writable directory and {HOW_TO_BUILD}, or install pmi_kernels "
                "with its kernels compiled (docs/install.md)"
            )
        _warn(
            f"the kernel cache {cache_root()} is not writable: building the kernels into {scratch} for this "
            "process (set PMI_KERNELS_CACHE to a writable directory to keep them)"
        )
        entry = scratch / entry.name
        entry.mkdir()
    return entry, _build_or_reuse(entry, with_cuda, force_build, retry_failed)


@functools.lru_cache(maxsize=None)
def load(force_build: bool = False, retry_failed: bool = False) -> Optional[str]:
    """Loads the extension (building it first if needed); None when loaded, else why not. force_build
    rebuilds the just-in-time entry (the installed library is then left unloaded); retry_failed ignores a
    remembered failure. A failure other than turning it off warns once per process."""
    if os.environ.get("PMI_KERNELS_NO_EXTENSION") == "1":
        return "the C++/CUDA extension is turned off (PMI_KERNELS_NO_EXTENSION=1)"
    if _LOADED_FROM:  # by an earlier call with other arguments: its ops are registered once per process
        return None
    with_cuda = cuda_wanted()
    library = None if force_build else prebuilt_library(with_cuda)
    if library is not None:
        error = _load_library(library)
        if error is None:
            return _loaded(library, with_cuda)
        _warn(f"{library} fails to load ({error}); building the kernels just in time")
    if not source_dir().is_dir():
        reason = (
            f"the C++/CUDA sources are not here ({source_dir()}): reinstall pmi_kernels (its wheel carries "
            "them), or from a source checkout"
        )
    else:
        try:
            entry, reason = _jit(with_cuda, force_build, retry_failed)
        except Exception as err:  # noqa: BLE001 (whatever goes wrong, a call falls back rather than breaks)
            reason = f"the C++/CUDA extension could not be loaded ({type(err).__name__}: {err}); {HOW_TO_BUILD}"
    if reason is None:
        return _loaded(entry, with_cuda)
    _warn(f"{reason}. Backend 'auto' runs without it (plain torch on CPU tensors)")
    return reason


_BUILT_WITH_CUDA: List[bool] = []
_LOADED_FROM: List[Path] = []


def _loaded(where: Path, with_cuda: bool) -> None:
    _register_fakes()
    _BUILT_WITH_CUDA.append(with_cuda)
    _LOADED_FROM.append(where)
    return None


def built_with_cuda() -> bool:
    """Whether the loaded extension has its CUDA kernels (False before it is loaded)."""
    return bool(_BUILT_WITH_CUDA) and _BUILT_WITH_CUDA[0]


def loaded_from() -> Optional[Path]:
    """The installed library, or the cache entry, the extension was loaded from in this process."""
    return _LOADED_FROM[0] if _LOADED_FROM else None


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when the extension's kernels run on `device_type` tensors here, else why not."""
    reason = load()
    if reason is not None:
        return reason
    if device_type == "cuda" and not _BUILT_WITH_CUDA[0]:
        return f"the extension was built without its CUDA kernels (this torch or nvcc lacks CUDA); {HOW_TO_BUILD}"
    return None


def _register_fakes() -> None:
    """Shapes for torch.compile: the ops' outputs, with no kernel run."""
    from ...options import compute_dtype
    from .. import DIAGNOSTICS

    # The schemas' signatures (csrc/ops.cpp), by name; only the student's shape and dtype matter.
    @torch.library.register_fake("pmi_kernels::rows")
    def _(
        student,
        teacher,
        refonly,
        anchor,
        kappa,
        mask,
        row_scale,
        grad,
        stats,
        lse_in,
        lse_out,
        slope_sum_in,
        slope_sum_out,
        *,
        phase,
        pmi,
        beta,
        clip,
        center,
        temperature,
        jsd_beta,
        entry_clip,
    ):
        return student.new_empty(student.shape[0], dtype=compute_dtype(student.dtype))

    @torch.library.register_fake("pmi_kernels::diagnostics_rows")
    def _(student, teacher, refonly, anchor, *, pmi, beta, clip, center, temperature, jsd_beta, entry_clip):
        return student.new_empty(student.shape[0], len(DIAGNOSTICS), dtype=compute_dtype(student.dtype))
