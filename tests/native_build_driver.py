"""Runs one case of the just-in-time build in a fresh process (a library is loaded once per process), for
tests/test_install.py: `python tests/native_build_driver.py CASE`, printing a JSON line last.

The installed pmi_kernels._C is ignored unless PMI_TEST_INSTALLED names a stand-in for it. torch's compile
runs for real with PMI_TEST_BUILD=torch; otherwise it is replaced by a copy of PMI_TEST_LIBRARY (a library
built earlier: "copy") or by a compiler error ("fail"), each attempt logged to PMI_TEST_BUILD_LOG.
PMI_TEST_NO_TMP=1 makes temporary directories unavailable.

Cases: auto (backend "auto" and the extension's state), cpu (backend "cpu"), build (the build command),
hold-lock (takes the cache entry's build lock and sleeps, to be killed).
"""

import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pmi_kernels import pmi_kl
from pmi_kernels.backends import resolve_backend
from pmi_kernels.backends.native import build, extension


def fake_build(work: Path, with_cuda: bool) -> Path:
    with open(os.environ["PMI_TEST_BUILD_LOG"], "a") as log:
        log.write("build\n")
    if os.environ.get("PMI_TEST_BUILD") == "fail":
        raise RuntimeError("Error building extension 'pmi_kernels_ext': c++: command not found")
    library = work / f"{extension.NAME}.so"
    shutil.copyfile(os.environ["PMI_TEST_LIBRARY"], library)
    torch.ops.load_library(str(library))
    return library


def no_temporary_directory(*args, **kwargs):
    raise OSError(30, "Read-only file system (PMI_TEST_NO_TMP)")


def patch():
    installed = os.environ.get("PMI_TEST_INSTALLED")
    extension.installed_library = lambda: Path(installed) if installed else None
    if os.environ.get("PMI_TEST_BUILD") != "torch":
        extension.torch_build = fake_build
    if os.environ.get("PMI_TEST_NO_TMP") == "1":
        tempfile.mkdtemp = no_temporary_directory


def run_auto() -> dict:
    x = torch.randn(3, 40)
    t, r = x + torch.randn_like(x), x + torch.randn_like(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [pmi_kl(x, t, r, backend="auto") for _ in range(2)]
        chosen = resolve_backend("auto", torch.device("cpu")).name
    expected = pmi_kl(x, t, r, backend="torch")
    return {
        "backend": chosen,
        "matches_torch": all(torch.allclose(v, expected) for v in losses),
        "warnings": [str(w.message) for w in caught if "pmi_kernels" in str(w.message)],
        "loaded_from": str(extension.loaded_from()),
    }


def run_cpu() -> dict:
    x = torch.randn(3, 40)
    try:
        pmi_kl(x, x + 1, x - 1, backend="cpu")
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None, "loaded_from": str(extension.loaded_from())}


def hold_lock() -> None:
    entry = extension.build_dir(False)
    entry.mkdir(parents=True, exist_ok=True)
    with extension._entry_lock(entry):
        print("locked", flush=True)
        time.sleep(600)


def main() -> int:
    patch()
    case = sys.argv[1]
    if case == "hold-lock":
        hold_lock()
        return 0
    if case == "build":
        result = {"returncode": build.main()}
    else:
        result = run_auto() if case == "auto" else run_cpu()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
