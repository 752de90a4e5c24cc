"""Issue #15, build point 6: a run killed (SIGKILL, no handler runs) at any point of a save
resumes bit-exact: before the checkpoint's rename, after it, before and after `latest` moves,
for a first save of a step and for a re-save of a step whose directory already exists.

Each run is a child process that PMI_TRAIN_FAULT makes kill itself at the named point; the test
then resumes the run and compares it with an uninterrupted one."""

import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
from multiprocessing import forkserver

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train import interrupts  # noqa: E402
from pmi_kernels.train.checkpoint import load_checkpoint  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import tiny  # noqa: E402

RUN = dict(max_steps=2, eval_limit=0, max_new_tokens=6)  # two steps, each saved; no evaluation
TESTS = os.path.dirname(os.path.abspath(__file__))


def run_until_killed(root: str, fault: str, resume: bool, save_again: bool) -> None:
    """In the child: the run (or, with save_again, one more save of its resumed state)."""
    assert "train_fault_server" in sys.modules, "the child was not forked from the warmed-up server"
    os.environ[interrupts.FAULT_ENV] = fault
    trainer = Trainer(tiny(pathlib.Path(root), **RUN, resume=resume))
    trainer.save() if save_again else trainer.train(progress=False)


@pytest.fixture(scope="module")
def children():
    """Children fork from a server process warmed up single-threaded (train_fault_server.py),
    not from this one: after torch's OpenMP pool has run here, a forked child can wait forever
    on a lock of a thread that fork did not copy. The server finds that module on PYTHONPATH
    (Python 3.11's fork server ignores the parent's sys.path)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["train_fault_server"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
        forkserver.ensure_running()
    return context


def killed_run(children, tmp_path, fault: str, resume: bool = False, save_again: bool = False) -> None:
    """Run in a child process that SIGKILLs itself at `fault`; fail if it did not get there."""
    child = children.Process(target=run_until_killed, args=(str(tmp_path), fault, resume, save_again))
    child.start()
    child.join(timeout=300)
    if child.exitcode is None:
        child.kill()
        child.join()
    assert child.exitcode == -signal.SIGKILL, f"{fault}: the run was not killed (exit code {child.exitcode})"


def final_state(out):
    state = load_checkpoint(str(out))
    optimizer = [t for entry in state["optimizer"]["state"].values() for t in entry.values()]
    return state["step"], state["position"], state["trainable"], optimizer


def assert_resumes_bit_exact(tmp_path, want):
    """Resume to the end: the final checkpoint equals the uninterrupted run's, no temporary is
    left, and metrics.jsonl holds each step once."""
    out = tmp_path / "run"
    Trainer(tiny(tmp_path, **RUN, resume=True)).train(progress=False)
    step, position, trainable, optimizer = final_state(out)
    assert (step, position) == want[:2]
    assert trainable.keys() == want[2].keys() and all(torch.equal(trainable[n], want[2][n]) for n in trainable)
    assert len(optimizer) == len(want[3]) and all(torch.equal(a, b) for a, b in zip(optimizer, want[3]))
    assert not [name for name in os.listdir(out) if ".tmp-" in name]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]


@pytest.fixture(scope="module", autouse=True)
def single_threaded():
    """The children run on one thread (train_fault_server.py); so does every run here, since a
    sum over two threads need not round as one over a single thread does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(single_threaded, tmp_path_factory):
    """The uninterrupted run: its directory, and its final checkpoint's contents."""
    root = tmp_path_factory.mktemp("straight")
    Trainer(tiny(root, **RUN)).train(progress=False)
    return root, final_state(root / "run")


# The save of step 2 (the second save: each point's second arrival). Killed after the rename,
# the resumed run saves step 2 over the checkpoint-2 that `latest` does not name yet.
FIRST_SAVE = ["save-written@2", "save-renamed@2", "save-pointer-written@2", "save-pointer-moved@2"]
# A second save of the step `latest` names (as the loop once did after its final evaluation):
# `latest` is pointed twice, at the new copy while the old one is replaced, then at checkpoint-2.
RESAVE = [
    "save-written@1",
    "save-pointer-written@1",
    "save-pointer-moved@1",
    "save-old-removed@1",
    "save-renamed@1",
    "save-pointer-written@2",
    "save-pointer-moved@2",
]


@pytest.mark.parametrize("point", FIRST_SAVE)
def test_killed_during_a_save_resumes_bit_exact(children, tmp_path, straight, point):
    """Fails on any point of a save where a kill leaves no loadable checkpoint, `latest` naming
    something that is not whole, or a resumed run that differs from the uninterrupted one."""
    killed_run(children, tmp_path, f"{point}=SIGKILL")
    assert_resumes_bit_exact(tmp_path, straight[1])


@pytest.mark.parametrize("point", RESAVE)
def test_killed_during_a_resave_of_the_same_step_resumes_bit_exact(children, tmp_path, straight, point):
    """Fails on a re-save that deletes the checkpoint `latest` names before its successor is
    durable (the bug: a kill between the delete and the rename left nothing to resume from), or
    on a start that does not finish a swap cut short."""
    shutil.copytree(straight[0] / "run", tmp_path / "run")
    killed_run(children, tmp_path, f"{point}=SIGKILL", resume=True, save_again=True)
    assert_resumes_bit_exact(tmp_path, straight[1])
