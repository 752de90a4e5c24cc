"""Issue #28's blind spots in the optimizer step: the learning-rate schedule (warm-up, then
constant, linear or cosine) step by step against its formulas, and a parameter that gets no
gradient stays untouched (AdamW's weight decay too). Under torchrun the same holds for a
parameter no rank has a gradient for (tests/test_train_distributed.py)."""

import math
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import pmi_kernels.train.loop as loop  # noqa: E402
from pmi_kernels.train.config import TrainConfig  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from pmi_kernels.train.step import lr_factor  # noqa: E402
from test_train import tiny, trainable_snapshot  # noqa: E402


def scheduled_factor(schedule: str, warmup: int, max_steps: int, step: int) -> float:
    """The learning rate of step `step` (0-based) over config.lr: a linear warm-up to 1 over
    `warmup` steps (step 0 already at 1/warmup), then the schedule over the remaining steps,
    from 1 to 0 at max_steps and 0 after it."""
    if step < warmup:
        return (step + 1) / warmup
    done = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return {"constant": 1.0, "linear": 1.0 - done, "cosine": (1.0 + math.cos(math.pi * done)) / 2}[schedule]


def test_the_schedule_step_by_step():
    """Random warm-ups and lengths, every schedule, every step to past max_steps (a resumed run
    may hold more steps than max_steps). Fails on a warm-up off by one step, a decay that does not
    start at 1 after the warm-up or end at 0 at max_steps, or a schedule that swings back up."""
    seed = int(torch.randint(2**31 - 1, ()))
    rng = random.Random(seed)
    for _ in range(20):
        schedule, warmup = rng.choice(["constant", "linear", "cosine"]), rng.randint(0, 6)
        max_steps = warmup + rng.randint(1, 12)
        config = TrainConfig(schedule=schedule, warmup_steps=warmup, max_steps=max_steps)
        got = [lr_factor(config, step) for step in range(max_steps + 3)]
        want = [scheduled_factor(schedule, warmup, max_steps, step) for step in range(max_steps + 3)]
        assert got == pytest.approx(want, abs=1e-12), (seed, schedule, warmup, max_steps)
        assert got[warmup] == 1.0 and (schedule == "constant" or got[max_steps] == pytest.approx(0.0, abs=1e-12))


def test_each_step_trains_with_its_scheduled_rate(tmp_path):
    """Three steps of a run with a warm-up of 2 and a cosine decay: each step's optimizer and
    logged lr are config.lr times the formula at that step. Fails on the loop reading the
    schedule at another step than the one it takes."""
    config = tiny(tmp_path, max_steps=3, warmup_steps=2, schedule="cosine", lr=0.01)
    trainer = Trainer(config)
    for step in range(3):
        record = trainer.train_step()
        want = 0.01 * scheduled_factor("cosine", 2, 3, step)
        assert record["lr"] == pytest.approx(want, rel=1e-12) and record["step"] == step + 1
        assert all(group["lr"] == pytest.approx(want, rel=1e-12) for group in trainer.optimizer.param_groups)


def test_a_parameter_without_a_gradient_stays_untouched(tmp_path, monkeypatch):
    """Full fine-tuning with weight decay and one trainable parameter that no forward reads:
    after two steps it is bit for bit what it was, with no gradient and no optimizer state, while
    the others moved. Fails on a missing gradient filled with zeros (AdamW then decays the
    parameter and keeps moment estimates for it)."""
    real_wrap = loop.wrap_model

    def wrap_with_an_unused_parameter(model, config):
        model.register_parameter("unused", torch.nn.Parameter(torch.randn(7)))
        return real_wrap(model, config)

    monkeypatch.setattr(loop, "wrap_model", wrap_with_an_unused_parameter)
    trainer = Trainer(tiny(tmp_path, lora=False, weight_decay=0.5))
    before = trainable_snapshot(trainer)
    assert "unused" in before
    trainer.train_step()
    trainer.train_step()
    after = trainable_snapshot(trainer)
    assert torch.equal(after["unused"], before["unused"]) and trainer.model.unused.grad is None
    assert trainer.model.unused not in trainer.optimizer.state
    assert all(not torch.equal(after[n], before[n]) for n in before if n != "unused" and "norm" not in n)
