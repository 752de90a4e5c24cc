"""The native kernels' installation and just-in-time build: an unwritable cache, a failed build, a killed
build's lock, half-written or broken cache entries and an installed library built for another torch never
break or hang a call. Each case runs in a fresh process (tests/native_build_driver.py), with torch's compile
replaced by a copy of the library built here, except where the compiler's own failure is the point."""

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pmi_kernels.backends.native import build_spec, extension

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("native_build_driver.py")


@pytest.fixture(scope="module")
def library():
    """A working library of the kernels, as this process loaded it (installed, or from the cache)."""
    if extension.load() is not None:
        pytest.skip(f"the extension is not usable here: {extension.load()}")
    where = extension.loaded_from()
    return where if where.is_file() else where / f"{extension.NAME}.so"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PMI_KERNELS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def drive(case, library, tmp_path, timeout=120, **env):
    """Runs one driver case; returns its JSON result and the number of builds it attempted."""
    log = tmp_path / "builds.log"
    full_env = {k: v for k, v in os.environ.items() if k != "PMI_KERNELS_NO_EXTENSION"}
    full_env.update(PMI_TEST_LIBRARY=str(library), PMI_TEST_BUILD_LOG=str(log), PYTHONPATH=str(ROOT), **env)
    out = subprocess.run(
        [sys.executable, str(DRIVER), case], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-3000:]
    builds = len(log.read_text().splitlines()) if log.exists() else 0
    return json.loads(out.stdout.strip().splitlines()[-1]), builds


def entry_of(cache):
    entries = list(cache.glob(f"{extension.NAME}-*"))
    assert len(entries) == 1, entries
    return entries[0]


def unwritable(tmp_path):
    """A cache path no process can create, even as root: its parent is a regular file."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    return blocker / "cache"


def test_unwritable_cache_builds_into_a_temporary_directory(library, tmp_path):
    result, builds = drive("auto", library, tmp_path, PMI_KERNELS_CACHE=str(unwritable(tmp_path)))
    assert result["backend"] == "cpu" and result["matches_torch"] and builds == 1
    assert len(result["warnings"]) == 1 and "not writable" in result["warnings"][0]


def test_unwritable_cache_and_temporary_directory_fall_back_to_torch(library, tmp_path):
    """No exception from backend="auto": the plain-torch path, with one warning that names a rebuild command."""
    result, builds = drive("auto", library, tmp_path, PMI_KERNELS_CACHE=str(unwritable(tmp_path)), PMI_TEST_NO_TMP="1")
    assert result["backend"] == "torch" and result["matches_torch"] and builds == 0
    assert len(result["warnings"]) == 1 and "python -m pmi_kernels.backends.native.build" in result["warnings"][0]


def test_unwritable_home_with_no_cache_set(library, tmp_path, monkeypatch):
    monkeypatch.delenv("PMI_KERNELS_CACHE", raising=False)
    result, builds = drive("auto", library, tmp_path, HOME=str(unwritable(tmp_path)))
    assert result["backend"] == "cpu" and builds == 1


def test_failed_build_is_remembered_and_retried_when_a_compiler_appears(library, tmp_path, cache):
    """A real compile with no compiler fails; later processes fall back at once (one warning each), until a
    compiler is found: then the build runs again and clears the failure."""
    missing = {"PMI_TEST_BUILD": "torch", "CXX": str(tmp_path / "no-such-compiler")}
    result, _ = drive("auto", library, tmp_path, **missing)
    assert result["backend"] == "torch" and result["matches_torch"]
    assert len(result["warnings"]) == 1 and "failed to build" in result["warnings"][0]
    entry = entry_of(cache)
    assert extension.FAILURE_MARKER in os.listdir(entry)

    result, builds = drive("auto", library, tmp_path, CXX=missing["CXX"])
    assert result["backend"] == "torch" and builds == 0 and len(result["warnings"]) == 1
    assert "earlier" in result["warnings"][0]

    result, builds = drive("auto", library, tmp_path)  # CXX unset: c++ on the PATH
    assert result["backend"] == "cpu" and builds == 1 and not result["warnings"]
    assert extension.FAILURE_MARKER not in os.listdir(entry)


def test_build_command_retries_a_remembered_failure(library, tmp_path, cache):
    drive("auto", library, tmp_path, PMI_TEST_BUILD="fail")
    assert extension.FAILURE_MARKER in os.listdir(entry_of(cache))
    result, builds = drive("build", library, tmp_path)
    assert result["returncode"] == 0 and builds == 2
    assert extension.FAILURE_MARKER not in os.listdir(entry_of(cache))


def test_turned_off_extension_falls_back_without_a_warning(library, tmp_path):
    result, builds = drive("auto", library, tmp_path, PMI_KERNELS_NO_EXTENSION="1")
    assert result["backend"] == "torch" and builds == 0 and not result["warnings"]


def test_lock_of_a_killed_build_does_not_block(library, tmp_path, cache):
    """A build killed while it holds the entry's lock (and torch's own lock file left beside it) does not
    make later processes wait."""
    env = {k: v for k, v in os.environ.items() if k != "PMI_KERNELS_NO_EXTENSION"}
    holder = subprocess.Popen(
        [sys.executable, str(DRIVER), "hold-lock"],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(env, PYTHONPATH=str(ROOT)),
        cwd=tmp_path,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (entry_of(cache) / "lock").exists()
    result, builds = drive("auto", library, tmp_path, timeout=60)
    assert result["backend"] == "cpu" and builds == 1


@pytest.mark.parametrize("damage", ["empty", "truncated", "not-a-library"])
def test_damaged_entry_is_rebuilt_not_remembered_as_failed(library, tmp_path, cache, damage):
    """A half-written library (0 bytes, cut short) or one that does not load is built again: never loaded
    half-written (a SIGBUS), never recorded as a failed build."""
    drive("auto", library, tmp_path)
    entry = entry_of(cache)
    built = entry / f"{extension.NAME}.so"
    whole = built.read_bytes()
    built.write_bytes({"empty": b"", "truncated": whole[: len(whole) // 2], "not-a-library": b"\0" * 4096}[damage])
    if damage == "not-a-library":  # its manifest vouches for it: it passes the check and fails to load
        (entry / extension.MANIFEST).write_text(json.dumps({"size": 4096, "sha256": extension._sha256(built)}))
    result, builds = drive("auto", library, tmp_path)
    assert result["backend"] == "cpu" and builds == 2 and not result["warnings"]  # the first build and this one
    assert extension.FAILURE_MARKER not in os.listdir(entry)
    assert built.read_bytes() == whole


def test_installed_library_is_loaded_without_a_build(library, tmp_path, cache):
    installed = tmp_path / "pkg" / "_C.abi3.so"
    installed.parent.mkdir()
    installed.write_bytes(library.read_bytes())
    (installed.parent / build_spec.BUILD_INFO).write_text(json.dumps(build_spec.build_info(False)))
    result, builds = drive("auto", library, tmp_path, PMI_TEST_INSTALLED=str(installed))
    assert result["backend"] == "cpu" and builds == 0 and not result["warnings"]
    assert result["loaded_from"] == str(installed) and not cache.exists()


@pytest.mark.parametrize("field,value", [("torch", "2.0.0"), ("sources", "0" * 64)])
def test_installed_library_for_another_torch_is_not_loaded(library, tmp_path, cache, field, value):
    """Built against another torch (or from other sources): one warning, and the just-in-time build serves."""
    installed = tmp_path / "pkg" / "_C.abi3.so"
    installed.parent.mkdir()
    installed.write_bytes(b"\0" * 64)  # would fail to load: it must not be tried
    info = dict(build_spec.build_info(False), **{field: value})
    (installed.parent / build_spec.BUILD_INFO).write_text(json.dumps(info))
    result, builds = drive("auto", library, tmp_path, PMI_TEST_INSTALLED=str(installed))
    assert result["backend"] == "cpu" and builds == 1 and len(result["warnings"]) == 1
    assert str(installed) in result["warnings"][0] and result["loaded_from"] != str(installed)


def test_cuda_archs_follow_torch_cuda_arch_list(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("PMI_KERNELS_CUDA_ARCHS", raising=False)
    assert build_spec.cuda_archs() == ["80", "90a"]
    assert "-gencode=arch=compute_90a,code=sm_90a" in build_spec.cuda_flags()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6;9.0a+PTX")
    assert build_spec.cuda_archs() == ["86", "90a"]
    assert not [f for f in build_spec.cuda_flags() if f.startswith("-gencode")]  # torch's build adds them


def test_pure_wheel_requires_triton_on_linux_only(tmp_path):
    """The wheel's metadata: triton behind an environment marker (it has wheels for Linux only)."""
    source = tmp_path / "source"  # a copy: a build in the checkout could package its build/ leftovers
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv*", "build", "dist", "runs", "*.egg-info", "*.so", "_C.build.json", "__pycache__"
        ),
    )
    env = dict(os.environ, PMI_KERNELS_BUILD_NATIVE="0")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("pmi_kernels-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))).decode()
        assert not [n for n in archive.namelist() if "/_C" in n or n.startswith("pmi_kernels/_C")]
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: triton")]
    assert requires == ['Requires-Dist: triton>=3.2; platform_system == "Linux"']
