"""The paper's recipes (configs/*.json) and `pmi-opsd train --dry-run` (issue #16, item 2)."""

import dataclasses
import glob
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train.cli import main as cli_main  # noqa: E402
from pmi_kernels.train.config import parse_args  # noqa: E402
from pmi_kernels.train.tools import plan  # noqa: E402

RECIPES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.json")))
# Parameter counts the model cards give, in billions: the dry run's must round to them.
PUBLISHED = {"qwen3-8b": 8.2, "qwen3-4b": 4.0, "deepseek-r1-distill-qwen-7b": 7.6, "olmo-3-7b": 7.3}
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def tiny_config(family: str, **extra):
    import transformers as tf

    kinds = {
        "qwen3": (tf.Qwen3Config, dict(head_dim=16)),
        "llama": (tf.LlamaConfig, {}),
        "olmo2": (tf.Olmo2Config, {}),
        "olmo3": (tf.Olmo3Config, {}),
        "qwen2": (tf.Qwen2Config, {}),
    }
    cls, own = kinds[family]
    return cls(**TINY, **own, **extra)


@pytest.mark.parametrize(
    "family, extra",
    [
        ("qwen3", {}),
        ("qwen3", dict(tie_word_embeddings=True)),
        ("llama", {}),
        ("llama", dict(attention_bias=True)),
        ("olmo2", {}),
        ("olmo3", {}),
        ("qwen2", {}),
    ],
)
def test_parameter_counts_equal_the_models(family, extra):
    """The plan's parameter and LoRA counts from config.json's numbers equal the built model's
    and peft's. Fails on q/k norms, biases or a tied head miscounted."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **extra)
    model = AutoModelForCausalLM.from_config(config)
    arch = config.to_dict()
    assert plan.parameter_count(arch) == sum(p.numel() for p in model.parameters())
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    assert plan.lora_count(arch, 4, targets) == sum(p.numel() for p in lora.parameters() if p.requires_grad)


@pytest.mark.parametrize("lora", [False, True])
def test_activation_estimate_covers_what_autograd_keeps(lora):
    """The per-token, per-layer activation bytes the plan assumes (no checkpointing) are at
    least what autograd keeps for a bf16-autocast student forward of a small Qwen3, OLMo2 and
    Llama, and at most 1.5x it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for family in ("qwen3", "olmo2", "llama"):
        config = tiny_config(family)
        model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
        if lora:
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(plan.LORA_SHAPES)))
        kept = {}

        def keep(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        measured = []
        for tokens in (64, 128):
            kept.clear()
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", torch.bfloat16):
                model.get_decoder()(input_ids=torch.randint(0, 64, (1, tokens)), use_cache=False)
            measured.append(sum(kept.values()))
        per_token_layer = (measured[1] - measured[0]) / 64 / config.num_hidden_layers
        estimate = plan.activation_bytes(plan.shape(config.to_dict()), 8 if lora else 0)
        assert per_token_layer <= estimate <= 1.5 * per_token_layer, (family, per_token_layer, estimate)


def test_recipes_are_the_papers_setups_each_with_its_opsd_twin():
    """Four models, each a PMI recipe and a standard-OPSD twin that differ only in mode and
    output_dir; the paper's settings (LoRA r64, lr 5e-6, 32 rollouts x 1,024 tokens, beta 1,
    clip 10, KL(q || p), avg@k evaluation); every recipe a valid config (paths aside)."""
    names = {os.path.basename(p)[:-5] for p in RECIPES}
    assert names == {f"{model}-{mode}" for model in PUBLISHED for mode in ("pmi", "opsd")}
    for model in PUBLISHED:
        pmi, opsd = (
            json.load(open(os.path.join(os.path.dirname(RECIPES[0]), f"{model}-{m}.json"))) for m in ("pmi", "opsd")
        )
        assert {k for k in pmi if pmi[k] != opsd[k]} == {"mode", "output_dir"}
        assert (pmi["mode"], opsd["mode"]) == ("pmi", "opsd")
        setting = {
            k: pmi[k]
            for k in (
                "lora",
                "lora_rank",
                "lr",
                "batch_size",
                "grad_accum",
                "max_new_tokens",
                "beta",
                "clip",
                "jsd_beta",
                "center",
                "loss_temperature",
                "anchor",
            )
        }
        assert setting == dict(
            lora=True,
            lora_rank=64,
            lr=5e-6,
            batch_size=32,
            grad_accum=1,
            max_new_tokens=1024,
            beta=1.0,
            clip=10.0,
            jsd_beta=0.0,
            center=True,
            loss_temperature=1.0,
            anchor=False,
        )
        assert pmi["eval_samples"] > 1 and pmi["eval_temperature"] > 0  # avg@k: k sampled answers per question
    for path in RECIPES:
        config, flags = parse_args(["--config", path, "--dry-run"])
        assert flags.dry_run and config.architecture


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: os.path.basename(p)[:-5])
def test_dry_run_prints_the_plan_of_each_recipe_without_the_model(path, capsys):
    """No directory, no download: the recipe's architecture gives the plan; its parameter count
    rounds to the published one, the step is 32,768 rollout tokens, and splitting the step over
    32 GPUs leaves each a quarter of the activations of 8 GPUs' (a rollout against four)."""
    assert not os.path.exists(json.load(open(path))["model_path"])
    assert cli_main(["train", "--config", path, "--dry-run", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    model = os.path.basename(path).rsplit("-", 1)[0]
    billions = float(out.split(" B parameters")[0].split()[-1])
    assert round(billions, 1) == PUBLISHED[model], out
    assert "32 rollouts x 1,024 tokens = 32,768 rollout tokens" in out and "the config's architecture key" in out
    assert "per GPU at world size 8 (data parallel" in out and "  4 rollouts a micro-batch" in out
    assert "<- this config" in out
    config, _ = parse_args(["--config", path, "--dry-run"])
    eight, all_32 = plan.plan(config, 8, 512), plan.plan(config, 32, 512)
    for checkpointing in ("on", "off"):
        assert eight["activations"][checkpointing] == 4 * all_32["activations"][checkpointing]
    assert eight["weights"] == all_32["weights"]


def test_dry_run_refuses_what_torchrun_would(capsys):
    """A batch that does not split over the world size (32 over 3 GPUs) is refused by name, as
    the run itself would refuse it (it was planned as 11 rollouts a GPU), and so is a LoRA
    target the plan cannot count (it was counted as no adapter)."""
    path = RECIPES[0]
    assert cli_main(["train", "--config", path, "--dry-run", "--world-size", "3"]) == 2
    assert "batch_size" in capsys.readouterr().err
    # A LoRA target the plan cannot count (the run refuses the typo, and the head, too).
    assert cli_main(["train", "--config", path, "--dry-run", "--lora-targets", "q_proj,q_projj"]) == 2
    assert "lora_targets" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--prompt-tokens", "40000"], "exceeds the model's 40,960 positions"),
        (["--max-new-tokens", "50000"], "exceeds the model's 40,960 positions"),
        (
            [
                "--architecture",
                '{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, '
                '"num_attention_heads": 3}',
            ],
            "num_attention_heads 3 does not divide hidden_size 64",
        ),
        (
            [
                "--architecture",
                '{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, '
                '"num_attention_heads": 4, "num_key_value_heads": 3}',
            ],
            "num_key_value_heads 3 does not group",
        ),
        (["--max-new-tokens", "40961"], "the prompt (--prompt-tokens) plus max_new_tokens (40,962 tokens)"),
    ],
)
def test_dry_run_refuses_what_the_model_would(flags, message, capsys):
    """A context plus rollout past the model's positions (Qwen3-8B's 40,960), and heads that do
    not split the hidden size or group the query heads, are refused as the run would refuse
    them. Fails on a plan printed for a run that cannot exist."""
    qwen3_8b = next(path for path in RECIPES if path.endswith("qwen3-8b-pmi.json"))
    assert cli_main(["train", "--config", qwen3_8b, "--dry-run", *flags]) == 2
    assert message in capsys.readouterr().err


def test_dry_run_reads_a_model_directorys_config_json(tmp_path, capsys):
    """A local directory with only a config.json (no weights, no tokenizer) plans from it; the
    toy model plans too; with neither a directory nor an architecture key the run is refused
    by name."""
    config = tiny_config("olmo2")
    config.save_pretrained(tmp_path / "tiny")
    assert sorted(os.listdir(tmp_path / "tiny")) == ["config.json"]
    args = ["train", "--model-path", str(tmp_path / "tiny"), "--dry-run", "--lora", "false"]
    assert cli_main(args + ["--max-new-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert f"model: {tmp_path / 'tiny' / 'config.json'}" in out
    from transformers import AutoModelForCausalLM

    count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert f"{count / 1e9:.2f} B parameters" in out and "full fine-tuning (+ a frozen copy)" in out
    assert cli_main(["train", "--dry-run"]) == 0 and "the toy model" in capsys.readouterr().out
    # null positions and key/value heads (they default): planned, as before the checks came
    values = json.load(open(tmp_path / "tiny" / "config.json"))
    (tmp_path / "tiny" / "config.json").write_text(
        json.dumps({**values, "max_position_embeddings": None, "num_key_value_heads": None})
    )
    assert cli_main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli_main(["train", "--model-path", str(tmp_path / "none"), "--dry-run"]) == 2
    assert "has no config.json and the config has no architecture key" in capsys.readouterr().err


def test_the_plan_under_fsdp_splits_the_state_over_the_ranks():
    """Full fine-tuning with a frozen copy at 8 ranks: FSDP2 holds an eighth of the weights (both
    copies), gradients and AdamW state, plus what it gathers: each copy's root unit (embeddings,
    lm_head, norm) and two layers. Fails on a plan that still counts the whole model per GPU."""
    config_path = os.path.join(os.path.dirname(__file__), "..", "configs", "qwen3-8b-pmi.json")
    recipe, _ = parse_args(["--config", config_path, "--dry-run"])
    config, arch = dataclasses.replace(recipe, lora=False, anchor=True), recipe.architecture
    replicated = plan.plan(config, 8, 512)
    sharded = plan.plan(dataclasses.replace(config, fsdp=True), 8, 512)
    root = plan.root_parameter_count(arch)
    layer = (replicated["params"] - root) // arch["num_hidden_layers"]
    assert sharded["weights"] == replicated["weights"] // 8 + (2 * root + 2 * layer) * 2
    assert sharded["optimizer"] == replicated["optimizer"] // 8 and sharded["gradients"] == replicated["gradients"] // 8
    assert sharded["activations"] == replicated["activations"]
