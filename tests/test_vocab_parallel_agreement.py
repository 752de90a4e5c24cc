"""The ranks' agreement over a split vocabulary, as a property test: random calls of pmi_kl and
fused_pmi_kl where one random rank differs from the others in one random way (an optional
stream or head given on that rank only, any option, another mask of the same count and index
sum, another normalizer...). Every rank must raise the same ValueError, not compute a loss
(a silently mixed target, once with an anchor on one rank) or hang in a collective. Calls that
differ only in how a value is written (1.5, numpy's 1.5, a 0-d tensor) must run on every rank
and give one loss. One spawn of three gloo ranks runs every case, over several seeds."""

import datetime
import inspect
import itertools
import os
import random
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pmi_kernels.modules import LOSS_OPTIONS

WORLD = 3
SHARD_WIDTHS = [5, 4, 6]  # each rank's contiguous vocabulary shard
VOCAB, HIDDEN, LEAD = sum(SHARD_WIDTHS), 4, (2, 4)
ROWS = LEAD[0] * LEAD[1]
SEEDS_PER_RUN = 4
DIFFER = "process_group: the ranks differ"
# The group itself; the teacher's stream differs only in its rows or width: test_vocab_parallel.py.
NOT_COVERED = {"process_group", "teacher_logits", "teacher_hidden"}
HEADS = ("lm_head_bias", "frozen_weight", "frozen_bias")


def backends_here(interpreted=False):
    """The CPU backends; the Triton interpreter only where no kernel runs (it is slow)."""
    from pmi_kernels.backends import usable_backends

    return [b for b in usable_backends(torch.device("cpu")) if interpreted or b != "triton"]


def draw_options(rng):
    return dict(
        beta=rng.choice([1.0, rng.uniform(0.3, 3.0)]),
        clip=rng.choice([None, 10.0, rng.uniform(0.5, 5.0)]),
        center=rng.random() < 0.5,
        temperature=rng.choice([1.0, rng.uniform(0.5, 2.0)]),
        jsd_beta=rng.choice([0.0, 1.0, 0.5, rng.random()]),
        entry_clip=rng.choice([None, rng.uniform(1e-3, 0.5)]),
    )


def other_option(rng, name, value):
    """A valid value of option `name` other than `value`."""
    while True:
        new = draw_options(rng)[name] if name != "center" else not value
        if new != value:
            return new


def pairs_alike(moments):
    """Pairs of different sets of rows with the same count and the same sums of their indices'
    powers 1..moments."""
    groups = {}
    for count in range(2, ROWS - 1):
        for rows in itertools.combinations(range(ROWS), count):
            groups.setdefault((count,) + tuple(sum(i**k for i in rows) for k in range(1, moments + 1)), []).append(rows)
    return [pair for group in groups.values() for pair in itertools.combinations(group, 2)]


# Of 8 rows, e.g. {0, 4, 5} and {1, 2, 6}: one count, one index sum, one sum of squares.
ALIKE = {moments: pairs_alike(moments) for moments in (1, 2)}


def two_masks_alike(rng):
    """Two different bool masks [LEAD] with the same count and index sum (half the time also the
    same sum of squared indices)."""
    first, second = rng.choice(ALIKE[rng.choice([1, 2])])
    return tuple(torch.isin(torch.arange(ROWS), torch.tensor(rows)).reshape(LEAD) for rows in (first, second))


def labels_counting(mask, gen, ignored=-100):
    labels = torch.randint(0, 50, LEAD, generator=gen)
    return labels.masked_fill(~mask, ignored)


def toggle(gen, shape):
    return lambda value: torch.randn(*shape, generator=gen, dtype=torch.float64) if value is None else None


# A difference kind: (the parameter it covers, f(rng, gen, call) -> the differing rank's call).
# `call` is the base call's arguments, which f may adjust first (for both) so the change is valid.


def differ_in_mask(rng, gen, call):
    call["mask"], other = two_masks_alike(rng)
    call.pop("labels", None)
    return {**call, "mask": other}


def differ_in_labels(rng, gen, call):
    first, second = two_masks_alike(rng)
    call.pop("mask", None)
    call["labels"] = labels_counting(first, gen)
    return {**call, "labels": labels_counting(second, gen)}


def differ_in_ignore_index(rng, gen, call):
    call.pop("mask", None)
    call["labels"] = labels_counting(two_masks_alike(rng)[0], gen).masked_fill(torch.arange(ROWS).reshape(LEAD) == 0, 7)
    return {**call, "ignore_index": 7}  # row 0 no longer counts there


def differ_in_normalizer(rng, gen, call):
    call["reduction"] = rng.choice(["mean", "sum"])
    value = call.get("normalizer")
    other = rng.choice([None, rng.uniform(0.5, 20.0)]) if value is not None else rng.uniform(0.5, 20.0)
    return {**call, "normalizer": other}


def differ_in_reduction(rng, gen, call):
    choices = [r for r in ("mean", "sum", "none") if r != call["reduction"]]
    if call.get("normalizer") is not None:
        choices = [r for r in choices if r != "none"]
    return {**call, "reduction": rng.choice(choices)}


def differ_in_backend(rng, gen, call):
    return {**call, "backend": rng.choice([b for b in backends_here(interpreted=True) if b != call["backend"]])}


def differ_in_workspace(rng, gen, call):
    other = call["workspace_bytes"]
    while other == call["workspace_bytes"]:
        other = rng.choice([None, rng.randrange(10_000, 10**9)])
    return {**call, "workspace_bytes": other}


def differ_in_gradient(rng, gen, call, leaf="grad_student"):
    return {**call, leaf: not call[leaf]}


def flip(name):
    return lambda rng, gen, call: {**call, name: not call[name]}


def option(name):
    return lambda rng, gen, call: {**call, name: other_option(rng, name, call[name])}


def toggled(name, shape):
    return lambda rng, gen, call: {**call, name: toggle(gen, shape)(call[name])}


COMMON = {
    "mask": differ_in_mask,
    "labels": differ_in_labels,
    "ignore_index": differ_in_ignore_index,
    "normalizer": differ_in_normalizer,
    "reduction": differ_in_reduction,
    "backend": differ_in_backend,
    "workspace_bytes": differ_in_workspace,
    "return_stats": flip("return_stats"),
    "check_finite": flip("check_finite"),
    **{name: option(name) for name in LOSS_OPTIONS},
}
DIFFERENCES = {
    "pmi_kl": {
        **COMMON,
        "student_logits": differ_in_gradient,
        "refonly_logits": toggled("refonly_logits", LEAD + (VOCAB,)),
        "anchor_logits": toggled("anchor_logits", LEAD + (VOCAB,)),
    },
    "fused_pmi_kl": {
        **COMMON,
        "student_hidden": differ_in_gradient,
        "refonly_hidden": toggled("refonly_hidden", LEAD + (HIDDEN,)),
        "anchor_hidden": toggled("anchor_hidden", LEAD + (HIDDEN,)),
        "lm_head_weight": lambda rng, gen, call: differ_in_gradient(rng, gen, call, "grad_weight"),
        "lm_head_bias": toggled("lm_head_bias", (VOCAB,)),
        "frozen_weight": toggled("frozen_weight", (VOCAB, HIDDEN)),
        "frozen_bias": toggled("frozen_bias", (VOCAB,)),
        "grad_weight_fp32": flip("grad_weight_fp32"),
    },
}


# The same call written two ways: every rank must run it and give one loss.
def same_beta(rng, gen, call):
    value = call["beta"]
    return {**call, "beta": rng.choice([np.float64(value), torch.tensor(value, dtype=torch.float64)])}


def same_normalizer(rng, gen, call):
    call["reduction"] = rng.choice(["mean", "sum"])
    call["normalizer"] = rng.randrange(1, 20)
    return {**call, "normalizer": rng.choice([float(call["normalizer"]), torch.tensor(call["normalizer"])])}


def same_rows_as_labels(rng, gen, call):
    call["mask"] = two_masks_alike(rng)[0]
    call.pop("labels", None)
    return {key: value for key, value in call.items() if key != "mask"} | {"labels": labels_counting(call["mask"], gen)}


EQUIVALENT = {
    "beta as numpy or a tensor": same_beta,
    "normalizer as an int, float or tensor": same_normalizer,
    "mask given as labels": same_rows_as_labels,
}


def base_call(function, rng, gen):
    """Random arguments of `function` (whole tensors; each rank takes its shard when calling)."""
    width = VOCAB if function == "pmi_kl" else HIDDEN

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    names = (
        ["student_logits", "teacher_logits", "refonly_logits", "anchor_logits"]
        if function == "pmi_kl"
        else ["student_hidden", "teacher_hidden", "refonly_hidden", "anchor_hidden"]
    )
    call = {name: rand(*LEAD, width) for name in names[:2]}
    call.update({name: rand(*LEAD, width) if rng.random() < 0.5 else None for name in names[2:]})
    reduction = rng.choice(["mean", "sum", "none"])
    call.update(
        draw_options(rng),
        reduction=reduction,
        return_stats=rng.random() < 0.5,
        check_finite=rng.random() < 0.5,
        backend=rng.choice(backends_here()),
        workspace_bytes=rng.choice([None, rng.randrange(10_000, 10**9)]),
        normalizer=None if reduction == "none" else rng.choice([None, rng.uniform(0.5, 20.0)]),
        grad_student=rng.random() < 0.5,
    )
    if rng.random() < 0.5:
        call["mask"] = torch.rand(LEAD, generator=gen) < 0.6
    if function == "fused_pmi_kl":
        call.update(
            lm_head_weight=rand(VOCAB, HIDDEN), grad_weight=rng.random() < 0.5, grad_weight_fp32=rng.random() < 0.5
        )
        call.update(
            {
                name: rand(*((VOCAB, HIDDEN) if name == "frozen_weight" else (VOCAB,))) if rng.random() < 0.5 else None
                for name in HEADS
            }
        )
    return call


def shard(x, rank, dim):
    start = sum(SHARD_WIDTHS[:rank])
    return x.narrow(dim, start, SHARD_WIDTHS[rank]).clone(memory_format=torch.contiguous_format)


def run(function, call, rank, group):
    """`function` on this rank's shard of `call`: ("ok", loss) or (error kind, message)."""
    from pmi_kernels import fused_pmi_kl, pmi_kl

    call = dict(call)
    grad_student, grad_weight = call.pop("grad_student"), call.pop("grad_weight", False)
    if function == "pmi_kl":
        for name in ("student_logits", "teacher_logits", "refonly_logits", "anchor_logits"):
            call[name] = None if call[name] is None else shard(call[name], rank, -1)
        call["student_logits"].requires_grad_(grad_student)
    else:
        for name in ("lm_head_weight",) + HEADS:
            call[name] = None if call[name] is None else shard(call[name], rank, 0)
        call["student_hidden"] = call["student_hidden"].clone().requires_grad_(grad_student)
        call["lm_head_weight"].requires_grad_(grad_weight)
    try:
        out = (pmi_kl if function == "pmi_kl" else fused_pmi_kl)(process_group=group, **call)
    except Exception as err:  # what every rank got is compared below, whatever it is
        return type(err).__name__, str(err)
    loss = out[0] if isinstance(out, tuple) else out
    return "ok", loss.detach().reshape(-1).tolist()


def check_case(seed, function, kind, rank, group):
    """One case, drawn alike on every rank from its seed; returns every rank's outcome."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    call = base_call(function, rng, gen)
    change = EQUIVALENT.get(kind) or DIFFERENCES[function][kind]
    other = change(rng, gen, call)
    odd_rank = rng.randrange(WORLD)
    outcome = run(function, other if rank == odd_rank else call, rank, group)
    outcomes = [None] * WORLD
    dist.all_gather_object(outcomes, outcome, group=group)
    return odd_rank, outcomes


def agreement_worker(rank, init_file, seeds):
    torch.set_num_threads(1)
    # A rank left waiting in a collective (a difference the agreement missed) fails, not hangs.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        group = dist.new_group(list(range(WORLD)))
        for seed in seeds:
            for function, kinds in DIFFERENCES.items():
                kinds = list(kinds) + list(EQUIVALENT)
                random.Random(seed).shuffle(kinds)
                for k, kind in enumerate(kinds):
                    odd_rank, outcomes = check_case(seed * 1000 + k, function, kind, rank, group)
                    what = f"seed {seed}, case {seed * 1000 + k}: {function} with rank {odd_rank} differing in {kind}"
                    if kind in EQUIVALENT:
                        assert all(kind == "ok" for kind, _ in outcomes), f"{what}: {outcomes}"
                        assert all(loss == outcomes[0][1] for _, loss in outcomes), f"{what}: losses {outcomes}"
                    else:
                        assert all(kind == "ValueError" and message.startswith(DIFFER) for kind, message in outcomes), (
                            f"{what}: every rank must raise the ranks' ValueError, got {outcomes}"
                        )
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_every_argument_has_a_difference_kind():
    """A new argument of pmi_kl or fused_pmi_kl needs a kind above (and a place in the agreement)."""
    from pmi_kernels import fused_pmi_kl, pmi_kl

    for function in (pmi_kl, fused_pmi_kl):
        parameters = set(inspect.signature(function).parameters) - NOT_COVERED
        assert parameters == set(DIFFERENCES[function.__name__]), function.__name__


def test_ranks_that_differ_in_one_argument_all_raise():
    base = int(torch.randint(0, 2**20, ()).item())  # from the seed conftest prints
    seeds = [base + i for i in range(SEEDS_PER_RUN)]
    print(f"agreement seeds {seeds}")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(agreement_worker, args=(os.path.join(tmp, "rendezvous"), seeds), nprocs=WORLD, join=True)
