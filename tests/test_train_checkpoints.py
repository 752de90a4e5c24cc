"""Issue #15, build point 3 (and #18, item 4): checkpoints are written to a temporary directory,
made durable, renamed, and only then pointed to by `latest`, itself replaced by rename; the
newest k are kept and only checkpoint-<digits> is ever pruned; stale temporaries go at start;
state loads with weights_only=True; a bad checkpoint is a one-line error naming the file and
the other checkpoints."""

import contextlib
import errno
import os
import pickle
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import pmi_kernels.train.checkpoint as checkpoint  # noqa: E402
from pmi_kernels.train.cli import main as cli_main  # noqa: E402
from pmi_kernels.train.interrupts import TrainingFailed  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from pmi_kernels.train.run_dir import RUN_MARKER  # noqa: E402
from test_train import tiny, tiny_flags  # noqa: E402


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A finished 2-step run (checkpoint-1 and checkpoint-2), copied by each test that breaks it."""
    root = tmp_path_factory.mktemp("two-step")
    Trainer(tiny(root)).train(progress=False)
    return root


def copy_run(two_step_run, tmp_path):
    shutil.copytree(two_step_run / "run", tmp_path / "run")
    return tmp_path / "run"


def test_keeps_the_newest_k_and_prunes_only_its_own_names(two_step_run, tmp_path):
    """Resumed twice with keep_checkpoints 2 then 1: the older checkpoint-<digits> go, a user's
    checkpoint-best-backup/ and checkpoint-2.bak stay. Fails on pruning every name that starts with
    'checkpoint-' (the bug) or on keeping only the newest whatever keep_checkpoints says."""
    out = copy_run(two_step_run, tmp_path)
    (out / "checkpoint-best-backup").mkdir()
    (out / "checkpoint-best-backup" / "weights").write_text("precious")
    (out / "checkpoint-2.bak").write_text("precious")
    user = {"checkpoint-best-backup", "checkpoint-2.bak"}
    Trainer(tiny(tmp_path, max_steps=4, resume=True)).train(progress=False)
    assert {p for p in os.listdir(out) if p.startswith("checkpoint")} == {"checkpoint-3", "checkpoint-4"} | user
    Trainer(tiny(tmp_path, max_steps=5, resume=True, keep_checkpoints=1)).train(progress=False)
    assert {p for p in os.listdir(out) if p.startswith("checkpoint")} == {"checkpoint-5"} | user
    assert (out / "checkpoint-best-backup" / "weights").read_text() == "precious"


def test_stale_temporaries_are_removed_at_start(two_step_run, tmp_path):
    """What a killed save leaves (.checkpoint-N.tmp-PID/, .latest.tmp-PID, ...) is removed when
    the run resumes; other dot files are not. Fails on temporaries that pile up (on a small disk
    they kept a resumed run from saving)."""
    out = copy_run(two_step_run, tmp_path)
    stale = [".checkpoint-3.tmp-999", ".toy-base.tmp-12"]
    for name in stale:
        (out / name).mkdir()
        (out / name / "state.pt").write_bytes(b"partial")
    (out / ".latest.tmp-999").write_text("checkpoint-3")
    (out / ".metrics.jsonl.tmp-5").write_text("")
    (out / ".checkpoint-notes.tmp-mine").write_text("a user's file")
    Trainer(tiny(tmp_path, max_steps=2, resume=True))
    assert sorted(p for p in os.listdir(out) if p.startswith(".")) == [".checkpoint-notes.tmp-mine", RUN_MARKER]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BREAKAGES = {
    "empty-state": lambda out: (out / "checkpoint-2" / "state.pt").write_bytes(b""),
    "truncated-state": lambda out: _truncate(out / "checkpoint-2" / "state.pt"),
    "garbage-state": lambda out: (out / "checkpoint-2" / "state.pt").write_bytes(b"\x80\x02garbage" * 50),
    "missing-state": lambda out: (out / "checkpoint-2" / "state.pt").unlink(),
    "corrupt-meta": lambda out: (out / "checkpoint-2" / "checkpoint.json").write_text('{"step": '),
    "dangling-latest": lambda out: (out / "latest").write_text("checkpoint-9"),
    "missing-latest": lambda out: (out / "latest").unlink(),
    "empty-latest": lambda out: (out / "latest").write_text(""),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_bad_checkpoint_is_a_one_line_error_naming_the_file(two_step_run, tmp_path, capsys, breakage):
    """--resume on a broken checkpoint exits 2 with one line naming the file and the checkpoint
    that is still there. Fails on the raw UnpicklingError/EOFError/FileNotFoundError."""
    out = copy_run(two_step_run, tmp_path)
    BREAKAGES[breakage](out)
    assert cli_main(["train", *tiny_flags(tmp_path, max_steps=3), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    named = {"missing-latest": "latest", "empty-latest": "latest", "dangling-latest": "checkpoint-9"}.get(
        breakage, "checkpoint-2"
    )
    assert err.startswith(f"error: --resume: {out / named}"), err
    assert "other checkpoints here: checkpoint-" in err, err


def test_a_damaged_toy_base_is_a_one_line_error(two_step_run, tmp_path, capsys):
    """--resume with the toy run's base damaged: exit 2, one line naming toy-base. Fails on the
    raw SafetensorError traceback."""
    out = copy_run(two_step_run, tmp_path)
    _truncate(out / "toy-base" / "model.safetensors")
    assert cli_main(["train", *tiny_flags(tmp_path, max_steps=3), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"error: --resume: {out / 'toy-base'}, the toy run's warmed-up base"), err


class RunsCode:
    """A pickled object that, when unpickled, creates a file: what weights_only=True refuses."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@contextlib.contextmanager
def immutable(path):
    """The file made immutable (chattr +i: not writable even by root), for the block."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("how", ["--resume", "--overwrite"])
def test_a_file_the_run_cannot_replace_is_refused_first(two_step_run, tmp_path, capsys, how):
    """An immutable metrics.jsonl: --resume (which replaces it) and --overwrite (which removes it)
    exit 2 with one line naming it, before anything is removed. Fails on the PermissionError
    traceback they raised once the model had loaded, --overwrite having removed the checkpoints."""
    out = copy_run(two_step_run, tmp_path)
    before = sorted(os.listdir(out))
    with immutable(out / "metrics.jsonl"):
        assert cli_main(["train", *tiny_flags(tmp_path, max_steps=3), how]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "metrics.jsonl is read-only" in err, err
    assert sorted(os.listdir(out)) == before


def test_loading_runs_no_code_from_the_checkpoint(two_step_run, tmp_path):
    """state.pt is read with torch.load(weights_only=True). Fails on weights_only=False, which
    runs whatever a checkpoint file contains."""
    out = copy_run(two_step_run, tmp_path)
    marker = tmp_path / "code-ran"
    state = torch.load(out / "checkpoint-2" / "state.pt", weights_only=True)
    state["payload"] = RunsCode(str(marker))
    torch.save(state, out / "checkpoint-2" / "state.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ValueError, match="state.pt: cannot be read") as err:
        Trainer(tiny(tmp_path, max_steps=3, resume=True))
    assert not marker.exists()
    assert "\n" not in str(err.value)  # torch's refusal runs to many lines; the error is one


def test_latest_is_replaced_by_rename_never_written_in_place(tmp_path, monkeypatch):
    """A failure while the pointer's text is being written (disk full, a kill) leaves `latest`
    naming the previous checkpoint, and a save gives `latest` a new inode (a rename). Fails if
    `latest` is written in place: opening it for writing empties it before the new name is in."""
    trainer = Trainer(tiny(tmp_path))
    trainer.train_step()
    trainer.save()
    out = tmp_path / "run"
    inode = (out / "latest").stat().st_ino
    trainer.train_step()
    trainer.save()
    assert (out / "latest").stat().st_ino != inode
    trainer.train_step()

    class FailingWrite:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, text):
            raise OSError("No space left on device")

    def open_failing_for_latest(path, mode="r", *args, **kwargs):
        fh = open(path, mode, *args, **kwargs)
        return FailingWrite(fh) if "latest" in os.path.basename(path) and "w" in mode else fh

    monkeypatch.setattr(checkpoint, "open", open_failing_for_latest, raising=False)
    with pytest.raises(
        TrainingFailed, match="while saving checkpoint-3 .* the previous checkpoint, checkpoint-2, is intact"
    ):
        trainer.save()
    assert (out / "latest").read_text() == "checkpoint-2"
    assert checkpoint.load_checkpoint(str(out))["step"] == 2


def fail_the_save_of(step: int, failure: str):
    """A torch.save that fails for `step`'s checkpoint, as it does on a full disk: a partial file,
    then RuntimeError (torch carries no errno), or OSError(ENOSPC) for "enospc"."""
    real = torch.save

    def save(state, path, *args, **kwargs):
        if state.get("step") != step:
            return real(state, path, *args, **kwargs)
        with open(path, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        if failure == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    return save


@pytest.mark.parametrize("failure", ["torch-runtime-error", "enospc", "write-error"])
def test_a_full_disk_during_a_save_is_one_line_and_the_run_resumes(
    two_step_run, tmp_path, capsys, monkeypatch, failure
):
    """The save of checkpoint-2 fails as on a full disk: exit 1 and one line saying so and that
    checkpoint-1 is intact; no partial copy is left; the run then resumes to the uninterrupted
    run's weights. A failed write on a disk with room ("write-error") says the write was refused.
    Fails on the chained RuntimeError traceback (the bug), a partial copy left behind, or
    `latest` moved."""
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint.torch, "save", fail_the_save_of(2, failure))
    if failure == "torch-runtime-error":
        real_usage = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda path: real_usage(path)._replace(free=2**20))
    assert cli_main(["train", *tiny_flags(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    why = (
        "the system refused a write (RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 704 "
        "vs 598)"
        if failure == "write-error"
        else "no space left on the device"
    )
    assert err == (
        f"error: {why} while saving checkpoint-2 in {out}; the previous checkpoint, checkpoint-1, is "
        "intact: continue from it with --resume once the disk has room"
    )
    assert (out / "latest").read_text() == "checkpoint-1" and not [p for p in os.listdir(out) if ".tmp-" in p]
    assert checkpoint.load_checkpoint(str(out))["step"] == 1
    monkeypatch.undo()
    assert cli_main(["train", *tiny_flags(tmp_path), "--resume"]) == 0
    got, want = (
        torch.load(run / "checkpoint-2" / "state.pt", weights_only=True) for run in (out, two_step_run / "run")
    )
    assert got["step"] == 2 and all(torch.equal(got["trainable"][n], v) for n, v in want["trainable"].items())


class DurabilityLog:
    """os.fsync, os.rename and os.replace observed in order: each rename into the run directory
    must find every file and directory it moves fsynced (since that path was last renamed), and
    the directory fsynced after it before the next rename into it."""

    def __init__(self, run_dir, monkeypatch):
        self.run_dir, self.synced, self.renamed, self.unsynced_dirs = str(run_dir), set(), [], set()
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd):
            real_fsync(fd)
            path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
            self.synced.add(path)
            self.unsynced_dirs.discard(path)

        def moving(real):
            def move(src, dst, *args, **kwargs):
                self.check(os.path.abspath(src), os.path.abspath(dst))
                return real(src, dst, *args, **kwargs)

            return move

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", moving(real_rename))
        monkeypatch.setattr(os, "replace", moving(real_replace))

    def check(self, src: str, dst: str) -> None:
        parent = os.path.dirname(dst)
        if parent != self.run_dir:  # another library's own files, inside a directory that is checked
            return
        assert parent not in self.unsynced_dirs, f"{dst}: renamed before the previous rename here was fsynced"
        walk = list(os.walk(src)) if os.path.isdir(src) else [(os.path.dirname(src), [], [os.path.basename(src)])]
        moved = [os.path.join(d, f) for d, _, files in walk for f in files] + [d for d, _, _ in walk if d != parent]
        unsynced = set(moved) - self.synced
        assert moved and not unsynced, f"{dst}: not fsynced before the rename: {unsynced}"
        self.synced -= set(moved)  # the next file of that name must be fsynced again
        self.renamed.append(os.path.basename(dst))
        self.unsynced_dirs.add(parent)


def test_what_is_renamed_into_place_is_fsynced_first(tmp_path, monkeypatch, capsys):
    """A run, then its resume: every checkpoint, `latest`, the toy base, the cut metrics.jsonl and
    result.json are written under a temporary name, fsynced (every file and directory in them),
    renamed, and the directory fsynced before anything else is renamed into it, and at the end.
    Fails on a rename before the fsync (a power cut could leave `latest` naming a checkpoint
    whose files are empty) or result.json written in place."""
    log = DurabilityLog(tmp_path / "run", monkeypatch)
    assert cli_main(["train", *tiny_flags(tmp_path, max_steps=1)]) == 0
    assert cli_main(["train", *tiny_flags(tmp_path, max_steps=2), "--resume"]) == 0
    assert not log.unsynced_dirs, "the last rename was not made durable"
    assert {"toy-base", "checkpoint-1", "checkpoint-2", "latest", "metrics.jsonl", "result.json"} <= set(log.renamed)
    assert log.renamed.count("result.json") == 2
