"""Issue #15, build point 5: SIGINT or SIGTERM at any point (the warm-up, an evaluation, a step,
a save) ends the run with its last consistent state saved or kept, one line saying so, and the
exit code 130 or 143; the resumed run ends where an uninterrupted one does, bit for bit.

The signal is real: PMI_TRAIN_FAULT makes the process send it to itself at a named point."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train import interrupts  # noqa: E402
from pmi_kernels.train.checkpoint import load_checkpoint  # noqa: E402
from pmi_kernels.train.cli import main as cli_main  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from pmi_kernels.train.run_dir import RUN_MARKER  # noqa: E402
from test_train import tiny, tiny_flags, trainable_snapshot  # noqa: E402


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """The trainable weights of an uninterrupted 3-step run."""
    trainer = Trainer(tiny(tmp_path_factory.mktemp("straight"), max_steps=3))
    trainer.train(progress=False)
    return trainable_snapshot(trainer)


def interrupted_run(tmp_path, capsys, monkeypatch, fault, **overrides):
    """Run `pmi-opsd train` with the fault; returns (exit code, its last stderr line)."""
    monkeypatch.setenv(interrupts.FAULT_ENV, fault)
    interrupts.FAULT_ARRIVALS.clear()
    code = cli_main(["train", *tiny_flags(tmp_path, **{"max_steps": 3, **overrides})])
    monkeypatch.delenv(interrupts.FAULT_ENV)
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def resume_to_the_end(tmp_path):
    trainer = Trainer(tiny(tmp_path, max_steps=3, resume=True))
    trainer.train(progress=False)
    return trainable_snapshot(trainer)


def assert_same_weights(got, want):
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_sigterm_during_the_warmup(tmp_path, capsys, monkeypatch):
    """The warm-up has nothing consistent to save: exit 143 and a line that says so, and the
    directory left empty (but for the run's mark) so a fresh start needs no --overwrite. Fails on the signal killing the
    process silently (the bug) or on a half-warmed base saved as if it were the run's."""
    code, line = interrupted_run(tmp_path, capsys, monkeypatch, "warmup-step@2=SIGTERM", sft_steps=4, sft_batch_size=4)
    assert code == 143
    assert line == "interrupted by SIGTERM during the supervised warm-up: the run had no checkpoint yet; start it again"
    assert os.listdir(tmp_path / "run") == [RUN_MARKER]  # which a fresh start does not count


def test_sigint_during_the_first_evaluation(tmp_path, capsys, monkeypatch, straight_run):
    """Step 0 is saved (checkpoint-0), so the message's "continue with --resume" is true, and the
    resumed run evaluates and trains as the uninterrupted one. Fails on exit 0 (the bug) or on
    advice to resume when no checkpoint exists."""
    code, line = interrupted_run(tmp_path, capsys, monkeypatch, "evaluation-batch@1=SIGINT")
    out = tmp_path / "run"
    assert code == 130
    assert line == (
        f"interrupted by SIGINT during evaluation: {out / 'checkpoint-0'} holds step 0; continue with --resume"
    )
    assert json.loads((out / "result.json").read_text())["interrupted"] == "SIGINT"
    assert_same_weights(resume_to_the_end(tmp_path), straight_run)
    assert [json.loads(row)["step"] for row in open(out / "metrics.jsonl")] == [0, 1, 2, 3, 3]


def test_sigint_during_a_scheduled_evaluation(tmp_path, capsys, monkeypatch):
    """A stop during step 2's evaluation (eval_every 2) saves step 2 without it; the resumed run
    evaluates step 2 before it goes on, so its metrics hold every evaluation the uninterrupted
    run's do, with the same accuracies. Fails on the evaluation never redone (step 2 had none)."""
    flags = dict(max_steps=4, eval_every=2, save_every=100)
    straight = Trainer(tiny(tmp_path / "straight", **flags))
    straight.train(progress=False)

    def evaluations(out):
        return [
            (r["step"], r["eval/accuracy"])
            for r in map(json.loads, open(out / "metrics.jsonl"))
            if "eval/accuracy" in r
        ]

    # The evaluation at step 0 reads batch 1, at step 2 batch 2.
    code, _ = interrupted_run(tmp_path, capsys, monkeypatch, "evaluation-batch@2=SIGINT", **flags)
    assert code == 130 and load_checkpoint(str(tmp_path / "run"))["step"] == 2
    resumed = Trainer(tiny(tmp_path, resume=True, **flags))
    resumed.train(progress=False)
    assert evaluations(tmp_path / "run") == evaluations(tmp_path / "straight" / "run")
    assert_same_weights(trainable_snapshot(resumed), trainable_snapshot(straight))


def test_a_crash_after_the_warmup_can_resume(tmp_path):
    """The toy's warm-up is saved as checkpoint-0 before anything else runs: a run killed before
    its first scheduled save (SIGKILL, no handler runs; here a crash in the first evaluation)
    resumes at step 0 from the warmed-up base. Fails without checkpoint-0 (--resume found no
    checkpoint, and a fresh start needed --overwrite, losing the warm-up)."""
    trainer = Trainer(tiny(tmp_path, sft_steps=2, sft_batch_size=4, save_every=100))

    def crash():
        raise RuntimeError("killed")

    trainer.evaluate = crash
    with pytest.raises(RuntimeError, match="killed"):
        trainer.train(progress=False)
    assert (tmp_path / "run" / "latest").read_text() == "checkpoint-0"
    assert Trainer(tiny(tmp_path, sft_steps=2, sft_batch_size=4, save_every=100, resume=True)).step == 0


def test_sigterm_during_a_step(tmp_path, capsys, monkeypatch, straight_run):
    """At step 2's pack of rollouts (one pack a step), its rollouts sampled: step 2 is abandoned
    (its data position too) and the state after step 1, not saved before, is saved. Fails on a
    half step kept, or its data position kept, so that the resumed run skips its questions."""
    code, line = interrupted_run(tmp_path, capsys, monkeypatch, "step-rollout@2=SIGTERM", save_every=100)
    assert (code, line) == (
        143,
        f"interrupted by SIGTERM during a step: {tmp_path / 'run' / 'checkpoint-1'} "
        "holds step 1; continue with --resume",
    )
    assert load_checkpoint(str(tmp_path / "run"))["position"] == 2
    assert_same_weights(resume_to_the_end(tmp_path), straight_run)


def test_sigterm_during_a_save(tmp_path, capsys, monkeypatch, straight_run):
    """The save in flight completes, then the run stops: checkpoint-2 is whole and pointed to.
    Fails on a save cut short by the signal or a run that goes on after it."""
    code, line = interrupted_run(tmp_path, capsys, monkeypatch, "save-written@2=SIGTERM")
    assert (code, line) == (
        143,
        f"interrupted by SIGTERM during a step: {tmp_path / 'run' / 'checkpoint-2'} "
        "holds step 2; continue with --resume",
    )
    assert load_checkpoint(str(tmp_path / "run"))["step"] == 2
    assert_same_weights(resume_to_the_end(tmp_path), straight_run)


def test_a_stop_ends_the_sampling_at_once(tmp_path):
    """A stop signal that arrives while rollouts are sampled ends generate() after its next token,
    rather than after max_new_tokens (a large model's sampling can outlast the 30 s torchrun
    waits before it kills its workers). Fails on a generate() that ignores the stop."""
    import signal

    trainer = Trainer(tiny(tmp_path, max_new_tokens=60))
    prompts = trainer.prompts["student"][:3]
    trainer.stop.signum = signal.SIGTERM
    stopped = trainer.generate(prompts, 1.0, 1.0, 60)
    trainer.stop.signum = None
    free = trainer.generate(prompts, 1.0, 1.0, 60)
    assert max(map(len, stopped)) <= 1 < max(map(len, free))
