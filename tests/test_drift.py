"""Issue #17, point 3: the drift signal (drift.py). Its sums against plain softmax formulas, the
trainer's measure (zero before any update, positive after), and the warning: it fires once on
a runaway and never on a steady run."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train import drift  # noqa: E402
from pmi_kernels.train.config import TrainConfig  # noqa: E402
from pmi_kernels.train.drift import Drift, drift_sums  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import tiny  # noqa: E402


@pytest.mark.parametrize("bias", [False, True])
def test_drift_sums_equal_the_formulas(monkeypatch, bias):
    """KL(p_s || p_b), H(p_s), H(p_b) summed over rows, in chunks of rows. Fails on a swapped KL
    direction, a chunk's rows dropped or counted twice, or the temperature left out."""
    monkeypatch.setattr(drift, "ROWS", 3)  # 7 rows: chunks of 3, 3 and 1
    torch.manual_seed(0)
    s, b = torch.randn(7, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    w, wb = torch.randn(11, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    bs, bb = (torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64)) if bias else (None, None)
    got = drift_sums(s, b, w, bs, wb, bb, temperature=1.7)
    log_s = F.log_softmax(F.linear(s, w, bs) / 1.7, -1)
    log_b = F.log_softmax(F.linear(b, wb, bb) / 1.7, -1)
    want = {
        "kl_student_base": (log_s.exp() * (log_s - log_b)).sum(),
        "entropy_student": -(log_s.exp() * log_s).sum(),
        "entropy_base": -(log_b.exp() * log_b).sum(),
    }
    for key, value in want.items():
        assert got[key] == pytest.approx(float(value), rel=1e-5), key


def test_the_trainer_measures_drift_from_the_frozen_base(tmp_path):
    """At step 0 the student is the base (LoRA's B is zero): KL 0 and equal entropies. After the
    adapter moves, KL > 0. Fails if the 'base' read is the student itself (the adapter left on:
    KL 0 forever, so no warning could ever fire) or the streams are misaligned."""
    trainer = Trainer(tiny(tmp_path, max_new_tokens=8))
    rollouts = trainer.generate([trainer.prompts["student"][i] for i in range(2)], 1.0, 1.0, 8)
    batch = list(enumerate(rollouts))
    before = trainer.drift.measure(trainer.contexts, batch)
    assert before["drift/kl_student_base"] == pytest.approx(0.0, abs=1e-6)
    assert before["drift/entropy_student"] == pytest.approx(before["drift/entropy_base"], rel=1e-6)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    after = trainer.drift.measure(trainer.contexts, batch)
    assert after["drift/kl_student_base"] > 1e-3
    assert after["drift/entropy_base"] == pytest.approx(before["drift/entropy_base"], rel=1e-6)


def test_drift_is_logged_on_the_diagnostics_steps(tmp_path):
    """The trainer's records carry the drift keys on diagnostics steps only."""
    trainer = Trainer(tiny(tmp_path, max_steps=2, diagnostics_every=2))
    first, second = trainer.train_step(), trainer.train_step()
    assert "drift/kl_student_base" not in first
    assert {"drift/kl_student_base", "drift/entropy_student", "drift/entropy_base"} <= set(second)


def test_a_resumed_run_does_not_warn_again(tmp_path):
    """The warning is once per run: a run that warned, stopped and resumed does not warn again.
    Fails on the flag lost with the process (drift/warning at steps 1 and 3)."""
    config = dict(max_steps=2, save_every=1, diagnostics_every=1, drift_warn_kl=1e-12)
    Trainer(tiny(tmp_path, **config)).train(progress=False)
    Trainer(tiny(tmp_path, **{**config, "max_steps": 4, "resume": True})).train(progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [row["step"] for row in rows if row.get("drift/warning")] == [1]
    assert max(row["step"] for row in rows) == 4


def records(kls):
    return [{"drift/kl_student_base": kl, "drift/entropy_student": 1.0, "drift/entropy_base": 0.5} for kl in kls]


def test_the_warning_fires_once_on_a_runaway(capsys):
    """KL growing past drift_warn_kl: one warning, at the step that passes it, saying what to do.
    Fails on no warning (the collapse goes unnoticed) or one every step."""
    watch = Drift(warn_kl=1.0, cause=Drift.advice(TrainConfig(mode="pmi", anchor=False)))
    runaway = records([0.1, 0.4, 0.9, 1.6, 2.5, 4.0])
    for step, record in enumerate(runaway, 1):
        watch.check(step, record)
    err = capsys.readouterr().err
    assert err.count("drifted from the frozen base") == 1 and "step 4:" in err and "--anchor true" in err
    assert [bool(r.get("drift/warning")) for r in runaway] == [False, False, False, True, False, False]


def test_no_warning_on_a_steady_run(capsys):
    """A run whose KL levels off below the threshold, or a threshold of None: silent."""
    for warn_kl, kls in ((1.0, [0.1, 0.3, 0.45, 0.5, 0.49, 0.5, 0.51]), (None, [5.0, 9.0])):
        watch = Drift(warn_kl)
        steady = records(kls)
        for step, record in enumerate(steady, 1):
            watch.check(step, record)
        assert not any("drift/warning" in r for r in steady)
    assert capsys.readouterr().err == ""


def test_the_warning_fires_only_past_the_threshold(capsys):
    """A KL exactly at drift_warn_kl is not past it; the next float above it is. Fails on a
    threshold compared with >= (a warning at the default 0.3 itself) or one that lets a KL just
    above it pass."""
    for warn_kl in (0.3, float(torch.rand(())) * 2):
        at, above = Drift(warn_kl), Drift(warn_kl)
        at_record, above_record = records([warn_kl, math.nextafter(warn_kl, math.inf)])
        at.check(1, at_record)
        above.check(1, above_record)
        assert "drift/warning" not in at_record and above_record.get("drift/warning") is True, warn_kl
    assert capsys.readouterr().err.count("drifted from the frozen base") == 2
