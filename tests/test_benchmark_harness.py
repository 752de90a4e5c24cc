"""The harness and the result schema, and every benchmark's entry point, on a CPU in seconds:
python -m pytest tests/test_benchmark_harness.py"""

from __future__ import annotations

import dataclasses
import json
import subprocess

import pytest

from benchmarks import BENCHMARKS, harness
from benchmarks.__main__ import main as run_benchmark
from pmi_kernels.backends import REGISTRY


def test_interleaved_alternates_the_order_and_drops_a_tolerated_side():
    calls = []

    def side(name):
        def call():
            calls.append(name)
            if name == "c" and calls.count("c") == 2:  # fails in the first timed round
                raise MemoryError("out of memory")

        return call

    timings = harness.interleaved(
        {n: side(n) for n in "abc"},
        "cpu",
        repeats=3,
        tolerate=lambda err: "OOM" if isinstance(err, MemoryError) else None,
    )
    assert calls == list("abc") + list("abc") + list("ba") + list("ab")
    assert [len(timings[n].samples) for n in "ab"] == [3, 3]
    assert timings["c"].status == "OOM" and timings["c"].ms is None
    assert timings["a"].ms is not None


def test_interleaved_raises_what_it_is_not_told_to_tolerate():
    def broken():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        harness.interleaved({"broken": broken}, "cpu", repeats=1, tolerate=harness.oom_status)


def test_records_round_trip_through_the_one_data_file(tmp_path):
    first = harness.Results("one", str(tmp_path), "cpu")
    first.add("case", "side", "time", 1.5, "ms", n=4)
    first.add("case", "side", "time", 2.0, "ms", "OOM", n=8)
    harness.Results("two", str(tmp_path), "cpu").add_ratio("case", "a", "b", 1.25)
    records = harness.read_records(str(tmp_path))
    assert [r.benchmark for r in records] == ["one", "one", "two"]
    assert records[0] == first.records[0]
    assert records[1].value is None and records[1].status == "OOM"  # no number for a failed side
    assert records[2].side == "a / b" and records[2].unit == "x"
    for record in records:
        assert record.device["device"].startswith("CPU") and record.device["torch"] and record.run
    lines = (tmp_path / harness.DATA_FILE).read_text().splitlines()
    assert set(json.loads(lines[0])) == {f.name for f in dataclasses.fields(harness.Record)}


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_every_benchmark_has_an_entry_point_with_the_common_options(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        run_benchmark([name, "--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    assert f"python -m benchmarks {name}" in usage and "--out" in usage and "--device" in usage


def test_an_unknown_benchmark_is_named():
    done = subprocess.run(
        harness.fresh_process("no_such", []), capture_output=True, text=True, env=harness.fresh_process_env()
    )
    assert done.returncode == 2 and "no_such" in done.stderr and "sweep" in done.stderr


def test_the_sweep_writes_records_a_table_and_ratios_to_the_floor(tmp_path):
    run_benchmark(
        ["sweep", "--device", "cpu", "--n", "16", "--repeats", "1", "--match", "plain torch", "--out", str(tmp_path)]
    )
    records = harness.read_records(str(tmp_path))
    ratios = {r.side for r in records if r.metric == "ratio"}
    assert "plain torch / bare GEMMs" in ratios and {r.benchmark for r in records} == {"sweep"}
    assert (tmp_path / "sweep.md").read_text().count("| 16 |") == 6  # 3 sides x fwd, fwd+bwd


@pytest.mark.skipif(REGISTRY["cpu"].unusable_on("cpu") is not None, reason="the C++ CPU kernel is not built")
def test_the_cpu_benchmark_records_its_interleaved_ratios(tmp_path):
    run_benchmark(
        [
            "cpu",
            "--n",
            "8",
            "--vocab",
            "256",
            "--large-vocab",
            "512",
            "--fused-n",
            "16",
            "--hidden",
            "16",
            "--repeats",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    records = harness.read_records(str(tmp_path))
    ratios = [r for r in records if r.metric == "ratio" and r.side == "torch / cpu"]
    assert len(ratios) == 3 and all(r.value > 0 for r in ratios)
    assert len({r.run for r in records}) == 1
