"""Issue #15, build point 4: a non-empty output directory is refused without --resume unless
--overwrite; --resume continues the run that is there (same config, keys meant to change
excepted), cuts metrics.jsonl back to the resumed step, and needs the toy base saved with it."""

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train.cli import main as cli_main  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import tiny, tiny_flags, trainable_snapshot  # noqa: E402

TIMINGS = ("tokens_per_s", "peak_memory_gib")  # and the time/<part> split


@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory):
    """A finished 3-step run saved at steps 2 and 3, and its final trainable weights."""
    root = tmp_path_factory.mktemp("three-step")
    trainer = Trainer(tiny(root, max_steps=3, save_every=2))
    trainer.train(progress=False)
    return root, trainable_snapshot(trainer)


def copy_run(three_step_run, tmp_path):
    shutil.copytree(three_step_run[0] / "run", tmp_path / "run")
    return tmp_path / "run"


def rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_a_second_run_is_refused_and_overwrite_replaces_only_what_a_run_wrote(three_step_run, tmp_path, capsys):
    """Without --resume the run in the directory is left exactly as it was (exit 2); with
    --overwrite a fresh run replaces its files, a user's file stays. Fails on a second run that
    prunes the first's checkpoints and appends to its metrics (steps 0,1,2,3,3,0,1,1: the bug)."""
    out = copy_run(three_step_run, tmp_path)
    (out / "notes.txt").write_text("mine")
    before = sorted(os.listdir(out)), (out / "metrics.jsonl").read_bytes()
    assert cli_main(["train", *tiny_flags(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (sorted(os.listdir(out)), (out / "metrics.jsonl").read_bytes()) == before
    assert cli_main(["train", *tiny_flags(tmp_path, max_steps=1), "--overwrite"]) == 0
    assert [row["step"] for row in rows(out)] == [0, 1, 1]
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-1"]
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_removes_nothing_until_the_new_run_checks_out(three_step_run, tmp_path, capsys):
    """--overwrite with a config the run then refuses (a LoRA target the model lacks, a rollout
    longer than its positions) leaves the old run whole. Fails on the old run deleted first, as
    it was before the checks (the directory emptied, and the new run never started)."""
    out = copy_run(three_step_run, tmp_path)
    before = {
        name: sorted(os.listdir(out / name)) if os.path.isdir(out / name) else (out / name).read_bytes()
        for name in os.listdir(out)
    }
    for flags, key in ((["--lora-targets", "q_prj"], "lora_targets"), (["--max-new-tokens", "600"], "max_new_tokens")):
        assert cli_main(["train", *tiny_flags(tmp_path), "--overwrite", *flags]) == 2
        assert key in capsys.readouterr().err
        assert {
            name: sorted(os.listdir(out / name)) if os.path.isdir(out / name) else (out / name).read_bytes()
            for name in os.listdir(out)
        } == before


def test_overwrite_leaves_files_no_trainer_wrote(tmp_path, capsys):
    """A directory no run began in (no run mark) with files named as a trainer's (another tool's
    checkpoint-500/, result.json, tensorboard/): --overwrite refuses and removes nothing. Fails
    on files removed by their names alone."""
    out = tmp_path / "run"
    (out / "checkpoint-500").mkdir(parents=True)
    (out / "tensorboard").mkdir()
    (out / "result.json").write_text("{}")
    assert cli_main(["train", *tiny_flags(tmp_path), "--overwrite"]) == 2
    assert "no trainer's run began there" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["checkpoint-500", "result.json", "tensorboard"]


def test_one_run_at_a_time_in_a_directory(tmp_path):
    """While a run holds its output directory, a second (a resubmitted job, a requeue) is refused
    by name before it touches anything; once the first has trained, or a run has failed to start,
    the directory is free.
    Fails without the lock (two runs wrote into one directory: a crash in the pruning and steps
    written twice into metrics.jsonl)."""
    first = Trainer(tiny(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="output_dir .* in use by another run"):
        Trainer(tiny(tmp_path, max_steps=2, resume=True))
    first.train(progress=False)
    with pytest.raises(ValueError, match="lora_targets") as failed:  # held by the error's traceback
        Trainer(tiny(tmp_path, max_steps=2, resume=True, lora_targets=["q_prj"], allow_config_change=["lora_targets"]))
    assert failed.value is not None and Trainer(tiny(tmp_path, max_steps=2, resume=True)).step == 1


def test_abbreviated_flags_are_refused(tmp_path, capsys):
    """--max-step is a typo, not --max-steps (argparse would take a unique prefix). Fails with
    abbreviations allowed."""
    with pytest.raises(SystemExit):
        cli_main(["train", *tiny_flags(tmp_path), "--max-step", "3"])
    assert "unrecognized arguments: --max-step" in capsys.readouterr().err


def test_resume_refuses_changed_keys_by_name(three_step_run, tmp_path):
    """Changed loss options or LoRA rank are refused by name before the model loads; the keys
    meant to change are accepted, and --allow-config-change accepts the others. Fails on a
    silent change of the loss (the bug), or the raw size mismatch a different lora_rank gave."""
    copy_run(three_step_run, tmp_path)
    refused = r"lora_rank \(8 -> 4\); beta \(1.0 -> 2.0\).* --allow-config-change lora_rank,beta"
    with pytest.raises(ValueError, match=refused):
        Trainer(tiny(tmp_path, max_steps=3, save_every=2, resume=True, beta=2.0, lora_rank=4))
    with pytest.raises(ValueError, match=r"differs from the run's in beta \(1.0 -> 3.0\); use"):
        Trainer(tiny(tmp_path, max_steps=3, resume=True, beta=3.0, allow_config_change=["lora_rank"]))
    trainer = Trainer(
        tiny(
            tmp_path,
            max_steps=5,
            save_every=1,
            eval_every=2,
            log_every=2,
            keep_checkpoints=3,
            resume=True,
            beta=2.0,
            allow_config_change=["beta"],
        )
    )
    assert trainer.step == 3 and trainer.config.beta == 2.0


def test_a_bare_resume_continues_the_runs_config(three_step_run, tmp_path, capsys):
    """`pmi-opsd train --output-dir DIR --resume` (no other flag) continues the run with the keys
    it was started with; a key given overrides, and is checked as any. Fails when a bare
    --resume took the defaults and was refused for every key the run had set."""
    out = copy_run(three_step_run, tmp_path)
    trained = [row["loss"] for row in rows(out) if "loss" in row]
    shutil.rmtree(out / "checkpoint-3")
    (out / "latest").write_text("checkpoint-2")
    assert cli_main(["train", "--output-dir", str(out), "--resume"]) == 0, capsys.readouterr().err
    assert [row["loss"] for row in rows(out) if "loss" in row] == trained  # step 3 again, the same
    assert cli_main(["train", "--output-dir", str(out), "--resume", "--beta", "2"]) == 2
    assert "beta (1.0 -> 2.0)" in capsys.readouterr().err


def test_metrics_are_cut_back_to_the_resumed_step(three_step_run, tmp_path):
    """A run killed after logging step 3 but before checkpoint-3 was durable resumes from
    checkpoint-2: its metrics hold each step once, a half-written last line is dropped, and the
    weights equal the uninterrupted run's. Fails on rows after the checkpoint appearing twice."""
    out = copy_run(three_step_run, tmp_path)
    (out / "latest").write_text("checkpoint-2")
    shutil.rmtree(out / "checkpoint-3")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "lo')
    want = rows(three_step_run[0] / "run")
    trainer = Trainer(tiny(tmp_path, max_steps=3, save_every=2, resume=True))
    assert [row["step"] for row in rows(out)] == [0, 1, 2]
    trainer.train(progress=False)
    got = rows(out)

    def measured(key):
        return key in TIMINGS or key.startswith("time/")

    assert [{k: v for k, v in row.items() if not measured(k)} for row in got] == [
        {k: v for k, v in row.items() if not measured(k)} for row in want
    ]
    final = trainable_snapshot(trainer)
    assert all(torch.equal(final[n], three_step_run[1][n]) for n in final)


def test_resuming_a_finished_run_evaluates_again_without_a_duplicate_row(three_step_run, tmp_path):
    """Fails on the final evaluation's row written twice at the last step."""
    out = copy_run(three_step_run, tmp_path)
    before = rows(out)
    result = Trainer(tiny(tmp_path, max_steps=3, save_every=2, resume=True)).train(progress=False)
    assert result["accuracy_after"] is not None and result["steps"] == 3
    assert [row["step"] for row in rows(out)] == [row["step"] for row in before] == [0, 1, 2, 3, 3]
    # Resumed again with max_steps below the step it holds: it trains nothing and evaluates again.
    result = Trainer(tiny(tmp_path, max_steps=2, save_every=2, resume=True)).train(progress=False)
    assert result["steps"] == 3 and [row["step"] for row in rows(out)] == [0, 1, 2, 3, 3]


def test_the_toy_base_is_saved_with_the_run_and_required_to_resume(three_step_run, tmp_path):
    """Fails on a resume that silently builds a different toy base when toy-base/ is gone."""
    out = copy_run(three_step_run, tmp_path)
    assert (out / "toy-base" / "config.json").is_file()
    shutil.rmtree(out / "toy-base")
    with pytest.raises(ValueError, match=f"{out / 'toy-base'} is missing"):
        Trainer(tiny(tmp_path, max_steps=3, save_every=2, resume=True))


def test_a_resumed_run_reports_the_accuracy_before_training(tmp_path, capsys):
    """result.json of a run stopped after step 1 and resumed to step 2 holds the accuracy its first
    start measured before training, as the uninterrupted run's does. Fails on null (the bug: the
    resumed run had not evaluated at step 0 itself)."""
    straight = Trainer(tiny(tmp_path / "straight", max_steps=2)).train(progress=False)
    assert cli_main(["train", *tiny_flags(tmp_path, max_steps=1)]) == 0
    assert cli_main(["train", *tiny_flags(tmp_path, max_steps=2), "--resume"]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["steps"] == 2 and straight["accuracy_before"] is not None
    assert result["accuracy_before"] == straight["accuracy_before"]
    assert f"accuracy before training: {straight['accuracy_before']:.3f}" in capsys.readouterr().out
