"""PurifiedOPSDTrainer (pmi_kernels.integrations.trl) on a tiny random Qwen3 on CPU, built in
code with a character tokenizer (nothing is downloaded): training steps with LoRA and full
fine-tuning, the loss against pmi_kl on materialized logits, DDP over two processes, the
options, the model checks and the example. Skipped without trl; CI installs it (the dev extra
includes pmi-kernels[trl])."""

import os
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from unittest import mock

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl.experimental.sdft import SDFTConfig, SDFTTrainer  # noqa: E402
from trl.trainer.utils import split_tensor_dict  # noqa: E402

from pmi_kernels import pmi_kl  # noqa: E402
from pmi_kernels.integrations.trl import PurifiedOPSDConfig, PurifiedOPSDTrainer, decoder_and_head  # noqa: E402
from pmi_kernels.train.demo.toy import toy_model, toy_problems, toy_tokenizer  # noqa: E402

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
NO_TELEMETRY = {"HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    """TRL's trainers report their use to the Hub unless told not to: tests make no requests."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)


def problems(count=4):
    """SDFT's dataset columns: the question as the prompt, the worked solution as the privileged context."""
    return Dataset.from_list(
        [
            {"prompt": f"Question: {row['question']}\nAnswer: ", "privileged_context": row["solution"]}
            for row in toy_problems(count, seed=0)
        ]
    )


def tiny_config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=6,
        max_steps=2,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        gradient_checkpointing=False,
        refonly_prompt_template="Reference: {privileged_context}\nAnswer: ",
    )
    values.update(overrides)
    return PurifiedOPSDConfig(**values)


def tiny_trainer(tmp_path, lora: bool, dtype=torch.float32, **overrides):
    """LoRA: the teacher is the student with the adapter off. Full fine-tuning: TRL builds the
    frozen teacher from the model's path, so the model is saved and loaded from there."""
    tokenizer = toy_tokenizer()
    model = toy_model(tokenizer, seed=0).to(dtype)
    if not lora:
        model.save_pretrained(tmp_path / "base")
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=dtype)
    return PurifiedOPSDTrainer(
        model,
        args=tiny_config(tmp_path, **overrides),
        train_dataset=problems(),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA) if lora else None,
    )


def trainable(model):
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_training_steps(tmp_path, lora):
    """Two optimizer steps of two micro-batches each: the trained parameters move, the frozen
    ones (LoRA's base, the teacher copy) do not, and TRL's log has the loss, KL(q || p), the
    student's entropy and the diagnostics, finite. Seen failing with the loss detached from the
    student's graph (nothing moves) and with the entropy logged under another name."""
    trainer = tiny_trainer(tmp_path, lora, gradient_accumulation_steps=2)
    frozen = {name: p.detach().clone() for name, p in trainer.teacher_model.named_parameters() if "lora_" not in name}
    before = trainable(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2
    after = trainable(trainer.model)
    assert all(not torch.equal(before[name], after[name]) for name in before), "a trained parameter did not move"
    for name, p in trainer.teacher_model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), f"frozen {name} moved"
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in (
            "loss",
            "self_distillation/distillation_loss",
            "pmi/kl_target_student",
            "entropy",
            "pmi/entropy_target",
            "diag/cos_total_ref",
            "diag/norm_ratio_ref_total",
        ):
            assert key in entry and torch.isfinite(torch.tensor(entry[key])), key
        assert entry["entropy"] > 0 and entry["pmi/kl_target_student"] >= 0


@contextmanager
def no_logits(model):
    """Fail if the lm_head module runs: the loss must use its weight through fused_pmi_kl only."""

    def refuse(*_):
        raise AssertionError("the lm_head ran: [B, T, V] logits were materialized")

    handle = decoder_and_head(model)[1].register_forward_pre_hook(refuse)
    try:
        yield
    finally:
        handle.remove()


def perturb_student(trainer, lora: bool):
    """Make the student differ from its frozen teacher (a fresh LoRA adapter is the identity;
    a fresh copy equals the student), so that reading a frozen context with the student's
    weights would change the loss."""
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in name):
                p.add_(torch.randn_like(p) * 0.05)


def mask_positions(attention_mask):
    """Position ids as generate() counts them: 0 at each row's first real token."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def full_logits(model, input_ids, attention_mask, completion_length):
    """[B, T, V] logits that predict the completion, from the model's full forward."""
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=mask_positions(attention_mask)
    ).logits
    return logits[:, -completion_length - 1 : -1]


@pytest.mark.parametrize(
    "lora, overrides",
    [
        pytest.param(True, dict(pmi_beta=2.0, pmi_clip=3.0, temperature=1.3, num_loss_tokens_to_skip=1), id="lora-pmi"),
        pytest.param(False, dict(pmi_anchor=True, pmi_jsd_beta=0.3), id="full-pmi-anchor"),
        pytest.param(True, dict(pmi_mode="opsd", pmi_jsd_beta=1.0), id="lora-opsd"),
    ],
)
def test_loss_equals_pmi_kl_on_full_logits(tmp_path, lora, overrides):
    """One micro-batch's loss and parameter gradients equal pmi_kl's on the full forward's logits
    of the same three contexts (the teacher and reference-only contexts, and the anchor, with
    the adapter off or through the frozen copy), over the counted completion tokens, divided by
    the completion tokens of the whole optimizer step (two micro-batches); the reference-only
    context is the template without the question; the lm_head module never runs in the loss.
    Seen failing with: the teacher read with the student's weights (no adapter switch; the
    student's modules in place of the frozen copy), the reference-only context built from the
    teacher's template, the normalizer counted over the micro-batch, num_loss_tokens_to_skip
    ignored, temperature not passed, the anchor dropped, opsd mode still using the
    reference-only stream, and the loss through model.lm_head."""
    # float64: the two computations agree to rounding, however small the loss of a random model.
    trainer = tiny_trainer(tmp_path, lora, torch.float64, gradient_accumulation_steps=2, **overrides)
    args, model = trainer.args, trainer.model
    perturb_student(trainer, lora)
    examples = list(problems())[:2] * 2  # one generation batch: 2 micro-batches of 2 completions
    model.train()
    batch = trainer._prepare_training_batch(examples)
    micro = split_tensor_dict(batch, 2)[0]

    completion_ids, completion_mask = micro["completion_ids"], micro["completion_mask"]
    length = completion_ids.size(1)
    refonly_prompt = trainer.processing_class(
        args.refonly_prompt_template.format(privileged_context=examples[0]["privileged_context"])
    ).input_ids
    kept = micro["refonly_attention_mask"][0].bool()
    assert (
        micro["refonly_input_ids"][0][kept].tolist()
        == refonly_prompt + completion_ids[0][completion_mask[0].bool()].tolist()
    )

    with no_logits(model):
        loss = trainer.compute_loss(model, micro)
    loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    student_ids = torch.cat([micro["prompt_ids"], completion_ids], 1)
    student_mask = torch.cat([micro["prompt_mask"], completion_mask], 1)
    student = full_logits(model, student_ids, student_mask, length)
    frozen_model = model if lora else trainer.teacher_model
    with torch.no_grad(), model.disable_adapter() if lora else nullcontext():
        teacher = full_logits(frozen_model, micro["teacher_input_ids"], micro["teacher_attention_mask"], length)
        refonly = full_logits(frozen_model, micro["refonly_input_ids"], micro["refonly_attention_mask"], length)
        anchor = full_logits(frozen_model, student_ids, student_mask, length) if args.pmi_anchor else None
    counted = completion_mask.clone()
    counted[:, : args.num_loss_tokens_to_skip] = 0
    step_tokens = batch["completion_mask"][:, args.num_loss_tokens_to_skip :].sum()
    want = pmi_kl(
        student,
        teacher,
        refonly if args.pmi_mode == "pmi" else None,
        anchor,
        mask=counted,
        normalizer=step_tokens,
        beta=args.pmi_beta,
        clip=args.pmi_clip,
        center=args.pmi_center,
        temperature=args.temperature,
        jsd_beta=args.pmi_jsd_beta,
    )
    want.backward()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-9)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.float64
            assert torch.allclose(got[name], p.grad, rtol=1e-7, atol=1e-9 * float(p.grad.abs().max())), name


def fixed_rollouts(trainer, lengths):
    """Rollouts of the given lengths in turn, in place of sampling (a short one ends in EOS)."""
    eos, turn = trainer.processing_class.eos_token_id, iter(lengths)

    def generate(prompt_ids):
        sizes = [next(turn) for _ in prompt_ids]
        return prompt_ids, [[10 + n] * (n - 1) + [eos] if n < max(lengths) else [10] * n for n in sizes]

    trainer._generate = generate


def test_logged_means_weigh_every_token_alike(tmp_path):
    """Two micro-batches of 12 and 2 completion tokens in one step: the logged distillation loss
    is the step's loss (its sum over the step's tokens over their count), not the mean of the
    two micro-batches' means. Seen failing with a mean per micro-batch appended to TRL's lists
    (0.0080 against 0.0095)."""
    trainer = tiny_trainer(
        tmp_path,
        True,
        per_device_train_batch_size=2,
        num_generations=1,
        max_steps=1,
        gradient_accumulation_steps=2,
        learning_rate=0.0,
        max_completion_length=6,
    )
    perturb_student(trainer, lora=True)
    fixed_rollouts(trainer, [6, 6, 1, 1])
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["self_distillation/distillation_loss"] == pytest.approx(entry["loss"], rel=1e-5)


def test_bf16_runs_the_loss_under_autocast(tmp_path, monkeypatch):
    """bf16=True on fp32 weights: fused_pmi_kl runs under bf16 autocast, and so do the loss's
    forwards (a projection's outputs are bf16), as the model's own forward under accelerate would.
    Seen failing with the forward redirection skipping accelerate's autocast (fp32 throughout,
    the loss bit-identical to bf16=False)."""
    import pmi_kernels.integrations.trl as integration

    seen, projections = [], []

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return fused(*args, **kwargs)

    fused = integration.fused_pmi_kl
    monkeypatch.setattr(integration, "fused_pmi_kl", recording)
    trainer = tiny_trainer(tmp_path, True, bf16=True, max_steps=1)
    layer = decoder_and_head(trainer.model)[0].layers[0].mlp.down_proj
    layer.register_forward_hook(lambda module, inputs, output: projections.append(output.dtype))
    trainer.train()
    assert seen and all(dtype == torch.bfloat16 for dtype in seen), seen
    # The step's last three forwards are the loss's (student, teacher, reference-only); the
    # rollouts were sampled before, as TRL samples them.
    assert projections[-3:] == [torch.bfloat16] * 3, projections


def test_left_padding_moves_no_position(tmp_path):
    """GPT-2 (learned absolute positions): the hidden states of a left-padded batch equal each
    row's read alone. Seen failing without position ids from the mask (the padded row's
    completion read at shifted positions, its states off by O(1))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pmi_kernels.integrations.trl import completion_hidden_states

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    decoder, _ = decoder_and_head(model)
    short, long = torch.randint(1, 50, (7,)), torch.randint(1, 50, (11,))
    ids = torch.stack([torch.cat([torch.zeros(4, dtype=torch.long), short]), long])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        got = completion_hidden_states(decoder, ids, mask, 3)
        for row, alone in enumerate((short, long)):
            want = completion_hidden_states(decoder, alone[None], torch.ones(1, alone.numel(), dtype=torch.long), 3)
            assert torch.allclose(got[row], want[0], atol=1e-5), row


def test_ddp_gradient_is_normalized_by_the_step_tokens_of_both_processes(tmp_path):
    """Two processes under torchrun (DDP, gloo, CPU), one optimizer step of two micro-batches
    each: the gradient DDP averages equals the sum over both processes' micro-batches of pmi_kl
    on full logits divided by the completion tokens of the step on both (tests/trl_ddp_worker.py).
    Seen failing with the normalizer not divided by the process count (off by 2x) and with the
    token count not gathered across processes."""
    worker = os.path.join(os.path.dirname(__file__), "trl_ddp_worker.py")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **NO_TELEMETRY, "TRL_EXPERIMENTAL_SILENCE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    assert "ok 0" in run.stdout and "ok 1" in run.stdout


@pytest.mark.parametrize(
    "overrides, key",
    [
        (dict(pmi_mode="kl"), "pmi_mode"),
        (dict(pmi_beta=0.0), "pmi_beta"),
        (dict(pmi_clip=-1.0), "pmi_clip"),
        (dict(pmi_jsd_beta=1.5), "pmi_jsd_beta"),
        (dict(pmi_entry_clip=float("nan")), "pmi_entry_clip"),
        (dict(pmi_center="no"), "pmi_center"),
        (dict(pmi_log_diagnostics=1), "pmi_log_diagnostics"),
        (dict(pmi_anchor=True, pmi_mode="opsd"), "pmi_anchor"),
        (dict(refonly_prompt_template="{prompt}\n{privileged_context}"), "refonly_prompt_template"),
        (dict(refonly_prompt_template="Reference:"), "refonly_prompt_template"),
        (dict(refonly_prompt_template="{privileged_context} {answer}"), "refonly_prompt_template"),
        (dict(refonly_prompt_template="Reference: {{privileged_context}}"), "refonly_prompt_template"),
        (dict(refonly_prompt_template="Reference: {privileged_context:>999999999999}"), "refonly_prompt_template"),
        (dict(teacher_prompt_template="{{prompt}}\n{privileged_context}"), "teacher_prompt_template"),
        (dict(teacher_prompt_template="{prompt}\n{privileged_context}\n{answer}"), "teacher_prompt_template"),
        (dict(use_teacher_server=True), "use_teacher_server"),
        (dict(num_iterations=2), "num_iterations"),
        (dict(generation_batch_size=8), "steps_per_generation"),
    ],
)
def test_options_are_checked_up_front(tmp_path, overrides, key):
    """Each bad option is a ValueError naming its key, when the config is built. Seen failing
    with each check removed in turn, with the loss options' errors raised under LossOptions'
    names (beta, not pmi_beta), and with SDFT's substring check of teacher_prompt_template alone
    (a literal {{prompt}} and an unknown field passed it)."""
    with pytest.raises(ValueError, match=key):
        tiny_config(tmp_path, **overrides)


def test_clip_off_and_literal_braces(tmp_path):
    """pmi_clip=inf is the clip off (None), also from a command line, where None cannot be
    written; {{prompt}} is literal text, not the question. Seen failing with inf refused and
    with the template's check a substring test."""
    from transformers import HfArgumentParser

    assert tiny_config(tmp_path, pmi_clip=float("inf")).pmi_clip is None
    (parsed,) = HfArgumentParser(PurifiedOPSDConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--pmi_clip", "inf", "--report_to", "none", "--use_cpu", "true"]
    )
    assert parsed.pmi_clip is None
    config = tiny_config(tmp_path, refonly_prompt_template="Answer {{prompt}} from: {privileged_context}")
    assert config.refonly_prompt_template.format(privileged_context="x") == "Answer {prompt} from: x"


def test_trainer_refuses_what_it_cannot_train(tmp_path):
    """An SDFTConfig (no PMI options), an lm_head adapted by LoRA (fused_pmi_kl applies a
    plain head), and a model with soft-capped logits (refused before SDFT sets anything up):
    a ValueError naming the argument before any rollout. Seen failing without the checks (the
    adapted head trains through its base weight only)."""
    tokenizer = toy_tokenizer()
    sdft_args = SDFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="args"):
        PurifiedOPSDTrainer(toy_model(tokenizer), args=sdft_args, train_dataset=problems(), processing_class=tokenizer)
    with pytest.raises(ValueError, match="model"):
        PurifiedOPSDTrainer(
            toy_model(tokenizer),
            args=tiny_config(tmp_path),
            train_dataset=problems(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, target_modules=["lm_head"]),
        )
    capped = toy_model(tokenizer)
    capped.config.final_logit_softcapping = 30.0
    with (
        pytest.raises(ValueError, match="final_logit_softcapping"),
        mock.patch.object(SDFTTrainer, "__init__", side_effect=AssertionError("SDFT set up first")),
    ):
        PurifiedOPSDTrainer(capped, args=tiny_config(tmp_path), train_dataset=problems(), processing_class=tokenizer)


def test_decoder_and_head_of_plain_and_peft_models():
    """The helper's decoder and head give the model's own logits, plain and under PEFT (where
    base_model is the LoraModel, which returns logits), with the adapter on and off; a model
    whose logits are transformed is refused. Seen failing with `model.base_model` as the
    decoder under PEFT, and without the logit-transform check."""
    tokenizer = toy_tokenizer()
    ids = torch.randint(4, len(tokenizer), (2, 9))
    plain = toy_model(tokenizer)
    peft = get_peft_model(toy_model(tokenizer), LoraConfig(**LORA))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    for model in (plain, peft):
        decoder, head = decoder_and_head(model)
        for adapter_off in (False, True) if model is peft else (False,):
            with torch.no_grad(), model.disable_adapter() if adapter_off else nullcontext():
                want = model(input_ids=ids).logits
                assert torch.allclose(head(decoder(input_ids=ids).last_hidden_state), want, atol=1e-5)
    plain.config.logits_scaling = 1.0  # Granite's default: the logits unchanged
    decoder_and_head(plain)
    plain.config.logits_scaling = 8.0
    with pytest.raises(ValueError, match="model.*logits_scaling"):
        decoder_and_head(plain)
    plain.config.logits_scaling = None
    plain.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="model.*final_logit_softcapping"):
        decoder_and_head(plain)


def test_example_runs(tmp_path):
    """examples/trl_purified_opsd.py, one step: it keeps running as the API changes (seen
    failing with a renamed config key)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "trl_purified_opsd.py")
    spec = importlib.util.spec_from_file_location("trl_purified_opsd", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    logs = example.main(["--steps", "1", "--output-dir", str(tmp_path)])
    assert len(logs) == 1 and all(key in logs[0] for key in example.LOGGED)


def text_rows(count=3):
    """Rows as a plain list (a map-style dataset TRL accepts, which can hold any value)."""
    return [
        {"prompt": f"Question {index}: 2+{index}?\nAnswer: ", "privileged_context": f"2+{index}={2 + index}"}
        for index in range(count)
    ]


def make_trainer(tmp_path, train_dataset, tokenizer=None, eval_dataset=None, **overrides):
    """A LoRA trainer of the tiny model on the given rows (the teacher is the adapter switched off)."""
    tokenizer = tokenizer or toy_tokenizer()
    return PurifiedOPSDTrainer(
        toy_model(tokenizer),
        args=tiny_config(tmp_path, **overrides),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )


NO_TOKENS = "renders to no tokens"


@pytest.mark.parametrize(
    "overrides, bad, match",
    [
        pytest.param(
            dict(refonly_prompt_template="{privileged_context}"),
            {"privileged_context": ""},
            r"train_dataset row 1: the reference-only context renders to no tokens \(refonly_prompt_template="
            r"'\{privileged_context\}' over privileged_context=''\)",
            id="empty-reference-default-template",
        ),
        pytest.param(
            dict(refonly_prompt_template="{privileged_context}", pmi_mode="opsd"),
            {"privileged_context": ""},
            "train_dataset row 1: the reference-only context " + NO_TOKENS,
            id="opsd-diagnostics-read-it",
        ),
        pytest.param(
            dict(
                refonly_prompt_template="{privileged_context}", teacher_prompt_template="{prompt}{privileged_context}"
            ),
            {"prompt": "", "privileged_context": ""},
            "train_dataset row 1: the student's context " + NO_TOKENS + r" \(prompt=''\)",
            id="empty-prompt",
        ),
    ],
)
def test_a_context_without_tokens_is_refused_up_front(tmp_path, overrides, bad, match):
    """A row that renders a context (the student's or the reference-only; the teacher's text has
    the prompt) to no tokens is a ValueError naming the row, the context, its template and the
    field, when the trainer is built, before SDFT sets anything up. Seen failing before the
    check: construction passed, and training crashed with "Expected tensor for argument #1
    'indices' ... FloatTensor" (an empty context became float ids) or, with the row second in
    its batch, read the first completion token from a padding position (and trained on)."""
    rows = text_rows()
    rows[1].update(bad)
    with (
        pytest.raises(ValueError, match=match),
        mock.patch.object(SDFTTrainer, "__init__", side_effect=AssertionError("SDFT set up first")),
    ):
        make_trainer(tmp_path, rows, **overrides)


def test_a_context_without_tokens_is_refused_in_eval_dataset_and_kept_otherwise(tmp_path):
    """An eval_dataset's row (one dataset, or a dict of them) is named the same way; a context
    that is blank text with tokens (a space is a token here), and an empty reference under
    "opsd" without diagnostics (no reference-only context is built), are not refused."""
    bad = text_rows()
    bad[2]["privileged_context"] = ""
    template = dict(refonly_prompt_template="{privileged_context}")
    with pytest.raises(ValueError, match="eval_dataset row 2: the reference-only context " + NO_TOKENS):
        make_trainer(tmp_path, text_rows(), eval_dataset=bad, **template)
    with pytest.raises(ValueError, match=r"eval_dataset\['math'\] row 2: the reference-only context " + NO_TOKENS):
        make_trainer(tmp_path, text_rows(), eval_dataset={"easy": text_rows(), "math": bad}, **template)
    make_trainer(tmp_path, bad, pmi_mode="opsd", pmi_log_diagnostics=False, **template)
    spaced = text_rows()
    spaced[2]["privileged_context"] = " "
    make_trainer(tmp_path, spaced, **template)


def test_a_context_without_tokens_is_refused_at_the_first_batch(tmp_path):
    """A context whose text is not blank but has no tokens (here a tokenizer that drops "~"),
    which the datasets' check does not tokenize, is refused when its batch is prepared, before
    any rollout, naming the row by its prompt; so is a bad row in a batch the datasets' check
    never saw. Seen failing before the check: the rollout was sampled (unmocked, generate()
    crashed on the empty context's float ids)."""
    from tokenizers import normalizers

    tokenizer = toy_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("~", "")
    rows = text_rows(2)
    rows[0]["privileged_context"] = "~~"
    trainer = make_trainer(
        tmp_path, rows, tokenizer, refonly_prompt_template="{privileged_context}", shuffle_dataset=False, max_steps=1
    )
    trainer._generate = mock.Mock(side_effect=AssertionError("sampled before the check"))
    match = (
        r"the row with prompt='Question 0: 2\+0\?\\nAnswer: ': the reference-only context "
        + NO_TOKENS
        + r" \(refonly_prompt_template='\{privileged_context\}' over privileged_context='~~'\)"
    )
    with pytest.raises(ValueError, match=match):
        trainer.train()
    with pytest.raises(ValueError, match=r"the row with prompt='Q': privileged_context is None"):
        trainer._prepare_training_batch([{"prompt": "Q", "privileged_context": None}])


USER = {"role": "user", "content": "2+2?"}


@pytest.mark.parametrize(
    "bad, match",
    [
        pytest.param({"privileged_context": None}, "privileged_context is None", id="context-none"),
        pytest.param(
            {"privileged_context": 4}, "privileged_context must be a str or a list of messages, got 4", id="context-int"
        ),
        pytest.param({"privileged_context": []}, "privileged_context is an empty list of messages", id="context-empty"),
        pytest.param({"privileged_context": ["4"]}, r"privileged_context\[0\] must be a message", id="context-strs"),
        pytest.param({"prompt": None}, "prompt is None", id="prompt-none"),
        pytest.param({"prompt": b"2+2?"}, "prompt must be a str or a list of messages", id="prompt-bytes"),
        pytest.param({"prompt": []}, "prompt is an empty list of messages", id="prompt-empty"),
        pytest.param({"prompt": [{"role": "user"}]}, r"prompt\[0\] must be a message", id="message-no-content"),
        pytest.param({"prompt": [{"content": "2+2?"}]}, r"prompt\[0\] must be a message", id="message-no-role"),
        pytest.param(
            {"prompt": [USER, {"role": "assistant", "content": "4"}]},
            "prompt must end with a user turn .* role 'assistant'",
            id="assistant-last",
        ),
        pytest.param(
            {"prompt": [{"role": "user", "content": ["2+2?"]}]},
            r"prompt\[0\] must be a message",
            id="content-parts-strs",
        ),
        pytest.param(
            {"prompt": [USER]},
            "train_dataset row 1: prompt is a conversation but train_dataset row 0's is text",
            id="mixed-kinds",
        ),
    ],
)
def test_bad_rows_are_refused_naming_row_and_field(tmp_path, bad, match):
    """A row whose field is missing, None or of a type SDFT cannot read is a ValueError naming the
    row and the field when the trainer is built. Seen failing before the checks: construction
    passed, and training failed later (a TypeError in the tokenizer, TRL's ValueError without
    the row) or trained on str() of the value (4, [] and ["4"] as the reference)."""
    rows = text_rows()
    rows[1].update(bad)
    with pytest.raises(ValueError, match="train_dataset row 1: " + match if "row" not in match else match):
        make_trainer(tmp_path, rows)


def test_missing_fields_and_columns_are_refused(tmp_path):
    """A row without a field, a row that is not a dict, and a datasets.Dataset without a column.
    Seen failing before the checks (construction passed; KeyError at the first batch)."""
    for index, bad, match in (
        (1, {"prompt": "2+2?"}, "train_dataset row 1: privileged_context is missing"),
        (2, "2+2?", "train_dataset row 2 must be a dict"),
    ):
        rows = text_rows()
        rows[index] = bad
        with pytest.raises(ValueError, match=match):
            make_trainer(tmp_path, rows)
    with pytest.raises(ValueError, match="train_dataset has no 'privileged_context' column"):
        make_trainer(tmp_path, Dataset.from_list([{"prompt": "2+2?", "answer": "4"}]))


def recorded_micro_batches(trainer):
    """The micro-batches compute_loss receives, in order."""
    micro_batches, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        micro_batches.append(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return micro_batches


def per_position_stats(trainer, micro):
    """(counted mask, {name: per-position value}) of a micro-batch, from pmi_kl's own per-position
    statistics and pmi_diagnostics on the full forward's logits of the three contexts (the
    frozen ones with the adapter off), apart from the trainer's hidden-state path."""
    from pmi_kernels import pmi_diagnostics

    args, model = trainer.args, trainer.model
    length = micro["completion_ids"].size(1)
    ids = torch.cat([micro["prompt_ids"], micro["completion_ids"]], 1)
    mask = torch.cat([micro["prompt_mask"], micro["completion_mask"]], 1)
    with torch.no_grad():
        student = full_logits(model, ids, mask, length)
        with model.disable_adapter():
            teacher = full_logits(model, micro["teacher_input_ids"], micro["teacher_attention_mask"], length)
            refonly = full_logits(model, micro["refonly_input_ids"], micro["refonly_attention_mask"], length)
    counted = micro["completion_mask"].bool().clone()
    counted[:, : args.num_loss_tokens_to_skip] = False
    options = dict(beta=args.pmi_beta, clip=args.pmi_clip, center=args.pmi_center, temperature=args.temperature)
    _, stats = pmi_kl(
        student,
        teacher,
        refonly,
        mask=counted,
        reduction="none",
        return_stats=True,
        jsd_beta=args.pmi_jsd_beta,
        **options,
    )
    diagnostics = pmi_diagnostics(student, teacher, refonly, **options)
    return counted, {**stats, **{f"diag/{key}": value for key, value in diagnostics.items()}}


def test_every_logged_metric_is_its_per_token_mean(tmp_path):
    """Two optimizer steps of two micro-batches of unequal completion tokens, logged once: each
    metric the trainer logs (the distillation loss under both names, KL(q || p), both entropies,
    every diagnostic) is the mean over the interval's counted tokens of its per-position value,
    computed apart from the trainer on the same micro-batches; TRL's "loss" is the mean over the
    steps of each step's per-token loss. Seen failing with each micro-batch's mean weighted
    alike (a mean of means), with the token count taken before num_loss_tokens_to_skip, and
    with the metric names shifted against the sums."""
    from pmi_kernels.backends import DIAGNOSTICS

    trainer = tiny_trainer(
        tmp_path,
        True,
        torch.float64,
        per_device_train_batch_size=2,
        num_generations=1,
        gradient_accumulation_steps=2,
        max_steps=2,
        logging_steps=2,
        learning_rate=0.0,
        max_completion_length=6,
        num_loss_tokens_to_skip=1,
        temperature=1.3,
        pmi_beta=2.0,
        pmi_clip=3.0,
    )
    perturb_student(trainer, lora=True)
    short = torch.randint(1, 6, (4,)).tolist()  # a micro-batch of 6 + short tokens, one of 1 + short
    fixed_rollouts(trainer, [6, short[0], 1, short[1], 1, short[2], 6, short[3]])
    micro_batches = recorded_micro_batches(trainer)
    trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "loss" in e]
    assert len(micro_batches) == 4

    sums, tokens, step_losses = {}, 0, []
    for step in range(2):
        step_sum, step_tokens = 0.0, 0
        for micro in micro_batches[2 * step : 2 * step + 2]:
            counted, values = per_position_stats(trainer, micro)
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + float(value[counted].nan_to_num().sum())
            step_sum += float(values["loss"][counted].sum())
            step_tokens += int(counted.sum())
        tokens += step_tokens
        step_losses.append(step_sum / step_tokens)
    counts = [int(micro["completion_mask"].sum()) for micro in micro_batches]
    assert counts[0] != counts[1] and counts[2] != counts[3], counts
    logged = {
        "self_distillation/distillation_loss": "loss",
        "purified_opsd/distillation_loss": "loss",
        "pmi/kl_target_student": "kl_target_student",
        "entropy": "entropy_student",
        "pmi/entropy_target": "entropy_target",
        **{f"diag/{key}": f"diag/{key}" for key in DIAGNOSTICS},
    }
    for key, name in logged.items():
        assert entry[key] == pytest.approx(sums[name] / tokens, rel=1e-6, abs=1e-12), key
    assert entry["loss"] == pytest.approx(sum(step_losses) / 2, rel=1e-6)


CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_conversational_contexts_keep_the_system_turns(tmp_path):
    """Conversational prompts with system turns (one multi-turn): each context's token ids are
    the chat template's for the expected messages - the student's prompt; the teacher's with
    the last user turn replaced by teacher_prompt_template over it and the reference; the
    reference-only with it replaced by refonly_prompt_template alone (a reference given as
    messages is their contents, one per line) - every earlier turn kept; then the loss trains.
    Seen failing with the reference-only context built from the last user turn alone (the
    system turn dropped)."""
    tokenizer = toy_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    system, earlier = (
        {"role": "system", "content": "Be brief."},
        [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}],
    )
    question = [f"What is {a} + {b}?" for a, b in torch.randint(1, 10, (2, 2)).tolist()]
    rows = [
        {"prompt": [system, {"role": "user", "content": question[0]}], "privileged_context": "It is 7."},
        {
            "prompt": [system, *earlier, {"role": "user", "content": question[1]}],
            "privileged_context": [{"role": "assistant", "content": "Add."}, {"role": "assistant", "content": "9."}],
        },
    ]
    references = ["It is 7.", "Add.\n9."]
    trainer = make_trainer(tmp_path, rows, tokenizer, per_device_train_batch_size=2, num_generations=1, max_steps=1)
    args = trainer.args
    trainer.model.train()
    batch = trainer._prepare_training_batch(rows)

    def chat_ids(messages):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]

    def kept(ids, mask, row):
        return ids[row][mask[row].bool()].tolist()

    for row, (example, reference) in enumerate(zip(rows, references)):
        turns, user = example["prompt"][:-1], example["prompt"][-1]["content"]
        completion = kept(batch["completion_ids"], batch["completion_mask"], row)
        teacher = args.teacher_prompt_template.format(prompt=user, privileged_context=reference)
        refonly = args.refonly_prompt_template.format(privileged_context=reference)
        assert turns[0] == system
        assert kept(batch["prompt_ids"], batch["prompt_mask"], row) == chat_ids(example["prompt"])
        assert (
            kept(batch["teacher_input_ids"], batch["teacher_attention_mask"], row)
            == chat_ids([*turns, {"role": "user", "content": teacher}]) + completion
        )
        assert (
            kept(batch["refonly_input_ids"], batch["refonly_attention_mask"], row)
            == chat_ids([*turns, {"role": "user", "content": refonly}]) + completion
        )
    trainer.train()
    (entry,) = [e for e in trainer.state.log_history if "loss" in e]
    assert torch.isfinite(torch.tensor(entry["loss"])) and entry["pmi/kl_target_student"] >= 0
