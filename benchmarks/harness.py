"""The one harness every benchmark uses: argument parsing, the device description, timing
(the sides of a comparison interleaved in one run), memory, and the one result schema.

Every measurement is a `Record` (one value of one metric of one side of one case), appended
as a JSON line to `<out>/results.jsonl`, the one data file of a results directory; each record
carries the device description and the run it belongs to, so the ratios a reader forms are
between records of the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

DATA_FILE = "results.jsonl"
RESULTS_ROOT = os.path.join("benchmarks", "results")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


# ---- the result schema -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Record:
    """One measured value. `value` is None when `status` is not "ok" (OOM, not installed,
    skipped by the time budget, unavailable here)."""

    benchmark: str  # the name `python -m benchmarks <name>` runs
    case: str  # what was measured, e.g. "fused_pmi_kl fwd+bwd N=8192 H=4096 V=151936"
    side: str  # the implementation or variant; a ratio's is "a / b"
    metric: str  # "time", "peak_extra_memory", "ratio", "throughput", ...
    value: float | None
    unit: str  # "ms", "GiB", "x", "tokens/s", "bytes", ...
    status: str = "ok"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # shapes, dtype, phase, repeats
    device: dict[str, Any] = dataclasses.field(default_factory=dict)  # describe_device()
    run: str = ""  # when the run began (ISO 8601, UTC): the records of one run share it


class Results:
    """The records of one run of one benchmark, appended to `<out>/results.jsonl` as they are
    measured (a run cut short keeps what it measured)."""

    def __init__(self, benchmark: str, out: str, device: str):
        self.benchmark, self.out, self.device_name = benchmark, out, device
        self.device = describe_device(device)
        self.run = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.path = os.path.join(out, DATA_FILE)
        self.records: list[Record] = []
        os.makedirs(out, exist_ok=True)

    def add(
        self, case: str, side: str, metric: str, value: float | None, unit: str, status: str = "ok", **params: Any
    ) -> Record:
        device = dict(self.device)
        if self.device_name == "cpu":  # what else the machine ran meanwhile
            device["load_average"] = [round(x, 2) for x in os.getloadavg()]
        record = Record(
            self.benchmark,
            case,
            side,
            metric,
            None if status != "ok" else value,
            unit,
            status,
            params,
            device,
            self.run,
        )
        self.records.append(record)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(dataclasses.asdict(record)) + "\n")
        return record

    def add_time(self, case: str, timing: Timing, **params: Any) -> Record:
        return self.add(
            case, timing.side, "time", timing.ms, "ms", timing.status, repeats=len(timing.samples), **params
        )

    def add_ratio(self, case: str, numerator: str, denominator: str, value: float, **params: Any) -> Record:
        return self.add(case, f"{numerator} / {denominator}", "ratio", value, "x", **params)

    def close(self) -> None:
        print(f"wrote {len(self.records)} records to {self.path}")


def read_records(path: str) -> list[Record]:
    """The records of a data file (or of `<path>/results.jsonl` when given a folder)."""
    if os.path.isdir(path):
        path = os.path.join(path, DATA_FILE)
    with open(path) as fh:
        return [Record(**json.loads(line)) for line in fh if line.strip()]


# ---- arguments and the device ------------------------------------------------------------------
def parser(
    name: str,
    doc: str | None,
    *,
    devices: Sequence[str] = ("auto", "cuda", "cpu"),
    repeats: int | None = None,
    dtype: str | None = None,
    n: int | list[int] | None = None,
    hidden: int | None = None,
    vocab: int | None = None,
) -> argparse.ArgumentParser:
    """The options every benchmark shares: --out and --device always; --repeats, --dtype and the
    shapes (--n, --hidden, --vocab) where the benchmark has a default for them. A list default
    of --n makes it take several values."""
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks {name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", help=f"results folder; the records go to its {DATA_FILE} (default {RESULTS_ROOT}/<device>-<date>)"
    )
    p.add_argument(
        "--device",
        choices=list(devices),
        default=devices[0],
        help="auto: cuda when a GPU is present, else cpu" if "auto" in devices else None,
    )
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats, help="timed rounds of the interleaved sides")
    if dtype is not None:
        p.add_argument(
            "--dtype",
            choices=["auto", *DTYPES],
            default=dtype,
            help="auto: bf16 on a GPU, fp32 on a CPU" if dtype == "auto" else None,
        )
    if n is not None:
        many = isinstance(n, list)
        p.add_argument("--n", type=int, nargs="+" if many else None, default=n, help="tokens (rows)")
    if hidden is not None:
        p.add_argument("--hidden", type=int, default=hidden, help="hidden size H")
    if vocab is not None:
        p.add_argument("--vocab", type=int, default=vocab, help="vocabulary size V")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fills what the parser left to the machine: the device, the dtype and the output folder."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if getattr(args, "dtype", None) is not None:
        name = args.dtype if args.dtype != "auto" else ("bf16" if args.device == "cuda" else "fp32")
        args.dtype = DTYPES[name]
    if args.out is None:
        args.out = default_out(args.device)
    return args


def require_cuda(args: argparse.Namespace, what: str) -> None:
    """GPU benchmarks run on a CPU only when asked (--device cpu: a check of the script)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"{what} needs a CUDA GPU (--device cpu with small shapes checks the script on a CPU)")


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def describe_device(device: str) -> dict[str, Any]:
    """What a result was measured on: the device, torch, Triton, Python, the date."""
    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=torch.cuda.get_device_name(0),
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        info.update(
            device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            threads=torch.get_num_threads(),
        )
    return info


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def default_out(device: str) -> str:
    """benchmarks/results/<device>-<date>: "cpu", or the GPU's name less "nvidia" ("h200")."""
    short = "cpu" if device == "cpu" else slug(torch.cuda.get_device_name(0)).replace("nvidia-", "")
    return os.path.join(RESULTS_ROOT, f"{short}-{datetime.date.today().isoformat()}")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def fresh_process(name: str, argv: Sequence[str]) -> list[str]:
    """The command that runs benchmark `name` with `argv` in a fresh Python process (for
    measurements one process must not share with another, such as peak resident memory)."""
    return [sys.executable, "-m", "benchmarks", name, *argv]


def fresh_process_env() -> dict[str, str]:
    """The environment for fresh_process: this package's folder importable from anywhere."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


# ---- timing ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    """One side's calls in an interleaved run: the median, or why there is none."""

    side: str
    samples: list[float] = dataclasses.field(default_factory=list)
    status: str = "ok"

    @property
    def ms(self) -> float | None:
        return statistics.median(self.samples) if self.status == "ok" and self.samples else None


def time_ms(fn: Callable[[], Any], device: str) -> float:
    """One call of fn in ms: CUDA events on a GPU, the wall clock on a CPU."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1000


def interleaved(
    sides: dict[str, Callable[[], Any]],
    device: str,
    repeats: int,
    tolerate: Callable[[Exception], str | None] | None = None,
    warm_up: bool = True,
) -> dict[str, Timing]:
    """Each side called once to warm up (unless the caller just did), then `repeats` rounds with
    every side called once a round (the order reversed every other round), so a machine that
    slows down or speeds up during the run moves every side alike. `tolerate(err)` names the
    status of a side whose call raised (e.g. "OOM"); that side leaves the run. Other errors
    propagate."""
    timings = {name: Timing(name) for name in sides}

    def call(name: str, timed: bool) -> None:
        try:
            if timed:
                timings[name].samples.append(time_ms(sides[name], device))
            else:
                sides[name]()
        except Exception as err:  # noqa: BLE001 (tolerate decides; anything else is raised)
            status = tolerate(err) if tolerate else None
            if status is None:
                raise
            timings[name].status = status
            empty_cuda_cache(device)

    if warm_up:
        for name in sides:
            call(name, timed=False)
    for round_ in range(repeats):
        order = list(sides) if round_ % 2 == 0 else list(sides)[::-1]
        for name in order:
            if timings[name].status == "ok":
                call(name, timed=True)
    return timings


def median_ms(fn: Callable[[], Any], device: str, warmup_ms: float = 200, rep_ms: float = 1000) -> float:
    """Median time of one side alone (no comparison in the same run): triton's do_bench on a GPU,
    the wall clock on a CPU."""
    if device == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        times.append(time_ms(fn, device))
    return statistics.median(times)


def median_ms_few(fn: Callable[[], Any], device: str, calls: int = 3, warm_up: bool = True) -> float:
    """Median of a few timed calls after one warm-up (unless the caller just ran fn): for sweeps
    whose large cases take seconds a call, where do_bench's estimate-and-repeat takes minutes."""
    if warm_up:
        fn()
    return statistics.median(time_ms(fn, device) for _ in range(calls))


# ---- memory and errors -------------------------------------------------------------------------
def peak_extra_gib(fn: Callable[[], Any], keep_bytes: int = 0) -> float:
    """CUDA peak memory during fn() beyond what was allocated before it and the `keep_bytes`
    of results it returns (the gradients a caller asked for)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return (peak - before - keep_bytes) / 2**30


def empty_cuda_cache(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def is_oom(err: Exception) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def oom_status(err: Exception) -> str | None:
    """For interleaved(tolerate=...): an out-of-memory side is a result ("OOM")."""
    return "OOM" if is_oom(err) else None


@contextlib.contextmanager
def cuda_cluster(blocks: int | None) -> Iterator[None]:
    """PMI_KERNELS_CUDA_CLUSTER=blocks for the block (None: unset), read at each CUDA launch:
    the CUDA kernel with each row split over a cluster of that many blocks (Hopper)."""
    before = os.environ.pop("PMI_KERNELS_CUDA_CLUSTER", None)
    if blocks is not None:
        os.environ["PMI_KERNELS_CUDA_CLUSTER"] = str(blocks)
    try:
        yield
    finally:
        os.environ.pop("PMI_KERNELS_CUDA_CLUSTER", None)
        if before is not None:
            os.environ["PMI_KERNELS_CUDA_CLUSTER"] = before


def in_cluster(fn: Callable[[], Any], blocks: int | None) -> Callable[[], Any]:
    """fn run with cuda_cluster(blocks): a side of an interleaved run with its own cluster size."""

    def run() -> Any:
        with cuda_cluster(blocks):
            return fn()

    return run
