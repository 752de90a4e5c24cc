"""Issue #15, build point 2: a step whose loss or gradients are not finite is skipped (no
optimizer update), counted and logged; max_nonfinite_steps of them in a row stop the run with a
clear message and exit code 1; a non-finite parameter never reaches a checkpoint."""

import copy
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train import step as step_parts  # noqa: E402
from pmi_kernels.train.checkpoint import load_checkpoint  # noqa: E402
from pmi_kernels.train.cli import main as cli_main  # noqa: E402
from pmi_kernels.train.interrupts import TrainingFailed  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import tiny, tiny_flags, trainable_snapshot  # noqa: E402


def poison_loss(monkeypatch, poisoned=lambda: True):
    """The trainer's loss (and so every gradient) is NaN while poisoned() holds: a non-finite step
    from outside the loss's checks, which refuse any option that would make one."""
    real = step_parts.fused_pmi_kl

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        return value * float("nan") if poisoned() else value

    monkeypatch.setattr(step_parts, "fused_pmi_kl", loss)


def strict_json(line):
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_a_nonfinite_step_is_skipped_counted_and_logged(tmp_path, capsys, monkeypatch):
    """Step 2 of 3 has a NaN loss: its update is skipped (the weights and the optimizer state
    stay as they were), its row says so with loss null, stderr says so, the good step 3 resets
    the count in a row, and checkpoint-2 holds finite weights. Fails on: the optimizer stepping on
    a NaN loss (the bug: checkpoint-3 held NaN weights and checkpoint-2 was deleted); a skipped
    step not counted or not logged; NaN written into metrics.jsonl (not JSON)."""
    trainer = Trainer(tiny(tmp_path, max_steps=3))
    before, real_step = {}, trainer.train_step
    poison_loss(monkeypatch, lambda: trainer.step == 1)

    def step():
        before[trainer.step] = (trainable_snapshot(trainer), copy.deepcopy(trainer.optimizer.state_dict()["state"]))
        return real_step()

    trainer.train_step = step
    trainer.train(progress=False)
    after = trainable_snapshot(trainer)
    assert all(torch.equal(before[1][0][n], before[2][0][n]) for n in after), "the skipped step updated weights"
    optimizer_before, optimizer_after = before[1][1], before[2][1]
    assert optimizer_before.keys() == optimizer_after.keys() and all(
        torch.equal(entry[k], optimizer_after[i][k]) for i, entry in optimizer_before.items() for k in entry
    ), "the skipped step updated the optimizer state"
    assert any(not torch.equal(before[2][0][n], after[n]) for n in after), "the step after it did not train"
    rows = [strict_json(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = {row["step"]: row for row in rows if "loss" in row}
    assert steps[2]["skipped"] and steps[2]["loss"] is None and steps[2]["nonfinite_steps"] == 1
    assert not steps[3]["skipped"] and steps[3]["nonfinite_steps"] == 1 and trainer.nonfinite_in_a_row == 0
    assert "step 2: the loss or a gradient is not finite; step skipped" in capsys.readouterr().err
    saved = load_checkpoint(str(tmp_path / "run"))  # checkpoint-3; checkpoint-2 is kept too
    assert all(torch.isfinite(t).all() for t in saved["trainable"].values())
    assert os.path.isdir(tmp_path / "run" / "checkpoint-2")


def test_nonfinite_steps_in_a_row_stop_the_run_with_exit_1(tmp_path, capsys, monkeypatch):
    """Every step NaN: the run stops after max_nonfinite_steps of them with a one-line message and
    exit code 1, and no checkpoint holds a non-finite value. Fails on a run that trains on (or
    exits 0, as it did) through NaN steps."""
    out = tmp_path / "run"
    poison_loss(monkeypatch)
    assert cli_main(["train", *tiny_flags(tmp_path, max_steps=6, max_nonfinite_steps=2)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: stopped at step 2: 2 steps in a row had a non-finite loss or gradient"), err
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-1"]
    state = load_checkpoint(str(out))
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_a_nonfinite_parameter_never_reaches_a_checkpoint(tmp_path):
    """A NaN weight (from anywhere) makes save() refuse, naming it; the newest checkpoint stays.
    Fails on a save that writes whatever the weights hold."""
    trainer = Trainer(tiny(tmp_path))
    trainer.train_step()
    trainer.save()
    trainer.train_step()
    name, param = next((n, p) for n, p in trainer.model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        param[0] = float("nan")
    with pytest.raises(TrainingFailed, match=f"step 2: {name} is not finite; not saved, .* still checkpoint-1"):
        trainer.save()
    out = tmp_path / "run"
    assert (out / "latest").read_text() == "checkpoint-1" and not (out / "checkpoint-2").exists()
    assert not [p for p in os.listdir(out) if ".tmp-" in p]
