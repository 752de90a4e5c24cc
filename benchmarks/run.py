"""The benchmark sweep: every implementation, every case, one run, one device.

Cases vary N (tokens), V (vocabulary) and H (hidden size), forward-only and forward+backward,
on the fused-linear problem (hidden states + lm_head -> three-stream PMI-KL loss, forward KL;
see implementations.py). Each case reports the median time, the peak memory beyond the
inputs and the returned gradients (GPU), the useful TFLOP/s (the floor's GEMM FLOPs over the
time) and the ratio to the floor (the bare GEMMs of that case, timed in the same run). An
out-of-memory case is recorded as OOM.

Outputs in --out: results.json (device, versions, date, every figure), results.csv,
results.md (the table README shows), time_vs_n.png, memory_vs_n.png, ratio_to_floor.png.

On a machine without a GPU it runs small CPU cases in under 2 minutes, with the same outputs.

    python benchmarks/run.py --out benchmarks/results/cpu-example
    python benchmarks/run.py --out $OUT --max-minutes 5.5        # on a GPU, within a time budget
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import implementations as impls  # noqa: E402
from common import device_info, is_oom, median_ms_few, peak_extra_gib, write_json  # noqa: E402


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


def measure(case: Case, device: str, names, calls: int):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    try:
        inputs = impls.make_inputs(case.n, case.hidden, case.vocab, dtype, device)
    except Exception as err:  # noqa: BLE001
        if is_oom(err):
            return [dict(impl=name, status="OOM (inputs)") for name in names]
        raise
    h, w = inputs[0], inputs[1]
    keep = (h.numel() * h.element_size() + w.numel() * w.element_size()) if case.backward else 0
    table = {**{impls.FLOOR: impls.bare_gemms}, **(impls.GPU_IMPLEMENTATIONS if device == "cuda"
                                                   else impls.CPU_IMPLEMENTATIONS)}
    rows, floor_ms = [], None
    for name in names:
        row = dict(impl=name, status="ok")
        try:
            run = table[name](*inputs)
            memory = device == "cuda" and name != impls.FLOOR
            if memory:  # the warm-up call, measured (the floor ran first: cuBLAS has its workspace)
                row["peak_extra_gib"] = peak_extra_gib(lambda: run(case.backward), keep)
            ms = median_ms_few(lambda: run(case.backward), device, calls, warm_up=not memory)
            row.update(ms=ms, tflops=case.floor_flops / ms / 1e9)
        except ImportError as err:
            row["status"] = f"not installed ({err.name})"
        except Exception as err:  # noqa: BLE001 (an OOM is a result; anything else is raised)
            if not is_oom(err):
                raise
            row["status"] = "OOM"
        if device == "cuda":
            torch.cuda.empty_cache()
        if name == impls.FLOOR and row["status"] == "ok":
            floor_ms = row["ms"]
        if floor_ms and row["status"] == "ok":
            row["x_floor"] = row["ms"] / floor_ms
        rows.append(row)
    del inputs
    return rows


def write_outputs(out: str, info: dict, records: list):
    write_json(os.path.join(out, "results.json"), {"info": info, "records": records})
    fields = ["n", "hidden", "vocab", "phase", "impl", "status", "ms", "peak_extra_gib", "tflops", "x_floor"]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    lines = [f"Device: {info['device']}; torch {info['torch']}, triton {info['triton']}; {info['date']}.", "",
             "| N | H | V | phase | implementation | ms | extra GiB | TFLOP/s | x floor |",
             "| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in records:
        ms = fmt(r.get("ms"), ".2f") if r["status"] == "ok" else r["status"]
        lines.append(f"| {r['n']} | {r['hidden']} | {r['vocab']} | {r['phase']} | {r['impl']} | {ms} | "
                     f"{fmt(r.get('peak_extra_gib'), '.2f')} | {fmt(r.get('tflops'), '.0f')} | "
                     f"{fmt(r.get('x_floor'), '.2f')} |")
    with open(os.path.join(out, "results.md"), "w") as f:
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
    for key, label, fname in (("ms", "median time (ms)", "time_vs_n.png"),
                              ("peak_extra_gib", "peak extra memory (GiB)", "memory_vs_n.png")):
        lines = {impl: sorted((r["n"], r[key]) for r in scaling if r["impl"] == impl and r.get(key))
                 for impl in dict.fromkeys(r["impl"] for r in scaling)}
        if not any(lines.values()):
            continue  # e.g. memory on a CPU, which is not measured per call
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl, pts in lines.items():
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel=label,
               title=f"fwd+bwd, H={head['hidden']}, V={head['vocab']} - {info['device']}")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=120)
        plt.close(fig)
    bars = [r for r in ok if (r["n"], r["hidden"], r["vocab"]) == (head["n"], head["hidden"], head["vocab"])
            and r.get("x_floor")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.barh([r["impl"] for r in bars], [r["x_floor"] for r in bars])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set(xlabel="time / bare GEMMs (lower is better)",
           title=f"N={head['n']}, H={head['hidden']}, V={head['vocab']}, fwd+bwd - {info['device']}")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "ratio_to_floor.png"), dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/latest", help="folder for every output")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="cuda when a GPU is present (auto), else small CPU cases")
    parser.add_argument("--impl", nargs="*", help="implementations to run (default: all available here)")
    parser.add_argument("--match", nargs="*", help="run only the implementations whose name contains one of these")
    parser.add_argument("--n", type=int, nargs="*", help="override the N grid (H and V of the headline case)")
    parser.add_argument("--calls", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time budget: a case starts only if it is expected to end within it (the "
                             "last case's time scaled by FLOPs); the others are recorded as skipped")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    cases = default_cases(device)
    if args.n:
        cases = [Case(n, cases[0].hidden, cases[0].vocab, b) for n in args.n for b in (True, False)]
    names = [impls.FLOOR] + (args.impl or list(impls.GPU_IMPLEMENTATIONS if device == "cuda"
                                               else impls.CPU_IMPLEMENTATIONS))
    if args.match:
        names = [impls.FLOOR] + [n for n in names[1:] if any(m in n for m in args.match)]
    info = device_info(device)
    print(info)
    os.makedirs(args.out, exist_ok=True)
    start, records, last = time.monotonic(), [], None  # last: (seconds, floor FLOPs) of the latest case run
    for case in cases:
        began = time.monotonic()
        expected = last[0] * case.floor_flops / last[1] if last else 0.0
        skipped = args.max_minutes is not None and began - start + expected > 60 * args.max_minutes
        rows = ([dict(impl=name, status="skipped (time budget)") for name in names] if skipped
                else measure(case, device, names, args.calls))
        if not skipped:
            last = (time.monotonic() - began, case.floor_flops)
        for row in rows:
            records.append({**asdict(case), "phase": case.phase, **row})
            shown = f"{row['ms']:9.2f} ms" if "ms" in row else row["status"]
            extra = f"  x{row['x_floor']:.2f}" if "x_floor" in row else ""
            print(f"N={case.n:6d} H={case.hidden} V={case.vocab:6d} {case.phase:7s} {row['impl']:46s} {shown}{extra}")
        write_outputs(args.out, info, records)


if __name__ == "__main__":
    main()
