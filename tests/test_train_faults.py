"""Issue #15, build point 6: a run killed (SIGKILL, no handler runs) at any point of a save
resumes bit-exact: before the checkpoint's rename, after it, before and after `latest` moves,
for a first save of a step and for a re-save of a step whose directory already exists.

Each run is a forked copy of this process that PMI_TRAIN_FAULT makes kill itself at the named
point; the parent then resumes the run and compares it with an uninterrupted one."""
import json
import os
import shutil
import signal

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train import interrupts  # noqa: E402
from pmi_kernels.train.checkpoint import load_checkpoint  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import tiny  # noqa: E402

RUN = dict(max_steps=2, eval_limit=0, max_new_tokens=6)  # two steps, each saved; no evaluation


def killed_run(tmp_path, fault: str, resume: bool = False, save_again: bool = False) -> None:
    """Run the trainer (or, with save_again, save its resumed state once more) in a child process
    that SIGKILLs itself at `fault`; fail if it never got there."""
    pid = os.fork()
    if pid == 0:
        try:
            os.environ[interrupts.FAULT_ENV] = fault
            interrupts.FAULT_ARRIVALS.clear()
            trainer = Trainer(tiny(tmp_path, **RUN, resume=resume))
            trainer.save() if save_again else trainer.train(progress=False)
        finally:
            os._exit(3)  # never return into the test runner
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{fault}: the run was not killed"


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


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run: its directory, and its final checkpoint's contents."""
    root = tmp_path_factory.mktemp("straight")
    Trainer(tiny(root, **RUN)).train(progress=False)
    return root, final_state(root / "run")


# The save of step 2 (the second save: each point's second arrival). Killed after the rename,
# the resumed run saves step 2 over the checkpoint-2 that `latest` does not name yet.
FIRST_SAVE = ["save-written@2", "save-renamed@2", "save-pointer-written@2", "save-latest-moved@2"]
# A second save of the step `latest` names (as the loop once did after its final evaluation):
# `latest` is pointed twice, at the new copy while the old one is replaced, then at checkpoint-2.
RESAVE = ["save-written@1", "save-pointer-written@1", "save-latest-at-temporary@1", "save-old-removed@1",
          "save-renamed@1", "save-pointer-written@2", "save-latest-moved@1"]


@pytest.mark.parametrize("point", FIRST_SAVE)
def test_killed_during_a_save_resumes_bit_exact(tmp_path, straight, point):
    """Fails on any point of a save where a kill leaves no loadable checkpoint, `latest` naming
    something that is not whole, or a resumed run that differs from the uninterrupted one."""
    killed_run(tmp_path, f"{point}=SIGKILL")
    assert_resumes_bit_exact(tmp_path, straight[1])


@pytest.mark.parametrize("point", RESAVE)
def test_killed_during_a_resave_of_the_same_step_resumes_bit_exact(tmp_path, straight, point):
    """Fails on a re-save that deletes the checkpoint `latest` names before its successor is
    durable (the bug: a kill between the delete and the rename left nothing to resume from), or
    on a start that does not finish a swap cut short."""
    shutil.copytree(straight[0] / "run", tmp_path / "run")
    killed_run(tmp_path, f"{point}=SIGKILL", resume=True, save_again=True)
    assert_resumes_bit_exact(tmp_path, straight[1])
