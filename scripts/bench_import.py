"""The cost of `import pmi_kernels` against `import torch`, measured the same way in one run:
`python -X importtime -c "import X"` in fresh processes, the best of --repeat runs of each
(the cumulative time of the top-level module, as -X importtime prints it); then the first
pmi_kl call of a fresh process, which must neither build nor import torch._dynamo.

    python scripts/bench_import.py [--repeat 5]
"""

import argparse
import subprocess
import sys


def import_seconds(module: str) -> float:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True
    )
    for line in out.stderr.splitlines():
        fields = [f.strip() for f in line.removeprefix("import time:").split("|")]
        if len(fields) == 3 and fields[2] == module:
            return int(fields[1]) / 1e6
    raise RuntimeError(f"-X importtime printed no line for {module}")


FIRST_CALL = """
import sys, time, torch, pmi_kernels
s, t, r = (torch.randn(8, 1000) for _ in range(3))
start = time.perf_counter()
pmi_kernels.pmi_kl(s, t, r, backend=sys.argv[1])
print(time.perf_counter() - start, 'torch._dynamo' in sys.modules)
"""


def first_call(backend: str) -> tuple:
    out = subprocess.run([sys.executable, "-c", FIRST_CALL, backend], capture_output=True, text=True, check=True)
    seconds, dynamo = out.stdout.split()
    return float(seconds), dynamo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    best = {m: min(import_seconds(m) for _ in range(args.repeat)) for m in ("torch", "pmi_kernels")}
    dynamo = subprocess.run(
        [sys.executable, "-c", "import sys, pmi_kernels; print('torch._dynamo' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"import torch        {best['torch']:.3f} s")
    print(f"import pmi_kernels  {best['pmi_kernels']:.3f} s  ({best['pmi_kernels'] / best['torch']:.2f}x torch)")
    print(f"torch._dynamo imported by pmi_kernels: {dynamo}")
    for backend in ("cpu", "torch"):
        seconds, dynamo = min(first_call(backend) for _ in range(args.repeat))
        print(f"first pmi_kl call, backend {backend!r}: {seconds:.3f} s (torch._dynamo imported: {dynamo})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
