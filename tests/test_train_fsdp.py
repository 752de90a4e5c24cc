"""Full fine-tuning under FSDP2 (issue #12, build point 3), on CPU with gloo: two ranks with the
model and its frozen copy sharded take the step one unsharded process takes over the union of
their rollouts, even when one rank reads more packs than the other; a two-rank run killed and
resumed from its sharded checkpoints equals the uninterrupted one; what fsdp cannot do is refused."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")

from pmi_kernels.train import loop  # noqa: E402
from pmi_kernels.train.checkpoint import SHARDED_DIR, load_checkpoint  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from pmi_kernels.train.step import distil  # noqa: E402
from test_train import tiny  # noqa: E402
from test_train_distributed import ROOT, RUN, STEP, TESTS, assert_same_step, fixed_generate, run_ranks, torchrun  # noqa: E402

# Full fine-tuning: with the frozen anchor, two micro-batches and packs of at most 40 tokens; or
# the teacher on the current weights (the trained model's head is the frozen streams') unpacked.
CASES = [
    pytest.param(
        dict(lora=False, anchor=True, grad_accum=2, mode="pmi", max_tokens_per_micro_batch=40), id="anchor-packs"
    ),
    pytest.param(dict(lora=False, anchor=False, teacher_weights="current", packed=False), id="current-unpacked"),
]


def uneven_generate(self, prompts, temperature, top_p, max_new_tokens):
    """fixed_generate, with the training rollouts of some prompts empty, so that the ranks read
    different numbers of packs."""
    outs = fixed_generate(self, prompts, temperature, top_p, max_new_tokens)
    return [
        [] if prompt not in self.eval_prompts and sum(prompt) % 3 == 0 else out for prompt, out in zip(prompts, outs)
    ]


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def one_step(out_dir, overrides):
    """One fixed-rollout step: (accuracy, record, the gradients stepped with, the weights after,
    how many filler packs this rank distilled), every tensor whole."""
    torch.manual_seed(0)
    Trainer.generate = uneven_generate
    trainer = Trainer(tiny(out_dir, **{**STEP, **overrides}))
    accuracy = trainer.evaluate()
    grads, fillers, real_step = {}, [], trainer.optimizer.step

    def step(*args, **kwargs):
        grads.update({n: full(p.grad).clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    def counting(*args, scale=1.0, **kwargs):
        fillers.append(scale == 0.0)
        return distil(*args, scale=scale, **kwargs)

    trainer.optimizer.step, loop.distil = step, counting
    try:
        record = trainer.train_step()
    finally:
        loop.distil = distil
    weights = {n: full(p.detach()).clone() for n, p in trainer.model.named_parameters()}
    return accuracy, record, grads, weights, sum(fillers)


def step_worker(rank, world, init_file, out_dir, overrides, result_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = one_step(out_dir, dict(overrides, fsdp=True))
        fillers = [None] * world
        dist.all_gather_object(fillers, result[-1])
        if rank == 0:
            torch.save((*result[:-1], fillers), result_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see test_sharded_head.py: FSDP2's gloo threads outlive the group and may abort the exit


@pytest.mark.parametrize("overrides", CASES)
def test_two_sharded_ranks_take_the_step_one_process_takes(tmp_path, overrides, monkeypatch):
    """fsdp on two ranks against one unsharded process, the same config otherwise: the gradients
    (gathered from their shards) and the weights after the step equal one process's over both
    ranks' rollouts (fp32, 1e-5 relative), and so do the loss, grad norm and drift; one rank read
    filler packs (its rollouts were fewer: some are empty) to keep its forwards in step. Fails on gradients averaged by
    FSDP2 where the step needs their sum, tied embeddings untied by sharding, a filler whose
    loss counts, or ranks whose forwards fall out of step (a hang, then the timeout)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, ROOT, os.environ.get("PYTHONPATH")])))
    result_file = str(tmp_path / "two_ranks.pt")
    run_ranks(step_worker, 2, (str(tmp_path / "rendezvous"), tmp_path / "two", overrides, result_file))
    accuracy, record, grads, weights, fillers = torch.load(result_file, weights_only=False)
    assert sum(fillers) > 0, f"no rank read a filler pack ({fillers}): the test does not cover the padding"
    monkeypatch.setattr(Trainer, "generate", Trainer.generate)
    one_accuracy, one_record, one_grads, one_weights, _ = one_step(tmp_path / "one", overrides)
    assert accuracy == pytest.approx(one_accuracy)
    for key in ("loss", "response_length", "grad_norm", "diag/kl_target_student"):
        # The loss terms are KLs of near-equal distributions (the student starts at the anchor), sums
        # of O(1) fp32 summands: the packs, split otherwise on two ranks, round them by about 2e-8.
        assert record[key] == pytest.approx(one_record[key], rel=1e-5, abs=1e-7), key
    if overrides["anchor"]:  # measured after the update: weights whose |g| is near eps moved by rounding
        assert record["drift/kl_student_base"] == pytest.approx(one_record["drift/kl_student_base"], rel=1e-4)
    assert grads.keys() == one_grads.keys() == weights.keys() == one_weights.keys()
    assert_same_step(grads, one_grads, weights, one_weights)


def sharded_weights(run_dir, step):
    """A sharded checkpoint's weights, read whole in this process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = os.path.join(run_dir, f"weights-{step}.pt")
    dcp_to_torch_save(os.path.join(run_dir, f"checkpoint-{step}", SHARDED_DIR), target)
    return torch.load(target, weights_only=False)["model"]


def test_a_sharded_run_killed_and_resumed_equals_the_uninterrupted_one(tmp_path):
    """torchrun, two ranks, fsdp: one run to the end; another killed (SIGKILL) in step 3 and
    resumed; a third stopped (SIGTERM) in its first evaluation and resumed from step 0. Their
    checkpoints' shards (read whole) and metrics rows equal the uninterrupted run's. Fails on a
    resume that does not restore the shards or the optimizer, or that starts Adam's step count
    from an optimizer state created by reading it."""
    flags = ["--lora", "false", "--anchor", "true", "--fsdp", "true"]
    whole = torchrun(tmp_path, tmp_path / "whole", *flags)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = torchrun(tmp_path, tmp_path / "killed", *flags, env={"PMI_TRAIN_FAULT": "step-rollout@3=SIGKILL"})
    assert killed.returncode != 0, "the fault point was never reached"
    assert not os.path.exists(tmp_path / "killed" / "checkpoint-3")
    resumed = torchrun(tmp_path, tmp_path / "killed", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for step in (1, 2, 3):
        want, got = sharded_weights(tmp_path / "whole", step), sharded_weights(tmp_path / "killed", step)
        assert want.keys() == got.keys() and len(want) > 10
        for name, value in want.items():
            assert torch.equal(got[name], value), (step, name)
    # Stopped (SIGTERM) in the first evaluation: step 0 is saved, with no optimizer state yet.
    stopped = torchrun(tmp_path, tmp_path / "stopped", *flags, env={"PMI_TRAIN_FAULT": "evaluation-batch@1=SIGTERM"})
    assert stopped.returncode != 0 and load_checkpoint(str(tmp_path / "stopped"))["step"] == 0, stopped.stderr[-3000:]
    resumed = torchrun(tmp_path, tmp_path / "stopped", *flags, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = sharded_weights(tmp_path / "whole", 3), sharded_weights(tmp_path / "stopped", 3)
    assert all(torch.equal(got[name], value) for name, value in want.items())
    rows = [
        [
            {k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "tokens_per_s", "peak"))}
            for line in open(out / "metrics.jsonl")
        ]
        for out in (tmp_path / "whole", tmp_path / "killed", tmp_path / "stopped")
    ]
    assert rows[0] == rows[1] == rows[2]
    assert load_checkpoint(str(tmp_path / "killed"))["step"] == 3 == RUN["max_steps"]
    # The checkpoints' layout cannot change on resume, even with the key allowed to change.
    with pytest.raises(ValueError, match=r"saved its weights sharded \(fsdp true\); resume it with fsdp true"):
        Trainer(
            tiny(
                tmp_path,
                **{
                    **RUN,
                    "lora": False,
                    "anchor": True,
                    "output_dir": str(tmp_path / "whole"),
                    "resume": True,
                    "allow_config_change": ["fsdp"],
                },
            )
        )


def test_fsdp_with_lora_or_in_one_process_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fsdp must be false with lora on"):
        tiny(tmp_path, fsdp=True).validate()
    with pytest.raises(ValueError, match="fsdp: shards the model over torchrun's processes; this run has one"):
        Trainer(tiny(tmp_path, fsdp=True, lora=False))
