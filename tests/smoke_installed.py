"""Smoke test of an installed wheel (scripts/test_wheel.sh runs it in a fresh venv, outside the checkout,
with no C++ compiler on the PATH and an unwritable HOME): every CPU backend computes the loss, its gradient
and the diagnostics as the plain-torch reference does, and backend "cpu" runs the kernels compiled into the
wheel at once: no build, nothing written. Prints the first call's time and the part of it spent loading
the kernels (no assertion on either)."""

import os
import shutil
import sys
import time
import warnings

# A warning of the library (a build, an unwritable cache, a library that does not fit) fails the smoke test.
warnings.filterwarnings("error", message="pmi_kernels")
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import pmi_kernels  # noqa: E402
from pmi_kernels import fused_pmi_kl, pmi_diagnostics, pmi_kl  # noqa: E402
from pmi_kernels.backends import resolve_backend  # noqa: E402
from pmi_kernels.backends.native import build_spec, extension  # noqa: E402
from pmi_kernels.reference import pmi_kl_reference  # noqa: E402


def check(condition, message):
    if not condition:
        sys.exit(f"smoke test failed: {message}")


def main() -> int:
    site = os.path.dirname(os.path.dirname(pmi_kernels.__file__))
    check(site.endswith("site-packages"), f"pmi_kernels is imported from {pmi_kernels.__file__}, not an install")
    check(shutil.which("c++") is None and build_spec.compiler() is None, "a C++ compiler is on the PATH")
    torch.manual_seed(int(os.environ.get("PMI_TEST_SEED", 0)))
    s, t, r, a = (torch.randn(6, 300, dtype=torch.float64) for _ in range(4))

    start = time.perf_counter()
    check(extension.load() is None, f"the kernels do not load: {extension.load()}")
    loading = time.perf_counter() - start
    pmi_kl(s, t, r, backend="cpu")
    first_call = time.perf_counter() - start
    check(
        str(extension.loaded_from()).startswith(os.path.dirname(pmi_kernels.__file__)),
        f"backend 'cpu' loaded {extension.loaded_from()}, not the wheel's library",
    )
    check(not extension.cache_root().exists(), f"the kernel cache {extension.cache_root()} was written")
    check(resolve_backend("auto", torch.device("cpu")).name == "cpu", "backend 'auto' does not pick 'cpu'")

    expected = pmi_kl_reference(s, t, r, a)
    for backend in ("cpu", "torch", "triton"):
        student = s.clone().requires_grad_()
        loss = pmi_kl(student, t, r, a, backend=backend)
        loss.backward()
        check(torch.allclose(loss, expected, atol=1e-10), f"{backend}: loss {loss.item()} != {expected.item()}")
        reference = s.clone().requires_grad_()
        pmi_kl_reference(reference, t, r, a).backward()
        check(torch.allclose(student.grad, reference.grad, atol=1e-10), f"{backend}: gradient differs")
        h, w = torch.randn(6, 16, dtype=torch.float64), torch.randn(300, 16, dtype=torch.float64)
        fused = fused_pmi_kl(h, w, h + 0.1, h - 0.1, backend=backend)
        check(
            torch.allclose(fused, pmi_kl_reference(h @ w.T, (h + 0.1) @ w.T, (h - 0.1) @ w.T)),
            f"{backend}: fused loss differs",
        )
        diagnostics = pmi_diagnostics(s, t, r, a, backend=backend)
        check(all(torch.isfinite(v).all() for v in diagnostics.values()), f"{backend}: diagnostics not finite")
        print(f"backend {backend}: loss, gradient, fused loss and diagnostics match the reference")
    print(
        f"first call of backend 'cpu': {first_call:.3f} s, of which loading the kernels {loading:.3f} s "
        f"(from {extension.loaded_from()})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
