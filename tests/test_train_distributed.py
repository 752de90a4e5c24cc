"""The trainer under torchrun (issue #12, build point 3), on CPU with gloo: two ranks take the
step one process takes over the union of their rollouts; a two-rank run killed and resumed
equals the uninterrupted one; a run resumed at another world size is refused."""

import json
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train.checkpoint import load_checkpoint  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import TINY, tiny, tiny_flags, trainable_snapshot  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# One step, fixed rollouts; on the arithmetic task, whose gradients the weights' Adam bound below was measured on.
STEP = dict(TINY, eval_limit=7, batch_size=4, max_steps=1, save_every=1, seed=5, toy_task="arithmetic")
RUN = dict(TINY, batch_size=4, max_steps=3, save_every=1, eval_limit=3, max_new_tokens=6, keep_checkpoints=5)


def fixed_generate(self, prompts, temperature, top_p, max_new_tokens):
    """Rollouts fixed by their prompts (whichever process samples them); in evaluation, the
    right answer for the held-out rows whose index is 1 mod 3 and a wrong one for the others."""
    outs = []
    for prompt in prompts:
        if prompt in self.eval_prompts:
            index = self.eval_prompts.index(prompt)
            answer = self.eval_rows[index]["answer"] if index % 3 == 1 else "none"
            outs.append(self.tokenizer.encode(f"so \\boxed{{{answer}}}", add_special_tokens=False))
        else:
            outs.append([4 + (sum(prompt) * 7 + 13 * j) % 90 for j in range(3 + sum(prompt) % 6)])
    return outs


def one_step(out_dir, overrides):
    """One step of the fixed-rollout run in this process: (accuracy, the step's record, the
    gradients the optimizer stepped with, the weights after the step)."""
    torch.manual_seed(0)
    Trainer.generate = fixed_generate
    trainer = Trainer(tiny(out_dir, **{**STEP, **overrides}))
    accuracy = trainer.evaluate()
    grads, real_step = {}, trainer.optimizer.step

    def step(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    record = trainer.train_step()
    return accuracy, record, grads, trainable_snapshot(trainer)


def step_worker(rank, world, init_file, out_dir, overrides, result_file):
    import torch.distributed as dist

    from pmi_kernels.train import distributed

    torch.set_num_threads(1)
    distributed.BUCKET_ELEMENTS = 5000  # several all-reduce buckets, a parameter larger than one among them
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = one_step(out_dir, overrides)
        if rank == 0:
            torch.save(result, result_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(target, world, args, timeout=300):
    """target(rank, world, *args) in `world` spawned processes; fail unless all exit 0."""
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=target, args=(rank, world, *args)) for rank in range(world)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(), id="lora-pmi"),
        pytest.param(dict(lora=False, anchor=True, grad_accum=2, mode="pmi"), id="full-anchor-accum"),
    ],
)
def test_two_ranks_take_the_step_one_process_takes_over_the_union(tmp_path, overrides, monkeypatch):
    """The same config on two ranks and in one process: each rank samples half of each micro-batch
    (its slice of the data order), its loss normalized by the step's token count over both ranks,
    its gradients summed: the gradients and weights of the step equal one process's over the union
    of both ranks' rollouts (fp32, 1e-5 relative), and so do the logged loss and token counts; the
    evaluation split over the ranks counts every held-out row once. Fails on the local token count
    as the normalizer (each rank's mean), gradients not summed or averaged twice, ranks reading the
    same rows, or an evaluation that counts only rank 0's rows."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [TESTS, ROOT, os.environ.get("PYTHONPATH")])))
    result_file = str(tmp_path / "two_ranks.pt")
    run_ranks(step_worker, 2, (str(tmp_path / "rendezvous"), tmp_path / "two", overrides, result_file))
    accuracy, record, grads, weights = torch.load(result_file, weights_only=False)
    monkeypatch.setattr(Trainer, "generate", Trainer.generate)  # one_step patches it for this process too
    one_accuracy, one_record, one_grads, one_weights = one_step(tmp_path / "one", overrides)
    assert accuracy == pytest.approx(one_accuracy) and accuracy == pytest.approx(2 / 7)
    for key in ("loss", "response_length", "grad_norm"):
        assert record[key] == pytest.approx(one_record[key], rel=1e-5), key
    assert grads.keys() == one_grads.keys() == weights.keys()
    assert_same_step(grads, one_grads, weights, one_weights)
    assert any(
        not torch.equal(weights[n], w)
        for n, w in trainable_snapshot(Trainer(tiny(tmp_path / "fresh", **{**STEP, **overrides}))).items()
    ), "the step changed no weight"


def assert_same_step(grads, one_grads, weights, one_weights):
    """The step's gradients equal one process's (fp32, 1e-5 relative) and so do the weights after
    it, where the update does not hinge on rounding: Adam's first update is lr * g / (|g| + eps),
    eps = 1e-8, so a rounding d of g moves it by about lr * eps * d / g^2 - up to lr where |g| is
    near eps, below 1e-3 lr where |g| > 1e-4 (or g is 0 on both sides: at least a tenth of the
    weights here)."""
    checked = torch.zeros(2, dtype=torch.int64)  # weights compared, of all
    for name, grad in grads.items():
        torch.testing.assert_close(grad, one_grads[name], rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)
        clear = (one_grads[name].abs() > 1e-4) | ((one_grads[name] == 0) & (grad == 0))  # no update, decay only
        checked += torch.tensor([int(clear.sum()), clear.numel()])
        torch.testing.assert_close(
            weights[name][clear], one_weights[name][clear], rtol=1e-5, atol=1e-3 * TINY["lr"], msg=name
        )
    assert checked[0] > checked[1] // 10, f"only {checked[0]} of {checked[1]} weights compared"


def torchrun(tmp_path, out, *extra, env=None, timeout=420):
    """`torchrun --standalone --nproc-per-node 2 -m pmi_kernels.train ...`, as a user runs it."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "pmi_kernels.train",
        *tiny_flags(tmp_path, **{**RUN, "output_dir": str(out)}),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_two_rank_run_killed_and_resumed_equals_the_uninterrupted_one(tmp_path):
    """torchrun, two ranks: one run to the end; another whose ranks SIGKILL themselves in step 3
    (torchrun then ends the run), resumed with --resume. The resumed run's checkpoints and
    metrics rows equal the uninterrupted run's, step by step. Fails on a resume that loses the
    ranks' place in the data order, their sampling seeds or the optimizer state, or on rank 0
    and rank 1 writing over each other."""
    whole = torchrun(tmp_path, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = torchrun(tmp_path, tmp_path / "killed", env={"PMI_TRAIN_FAULT": "step-rollout@3=SIGKILL"})
    assert killed.returncode != 0, "the fault point was never reached"
    assert not os.path.exists(tmp_path / "killed" / "checkpoint-3")
    resumed = torchrun(tmp_path, tmp_path / "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for step in (1, 2, 3):
        want = torch.load(tmp_path / "whole" / f"checkpoint-{step}" / "state.pt", weights_only=False)
        got = torch.load(tmp_path / "killed" / f"checkpoint-{step}" / "state.pt", weights_only=False)
        assert got["position"] == want["position"] == RUN["batch_size"] * step
        for name, value in want["trainable"].items():
            assert torch.equal(got["trainable"][name], value), (step, name)
    rows = [
        [
            {k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "tokens_per_s", "peak"))}
            for line in open(out / "metrics.jsonl")
        ]
        for out in (tmp_path / "whole", tmp_path / "killed")
    ]
    assert rows[0] == rows[1]
    assert json.load(open(tmp_path / "killed" / "result.json"))["steps"] == 3
    assert load_checkpoint(str(tmp_path / "killed"))["step"] == 3


def test_resuming_at_another_world_size_is_refused(tmp_path):
    """A run checkpointed by two ranks, resumed by one process: a ValueError that names both
    world sizes, before any model loads. Fails on a resume that goes on with another batch."""
    out = tmp_path / "run"
    result = torchrun(tmp_path, out, "--max-steps", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    with pytest.raises(ValueError, match=r"trained by 2 process\(es\) and this run has 1"):
        Trainer(tiny(tmp_path, **{**RUN, "max_steps": 1, "output_dir": str(out), "resume": True}))


def differing_worker(rank, world, init_file, out_dir, result_file):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        try:  # rank 1 with another learning rate and grad_accum: once a hang (grad_accum) or two trainings
            Trainer(tiny(out_dir, **{**STEP, **({"lr": 0.05, "grad_accum": 2} if rank == 1 else {})}))
        except ValueError as err:
            with open(f"{result_file}.{rank}", "w") as fh:
                fh.write(str(err))
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_configs_are_refused_on_every_rank(tmp_path):
    """A launcher that hands the ranks different configs: a ValueError on every rank naming the
    keys, before anything loads. Fails on ranks that wait in a collective the others skip, or
    train apart (rank 1's weights differed, only rank 0's were saved)."""
    result = tmp_path / "error"
    run_ranks(differing_worker, 2, (str(tmp_path / "rendezvous"), tmp_path, str(result)), timeout=120)
    for rank in range(2):
        assert (tmp_path / f"error.{rank}").read_text() == (
            "torchrun: the ranks' configs differ in grad_accum, lr; every rank must run the same config"
        )
    assert not (tmp_path / "run").exists()


def test_a_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    """batch_size 3 on two ranks: a failed run and one line naming batch_size (rank 0's; the other
    rank stops with it silently), before any model loads. Fails on ranks that sample unequal
    shares (and hang in a collective), or on the error printed once per rank."""
    result = torchrun(tmp_path, tmp_path / "run", "--batch-size", "3")
    assert result.returncode != 0
    assert result.stderr.count("error: batch_size: 3 rollouts per micro-batch do not split evenly over 2") == 1


def differing_cli_worker(rank, world, init_file, root, result_file):
    """`pmi-opsd train` on each rank, rank 1 with another lr: its exit code and stderr, per rank."""
    import contextlib
    import io

    import torch.distributed as dist

    from pmi_kernels.train.cli import main as cli_main

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(["train", *tiny_flags(root, **{**STEP, **({"lr": 0.05} if rank == 1 else {})})])
    with open(f"{result_file}.{rank}", "w") as fh:
        json.dump({"code": code, "stderr": err.getvalue(), "left_group": not dist.is_initialized()}, fh)


def test_every_rank_reports_differing_configs_as_bad_input(tmp_path):
    """Two ranks whose command lines differ in lr: `pmi-opsd train` exits 2 (bad input, as a
    ValueError) on every rank with the same one line, and leaves the process group. Fails on a
    rank that hangs, exits 1 (a TrainingFailed), 0 (it trained), or prints a traceback."""
    result = tmp_path / "rank"
    run_ranks(differing_cli_worker, 2, (str(tmp_path / "rendezvous"), tmp_path, str(result)), timeout=120)
    want = "error: torchrun: the ranks' configs differ in lr; every rank must run the same config\n"
    for rank in range(2):
        got = json.loads((tmp_path / f"rank.{rank}").read_text())
        assert got == {"code": 2, "stderr": want, "left_group": True}, rank
    assert not (tmp_path / "run").exists()


def no_gradient_worker(rank, world, init_file, result_file):
    """Three parameters: the first has a gradient on rank 0, the second on rank 1, the third on
    none; summed over the ranks, then one AdamW step with weight decay."""
    import torch.distributed as dist

    from pmi_kernels.train.distributed import World, sum_gradients

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(3)
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
        before = [p.detach().clone() for p in params]
        params[rank].grad = torch.full((4,), rank + 1.0)
        sum_gradients(World(rank, world), params)
        torch.optim.AdamW(params, lr=0.1, weight_decay=0.5).step()
        torch.save(
            {"before": before, "after": [p.detach().clone() for p in params], "grads": [p.grad for p in params]},
            f"{result_file}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def test_a_parameter_no_rank_has_a_gradient_for_stays_untouched(tmp_path):
    """After the gradients are summed over two ranks, a parameter with a gradient on one rank has
    it on both (the other adds zeros); one with a gradient on no rank has none, so AdamW leaves it
    as it was (no weight decay), as one process would. Fails on zeros given to every parameter."""
    result = tmp_path / "rank"
    run_ranks(no_gradient_worker, 2, (str(tmp_path / "rendezvous"), str(result)), timeout=120)
    for rank in range(2):
        got = torch.load(f"{result}.{rank}", weights_only=True)
        assert [g if g is None else g.tolist() for g in got["grads"]] == [[1.0] * 4, [2.0] * 4, None]
        assert torch.equal(got["after"][2], got["before"][2])
        assert all(not torch.equal(got["after"][i], got["before"][i]) for i in range(2))
