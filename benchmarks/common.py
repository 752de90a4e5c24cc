"""Timing, memory and reporting helpers shared by the benchmark scripts."""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import time

import torch


def device_info(device: str) -> dict:
    import triton
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return info


@contextlib.contextmanager
def cuda_cluster(blocks):
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


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def median_ms(fn, device: str, warmup_ms: float = 200, rep_ms: float = 1000) -> float:
    """Median time of fn() in ms: triton's do_bench (CUDA events) on GPU, wall clock on CPU."""
    if device == "cuda":
        import triton
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def time_ms(fn, device: str) -> float:
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


def median_ms_few(fn, device: str, calls: int = 3, warm_up: bool = True) -> float:
    """Median of a few timed calls after one warm-up (unless the caller just ran fn): for sweeps
    whose large cases take seconds a call, where do_bench's estimate-and-repeat takes minutes."""
    if warm_up:
        fn()
    return statistics.median(time_ms(fn, device) for _ in range(calls))


def peak_extra_gib(fn, keep_bytes: int = 0) -> float:
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


def is_oom(err: Exception) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")
