"""Issue #15, build point 1: every configuration value is checked for type and range before
anything loads, from a --config file or a flag, and the message names the key; booleans are
booleans (true/false/1/0 on the command line)."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

import pmi_kernels.train.loop as loop  # noqa: E402
from pmi_kernels.train.cli import main as cli_main  # noqa: E402
from pmi_kernels.train.config import parse_config  # noqa: E402
from test_train import tiny  # noqa: E402

# (key, a bad value): each is refused from a file and as a flag, with the key in the message.
BAD_VALUES = [
    ("lora", "false"),
    ("resume", "false"),
    ("tensorboard", 1),
    ("lr", "1e-4"),
    ("top_p", "0.9"),
    ("max_steps", 2.5),
    ("max_steps", True),
    ("markers", "wait"),
    ("templates", ["student"]),
    ("lr", math.inf),
    ("lr", 0),
    ("temperature", math.inf),
    ("max_grad_norm", -1),
    ("max_grad_norm", 0),
    ("max_grad_norm", math.nan),
    ("weight_decay", -0.1),
    ("warmup_steps", -1),
    ("sft_steps", -1),
    ("sft_lr", -1e-3),
    ("eval_every", -1),
    ("eval_temperature", -0.5),
    ("eval_limit", -1),
    ("lora_alpha", -4),
    ("lora_rank", 0),
    ("keep_checkpoints", 0),
    ("max_nonfinite_steps", 0),
    ("top_p", 1.5),
    ("seed", -1),
    ("jsd_beta", 2.0),
    ("clip", -1),
    ("beta", math.inf),
    ("loss_temperature", 0),
    ("mode", "kl"),
    ("schedule", "step"),
    ("output_dir", " "),
    ("lora_targets", []),
    ("answer_pattern", "(["),
    ("answer_pattern", r"\d+"),
    ("templates", {"student": "{q}", "teacher": "", "refonly": ""}),
    ("templates", {"student": "{question}", "teacher": "{question} {solution}", "refonly": " "}),
    # a format spec renders unbounded text (a width of 10^12 was a MemoryError), a conversion or an index more
    # than a name
    ("templates", {"student": "{question:>999999999999}", "teacher": "{solution}", "refonly": "{solution}"}),
    ("templates", {"student": "{question!r}", "teacher": "{solution}", "refonly": "{solution}"}),
    ("templates", {"student": "{question[0]}", "teacher": "{solution}", "refonly": "{solution}"}),
    ("allow_config_change", ["betta"]),
    ("vllm_kwargs", [1]),
]


def as_flag(value) -> str:
    """How a user would type the value (lists and dicts as JSON)."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=lambda x: str(x)[:16])
def test_bad_value_from_a_file_names_the_key(tmp_path, key, value):
    """Fails on a key whose type or range is not checked: e.g. {"lora": "false"} turning LoRA on,
    {"lr": "1e-4"} failing mid-run with a TypeError, a negative max_grad_norm training uphill."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "run"), key: value}))
    with pytest.raises(ValueError, match=key):
        parse_config(["--config", str(path)])
    assert not (tmp_path / "run").exists()


# Values as typed: a string of a number is a number there, and 1 is true, so those cases do not apply.
FLAG_CASES = [(k, v) for k, v in BAD_VALUES if not isinstance(v, str) and (k, v) != ("tensorboard", 1)] + [
    ("beta", "abc"),
    ("lora", "maybe"),
    ("max_steps", "ten"),
    ("lr", "inf"),
    ("max_grad_norm", "nan"),
    ("vllm_kwargs", "{bad json"),
    ("mode", "kl"),
    ("answer_pattern", "(["),
]


@pytest.mark.parametrize("key,value", FLAG_CASES, ids=lambda x: str(x)[:16])
def test_bad_flag_exits_2_with_one_line_naming_it(tmp_path, capsys, key, value, monkeypatch):
    """Fails on a flag converted without naming it ('could not convert string to float') or
    checked only after the model has loaded."""
    monkeypatch.setattr(loop, "load_model", lambda *a: pytest.fail("the model loaded before the config was checked"))
    flag = "--" + key.replace("_", "-")
    assert cli_main(["train", flag, as_flag(value), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and (key in err or flag in err), err


def test_booleans_on_the_command_line(tmp_path):
    """Fails if a boolean flag took any string as true (as bool("false") does)."""
    out = ["--output-dir", str(tmp_path / "o")]
    config = parse_config(["--lora", "0", "--center", "1", "--tensorboard", "false", "--bf16", "True", *out])
    assert (config.lora, config.center, config.tensorboard, config.bf16) == (False, True, False, True)
    assert parse_config(["--overwrite", *out]).overwrite is True  # a bare flag is true
    assert parse_config(["--markers", "hmm,wait", *out]).markers == ["hmm", "wait"]


@pytest.mark.parametrize(
    "content,message",
    [(None, "cannot be read"), ("[1, 2]", "JSON object"), ("{bad", "not valid JSON"), ('{"betta": 1}', "unknown keys")],
)
def test_bad_config_file(tmp_path, content, message):
    """Fails on a raw FileNotFoundError/AttributeError/JSONDecodeError for a bad --config file."""
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=f"--config {path}: .*{message}"):
        parse_config(["--config", str(path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_config_error(tmp_path):
    """Fails on the AssertionError 'Torch not compiled with CUDA enabled' raised mid-load."""
    with pytest.raises(ValueError, match="device"):
        tiny(tmp_path, device="cuda").validate()


def test_trainer_checks_before_it_loads(tmp_path, monkeypatch):
    """The API path too: Trainer(config) refuses a bad value, an output_dir that cannot be
    created, or resume with overwrite, before the model loads. Fails on a raw NotADirectoryError
    or a check made after loading."""
    monkeypatch.setattr(loop, "load_model", lambda *a: pytest.fail("the model loaded before the config was checked"))
    (tmp_path / "file").write_text("")
    for overrides, name in [
        (dict(eval_limit=-1), "eval_limit"),
        (dict(lr="1e-4"), "lr"),
        (dict(output_dir=str(tmp_path / "file" / "run")), "output_dir"),
        (dict(resume=True, overwrite=True), "overwrite"),
    ]:
        with pytest.raises(ValueError, match=name):
            loop.Trainer(tiny(tmp_path, **overrides))


def test_local_model_checks(tmp_path):
    """With a local model: --sft-steps is refused (it used to be silently ignored), and an
    evaluation row longer than the model's positions is refused before training (it used to
    reach the allocator)."""
    from pmi_kernels.train.demo.toy import toy_model, toy_problems, toy_tokenizer

    tokenizer = toy_tokenizer()
    toy_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    rows = toy_problems(4, 0)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "eval.jsonl").write_text(json.dumps({**rows[0], "question": "x" * 3000}))
    local = dict(model_path=str(tmp_path / "model"), train_file=str(tmp_path / "train.jsonl"))
    with pytest.raises(ValueError, match="sft_steps"):
        tiny(tmp_path, sft_steps=5, **local).validate()
    pytest.importorskip("datasets")
    with pytest.raises(ValueError, match=r"templates.student \(eval\): row 0: .* exceeds the model's 512 positions"):
        loop.Trainer(tiny(tmp_path, eval_file=str(tmp_path / "eval.jsonl"), **local))
    # A context of no tokens (the loader refuses empty fields and the checks empty templates; a
    # tokenizer may still map a text to nothing): the packed path gathered position -1 for it.
    from pmi_kernels.train.model import check_lengths

    with pytest.raises(ValueError, match=r"templates.refonly \(train\): row 1 renders to no tokens"):
        check_lengths(toy_model(tokenizer), {"templates.refonly (train)": [[5, 6], []]}, 4)


@pytest.mark.parametrize(
    "targets,message",
    [
        (["q_proj", "lm_head"], "'lm_head' is the output head"),
        (["q_proj", "v_porj"], "'v_porj' names no module of the model .*q_proj"),
        (["layers"], "'layers' names a ModuleList"),
    ],
)
def test_lora_targets_are_checked_before_the_warmup(tmp_path, monkeypatch, targets, message):
    """Each target names linear or embedding layers, none the head (whose LoRA the fused loss
    never read: the run trained nothing there, or crashed with 'does not require grad'), before
    the toy's warm-up. Fails on a typo dropped in silence, or a refusal after minutes of warm-up."""
    monkeypatch.setattr(loop, "warmed_up_base", lambda *a: pytest.fail("the warm-up ran before the check"))
    with pytest.raises(ValueError, match="lora_targets: " + message):
        loop.Trainer(tiny(tmp_path, sft_steps=5, lora_targets=targets))
