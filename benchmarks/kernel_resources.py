"""Compile the Triton kernels for sm_90 (Hopper) without a GPU, and print registers and spills.

GPU time is scarce; this catches compile errors and spills on any machine with Triton. The
ptxas that Triton carries reads the PTX it writes (a system ptxas may be older).

    python -m benchmarks kernel_resources
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Sequence

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pmi_kernels.backends.triton.diagnostics_kernel import pmi_diagnostics_kernel
from pmi_kernels.backends.triton.row_kernel import PHASE_ALL, pmi_kl_fwd_kernel

from . import harness

ROW_SIGNATURE = {
    "p_s": "*bf16",
    "p_t": "*bf16",
    "p_r": "*bf16",
    "p_a": "*bf16",
    "p_kappa": "*fp32",
    "p_mask": "*i1",
    "p_row_scale": "*fp32",
    "p_loss": "*fp32",
    "p_grad": "*bf16",
    "p_stats": "*fp32",
    "p_params": "*fp32",
    "p_lse_in": "*fp32",
    "p_lse_out": "*fp32",
    "p_slope_in": "*fp32",
    "p_slope_out": "*fp32",
    "stride_s": "i64",
    "stride_t": "i64",
    "stride_r": "i64",
    "stride_a": "i64",
    "stride_grad": "i64",
    "stride_row_scale": "i64",
    "V": "i32",
}
ROW_CASES = {
    "fused path, forward KL (kappa given)": dict(
        PMI=True, HAS_R=False, HAS_A=False, CLIP=True, KAPPA=1, LOSS_KIND=0, ENTRY_CLIP=False
    ),
    "3 logit streams, forward KL": dict(
        PMI=True, HAS_R=True, HAS_A=False, CLIP=True, KAPPA=2, LOSS_KIND=0, ENTRY_CLIP=False
    ),
    "3 logit streams, mixed JSD, entry clip": dict(
        PMI=True, HAS_R=True, HAS_A=False, CLIP=True, KAPPA=2, LOSS_KIND=2, ENTRY_CLIP=True
    ),
}
DIAG_SIGNATURE = {
    "p_s": "*bf16",
    "p_t": "*bf16",
    "p_r": "*bf16",
    "p_a": "*bf16",
    "p_out": "*fp32",
    "p_params": "*fp32",
    "stride_s": "i64",
    "stride_t": "i64",
    "stride_r": "i64",
    "stride_a": "i64",
    "V": "i32",
}


def ptxas() -> str:
    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return "ptxas"


def resources(kernel, signature, constexprs, warps, absent=()) -> tuple[int | None, int | None]:
    """Compiles for sm_90 with the pointers in `absent` passed as None, as the launcher passes
    absent streams."""
    constexprs = {**constexprs, **{name: None for name in absent}}
    src = ASTSource(fn=kernel, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(compiled.asm["ptx"])
        arch = re.search(r"\.target (sm_\w+)", compiled.asm["ptx"]).group(1)
        out = subprocess.run(
            [ptxas(), f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None


def report(
    results: harness.Results, kernel: str, block: int, warps: int, case: str, found: tuple[int | None, int | None]
) -> None:
    """One compiled kernel's registers and spills, printed and recorded."""
    regs, spills = found
    params = dict(target="sm_90", block_v=block, num_warps=warps)
    for metric, value, unit in (("registers", regs, "registers/thread"), ("spill_stores", spills, "bytes")):
        results.add(
            f"{kernel} {block}x{warps} {case}",
            "triton",
            metric,
            value,
            unit,
            "ok" if value is not None else "not in ptxas output",
            **params,
        )
    print(
        f"{kernel:18s} {block:5d}x{warps:2d}  {case:40s} {'?' if regs is None else regs} registers, "
        f"{'?' if spills is None else spills} bytes spilled"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = harness.parser("kernel_resources", __doc__, devices=("cpu",))
    args = harness.resolve(parser.parse_args(argv))
    results = harness.Results("kernel_resources", args.out, "cpu")
    for block, warps in ((2048, 8), (4096, 8), (4096, 16)):
        for name, case in ROW_CASES.items():
            consts = dict(
                case,
                HAS_MASK=False,
                HAS_ROW_SCALE=True,
                WRITE_GRAD=True,
                WRITE_STATS=False,
                FAST_GRAD=case["LOSS_KIND"] == 0 and not case["ENTRY_CLIP"],
                PHASE=PHASE_ALL.value,
                ACC=tl.float32,
                BLOCK_V=block,
            )
            absent = [
                p
                for p, present in (
                    ("p_r", case["HAS_R"]),
                    ("p_a", case["HAS_A"]),
                    ("p_mask", False),
                    ("p_stats", False),
                    ("p_kappa", case["KAPPA"] == 1),
                )
                if not present
            ]
            absent += ["p_lse_in", "p_lse_out", "p_slope_in", "p_slope_out"]  # one device: every pass at once
            report(
                results,
                "pmi_kl_fwd_kernel",
                block,
                warps,
                name,
                resources(pmi_kl_fwd_kernel, ROW_SIGNATURE, consts, warps, absent),
            )
        consts = dict(HAS_A=False, CLIP=True, CENTER=True, ACC=tl.float32, BLOCK_V=block)
        report(
            results,
            "pmi_diagnostics",
            block,
            warps,
            "3 logit streams",
            resources(pmi_diagnostics_kernel, DIAG_SIGNATURE, consts, warps, ["p_a"]),
        )
    results.close()


if __name__ == "__main__":
    main()
