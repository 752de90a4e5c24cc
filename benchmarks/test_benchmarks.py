"""pytest-benchmark over the cases of the sweep (its headline and variant shapes), for users who
track benchmarks with pytest:  python -m pytest benchmarks/test_benchmarks.py --benchmark-only

Skipped in the ordinary test run (pytest-benchmark's --benchmark-skip is not needed: these
live outside tests/). Each implementation is timed forward+backward, synchronized on GPU.
"""

import pytest
import torch

from benchmarks import implementations as impls
from benchmarks.sweep import default_cases

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [c for c in default_cases(DEVICE) if c.backward][:4]
TABLE = {impls.FLOOR: impls.bare_gemms, **impls.implementations_for(DEVICE)}


@pytest.mark.parametrize("name", list(TABLE))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c.n}-H{c.hidden}-V{c.vocab}")
def test_fwd_bwd(benchmark, case, name):
    inputs = impls.make_inputs(
        case.n, case.hidden, case.vocab, torch.bfloat16 if DEVICE == "cuda" else torch.float32, DEVICE
    )
    try:
        run = TABLE[name](*inputs)
    except ImportError as err:
        pytest.skip(f"not installed: {err.name}")

    def step():
        run(True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(device=DEVICE, floor_tflop=case.floor_flops / 1e12)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
