"""The benchmark sweep: every implementation, every case, one run, one device.

Cases vary N (tokens), V (vocabulary) and H (hidden size), forward-only and forward+backward,
on the fused-linear problem (hidden states + lm_head -> three-stream PMI-KL loss, forward KL;
see implementations.py). Each case reports the median time, the peak memory beyond the
inputs and the returned gradients (GPU), the useful TFLOP/s (the floor's GEMM FLOPs over the
time) and the ratio to the floor (the bare GEMMs of that case), the implementations of a case
timed interleaved in the same run. An out-of-memory case is recorded as OOM.

Outputs in --out: the records in results.jsonl, sweep.md (the table README shows),
time_vs_n.png, memory_vs_n.png, ratio_to_floor.png.

On a machine without a GPU it runs small CPU cases in under 2 minutes, with the same outputs.

    python -m benchmarks sweep --out benchmarks/results/cpu-example
    python -m benchmarks sweep --out $OUT --max-minutes 5.5        # on a GPU, within a time budget
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import harness
from . import implementations as impls


@dataclass(frozen=True)
class Case:
    n: int
    hidden: int
    vocab: int
    backward: bool

    @property
    def phase(self) -> str:
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def floor_flops(self) -> int:
        """Two GEMMs forward (student, t - r), two more backward; 2 N V H each."""
        return (4 if self.backward else 2) * 2 * self.n * self.vocab * self.hidden


def default_cases(device: str):
    """The headline case first, then N scaling, then V and H variants."""
    if device == "cuda":
        head, grid_n = (8192, 4096, 151936), [1024, 4096, 16384, 32768, 65536, 131072]
        variants = [(8192, 4096, 32000), (8192, 4096, 128256), (8192, 2048, 151936)]
    else:
        head, grid_n = (512, 128, 8000), [128, 2048]
        variants = [(512, 128, 32000)]
    # The headline, then N scaling (largest last), then the V and H variants.
    shapes = [head] + [(n, head[1], head[2]) for n in grid_n] + variants
    return [Case(n, h, v, backward) for n, h, v in shapes for backward in (True, False)]


def measure(case: Case, device: str, names: Sequence[str], calls: int) -> list[dict]:
    """One case: each implementation's warm-up call (its peak extra memory measured there on a
    GPU; the floor runs first, so cuBLAS has its workspace), then `calls` interleaved rounds."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        inputs = impls.make_inputs(case.n, case.hidden, case.vocab, dtype, device)
    except Exception as err:  # noqa: BLE001
        if harness.is_oom(err):
            return [dict(impl=name, status="OOM (inputs)") for name in names]
        raise
    h, w = inputs[0], inputs[1]
    keep = (h.numel() * h.element_size() + w.numel() * w.element_size()) if case.backward else 0
    table = {impls.FLOOR: impls.bare_gemms, **impls.implementations_for(device)}
    rows = {name: dict(impl=name, status="ok") for name in names}
    sides = {}
    for name in names:
        try:
            run = table[name](*inputs)
        except ImportError as err:
            rows[name]["status"] = f"not installed ({err.name})"
            continue
        side = impls.call_with(run, case.backward)
        try:
            if device == "cuda" and name != impls.FLOOR:
                rows[name]["peak_extra_gib"] = harness.peak_extra_gib(side, keep)
            else:
                side()
        except Exception as err:  # noqa: BLE001 (an OOM is a result; anything else is raised)
            if not harness.is_oom(err):
                raise
            rows[name]["status"] = "OOM"
            harness.empty_cuda_cache(device)
            continue
        sides[name] = side
    timings = harness.interleaved(sides, device, calls, tolerate=harness.oom_status, warm_up=False)
    floor = timings.get(impls.FLOOR)
    for name, timing in timings.items():
        row = rows[name]
        row["status"] = timing.status
        if timing.ms is None:
            row.pop("peak_extra_gib", None)
            continue
        row.update(ms=timing.ms, tflops=case.floor_flops / timing.ms / 1e9)
        if floor is not None and floor.ms:
            row["x_floor"] = timing.ms / floor.ms
    del inputs, sides
    harness.empty_cuda_cache(device)
    return [rows[name] for name in names]


def record(results: harness.Results, case: Case, row: dict) -> None:
    """A row of the table as records of the one schema."""
    label = f"N={case.n} H={case.hidden} V={case.vocab} {case.phase}"
    params = dict(n=case.n, hidden=case.hidden, vocab=case.vocab, phase=case.phase)
    if row["status"] != "ok":
        results.add(label, row["impl"], "time", None, "ms", row["status"], **params)
        return
    results.add(label, row["impl"], "time", row["ms"], "ms", **params)
    results.add(label, row["impl"], "throughput", row["tflops"], "TFLOP/s", **params)
    if "peak_extra_gib" in row:
        results.add(label, row["impl"], "peak_extra_memory", row["peak_extra_gib"], "GiB", **params)
    if "x_floor" in row:
        results.add_ratio(label, row["impl"], impls.FLOOR, row["x_floor"], **params)


def write_outputs(out: str, info: dict, records: list[dict]) -> None:
    """sweep.md (the table) and the plots, from the rows measured so far."""

    def fmt(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    lines = [
        f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}; {info['date']}.",
        "",
        "| N | H | V | phase | implementation | ms | extra GiB | TFLOP/s | x floor |",
        "| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        ms = fmt(r.get("ms"), ".2f") if r["status"] == "ok" else r["status"]
        lines.append(
            f"| {r['n']} | {r['hidden']} | {r['vocab']} | {r['phase']} | {r['impl']} | {ms} | "
            f"{fmt(r.get('peak_extra_gib'), '.2f')} | {fmt(r.get('tflops'), '.0f')} | "
            f"{fmt(r.get('x_floor'), '.2f')} |"
        )
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(out, info, records)


def plot(out: str, info: dict, records: list):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok" and r["phase"] == "fwd+bwd"]
    if not ok:
        return
    head = ok[0]
    scaling = [r for r in ok if (r["hidden"], r["vocab"]) == (head["hidden"], head["vocab"])]
    for key, label, fname in (
        ("ms", "median time (ms)", "time_vs_n.png"),
        ("peak_extra_gib", "peak extra memory (GiB)", "memory_vs_n.png"),
    ):
        lines = {
            impl: sorted((r["n"], r[key]) for r in scaling if r["impl"] == impl and r.get(key))
            for impl in dict.fromkeys(r["impl"] for r in scaling)
        }
        if not any(lines.values()):
            continue  # e.g. memory on a CPU, which is not measured per call
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl, pts in lines.items():
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="tokens N",
            ylabel=label,
            title=f"fwd+bwd, H={head['hidden']}, V={head['vocab']} - {info['device']}",
        )
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=120)
        plt.close(fig)
    bars = [
        r
        for r in ok
        if (r["n"], r["hidden"], r["vocab"]) == (head["n"], head["hidden"], head["vocab"]) and r.get("x_floor")
    ]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.barh([r["impl"] for r in bars], [r["x_floor"] for r in bars])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(
        xlabel="time / bare GEMMs (lower is better)",
        title=f"N={head['n']}, H={head['hidden']}, V={head['vocab']}, fwd+bwd - {info['device']}",
    )
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ratio_to_floor.png"), dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = harness.parser("sweep", __doc__, repeats=3, n=[])
    parser.add_argument("--impl", nargs="*", help="implementations to run (default: all available here)")
    parser.add_argument("--match", nargs="*", help="run only the implementations whose name contains one of these")
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="time budget: a case starts only if it is expected to end within it (the "
        "last case's time scaled by FLOPs); the others are recorded as skipped",
    )
    parser.set_defaults(n=None)
    args = harness.resolve(parser.parse_args(argv))
    device = args.device
    cases = default_cases(device)
    if args.n:  # the N grid replaced (H and V of the headline case)
        cases = [Case(n, cases[0].hidden, cases[0].vocab, b) for n in args.n for b in (True, False)]
    names = [impls.FLOOR] + (args.impl or list(impls.implementations_for(device)))
    if args.match:
        names = [impls.FLOOR] + [n for n in names[1:] if any(m in n for m in args.match)]
    results = harness.Results("sweep", args.out, device)
    info = results.device
    print(info)
    start, rows, last = time.monotonic(), [], None  # last: (seconds, floor FLOPs) of the latest case run
    for case in cases:
        began = time.monotonic()
        expected = last[0] * case.floor_flops / last[1] if last else 0.0
        skipped = args.max_minutes is not None and began - start + expected > 60 * args.max_minutes
        measured = (
            [dict(impl=name, status="skipped (time budget)") for name in names]
            if skipped
            else measure(case, device, names, args.repeats)
        )
        if not skipped:
            last = (time.monotonic() - began, case.floor_flops)
        for row in measured:
            rows.append(
                {
                    "n": case.n,
                    "hidden": case.hidden,
                    "vocab": case.vocab,
                    "backward": case.backward,
                    "phase": case.phase,
                    **row,
                }
            )
            record(results, case, row)
            shown = f"{row['ms']:9.2f} ms" if "ms" in row else row["status"]
            extra = f"  x{row['x_floor']:.2f}" if "x_floor" in row else ""
            print(f"N={case.n:6d} H={case.hidden} V={case.vocab:6d} {case.phase:7s} {row['impl']:46s} {shown}{extra}")
        write_outputs(args.out, info, rows)
    results.close()


if __name__ == "__main__":
    main()
