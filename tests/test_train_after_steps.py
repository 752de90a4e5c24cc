"""The trainer after optimizer steps (issue #18, item 3). At step 0 the trained model and its
frozen base are the same model, so a check there cannot tell which one a stream reads; here two
steps move the weights first, and the third step is checked against the obvious code."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.reference import pmi_kl_reference  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import tiny  # noqa: E402

CUTS = [3, 9, 5, 8]  # the third step's rollout lengths (two micro-batches of two): uneven on purpose


def context_logits(model, trainer, kind, index, rollout):
    """The whole model's logits at the positions that predict each rollout token."""
    prompt = trainer.prompts[kind][index]
    full = model(input_ids=torch.tensor([prompt + rollout])).logits[0]
    return full[len(prompt) - 1 : len(prompt) - 1 + len(rollout)]


def run_third_step(trainer):
    """Two real steps, then a third whose rollouts are cut to CUTS and whose gradients are
    recorded instead of applied. Returns (record, [(index, rollout)], grads, RNG state at the first
    sampling of each step)."""
    indices, rollouts, step_seeds = [], [], []
    real_next, real_generate = trainer.next_indices, trainer.generate

    def next_indices(count):
        out = real_next(count)
        indices.extend(out if trainer.step == 2 else [])
        return out

    def generate(prompts, *args):
        if len(step_seeds) == trainer.step:
            step_seeds.append(torch.get_rng_state())
        outs = real_generate(prompts, *args)
        if trainer.step == 2:
            outs = [out[: CUTS[len(rollouts) + j]] for j, out in enumerate(outs)]
            rollouts.extend(outs)
        return outs

    trainer.next_indices, trainer.generate = next_indices, generate
    trainer.train_step()
    trainer.train_step()
    grads = []
    trainer.optimizer.step = lambda: grads.extend(p.grad.clone() for p in trainer.trainable)
    record = trainer.train_step()
    return record, list(zip(indices, rollouts)), grads, step_seeds


CASES = [
    pytest.param(dict(mode="pmi"), id="lora-pmi"),
    pytest.param(dict(mode="pmi", anchor=True, beta=2.0), id="lora-pmi-anchor"),
    pytest.param(dict(mode="pmi", lora=False, jsd_beta=0.4), id="full-pmi"),
    pytest.param(dict(mode="pmi", lora=False, anchor=True, clip=3.0), id="full-pmi-anchor"),
    pytest.param(dict(mode="opsd", jsd_beta=1.0), id="lora-opsd"),
]


@pytest.mark.parametrize("overrides", CASES)
def test_a_step_after_training_equals_the_full_logits_reference(tmp_path, overrides):
    """After two optimizer steps, the third step's gradient (grad_accum=2, rollouts of uneven
    lengths, diagnostics on) equals that of the whole model's logits through the reference loss:
    the student with the trained weights, the teacher, reference-only and anchor contexts with
    the model as it was before training (the frozen base), the sum over every token of the step
    divided by the step's token count. Its diagnostics are token means, kl_q_p is KL(target ||
    student) for the run's mode, and each step samples from its own seed.

    Fails on: the frozen streams or the anchor read with the trained weights (adapter left on, or
    the trained model instead of the frozen copy); OPSD mode given the reference-only stream,
    i.e. the PMI target, on a diagnostic step; a loss normalizer of one micro-batch's tokens
    (ignoring grad_accum); diagnostics averaged per rollout instead of per token; a sampling seed
    that ignores the step."""
    config = tiny(tmp_path, grad_accum=2, max_grad_norm=1e9, diagnostics_every=1, **overrides)
    trainer = Trainer(config)
    base = copy.deepcopy(trainer.model).requires_grad_(False)  # LoRA: B = 0, so exactly the base
    record, batch, grads, step_seeds = run_third_step(trainer)
    base_params = [p for p in base.parameters()]
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), base_params)), "weights never moved"
    assert len(step_seeds) == 3 and not any(
        torch.equal(a, b) for i, a in enumerate(step_seeds) for b in step_seeds[i + 1 :]
    ), "two steps sampled from one seed"
    lengths = [len(rollout) for _, rollout in batch]
    assert len(batch) == 4 and len(set(lengths)) > 1, lengths
    tokens = sum(lengths)

    pmi = config.mode == "pmi"
    loss, entropy, kl_teacher = 0.0, 0.0, 0.0
    for index, rollout in batch:
        student = context_logits(trainer.model, trainer, "student", index, rollout)
        with torch.no_grad():
            teacher = context_logits(base, trainer, "teacher", index, rollout)
            refonly = context_logits(base, trainer, "refonly", index, rollout) if pmi else None
            anchor = context_logits(base, trainer, "student", index, rollout) if config.anchor else None
            logp, logt = student.log_softmax(-1), teacher.log_softmax(-1)
            entropy += float(-(logp.exp() * logp).sum())
            kl_teacher += float((logt.exp() * (logt - logp)).sum())
        loss = loss + pmi_kl_reference(
            student,
            teacher,
            refonly,
            anchor,
            beta=config.beta,
            clip=config.clip,
            center=config.center,
            temperature=config.loss_temperature,
            jsd_beta=config.jsd_beta,
            reduction="sum",
        )
    want = torch.autograd.grad(loss / tokens, trainer.trainable)
    assert record["loss"] == pytest.approx(float(loss) / tokens, rel=1e-4, abs=1e-7)
    scale = max(float(g.abs().max()) for g in want)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)
    assert record["diag/entropy_student"] == pytest.approx(entropy / tokens, rel=1e-4)
    assert record["diag/kl_teacher_student"] == pytest.approx(kl_teacher / tokens, rel=1e-4)
    kl_key = "diag/kl_target_student" if pmi else "diag/kl_teacher_student"
    assert record["kl_q_p"] == record[kl_key]
