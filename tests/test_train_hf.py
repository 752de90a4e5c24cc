"""Issue #25: what a Hugging Face user expects of the trainer. Every checkpoint loads with
from_pretrained as it is (LoRA: AutoPeftModelForCausalLM, the adapter naming its base; full
fine-tuning: AutoModelForCausalLM), and `pmi-opsd export` writes a standalone model from any
checkpoint, the old ones without those files too; greedy generation from each loaded model
equals the trainer's own evaluation output."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train.checkpoint import META_FILE, STATE_FILE  # noqa: E402
from pmi_kernels.train.cli import main as cli_main  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import tiny  # noqa: E402

KINDS = {"lora": dict(lora=True), "full": dict(lora=False, anchor=True)}


@pytest.fixture(scope="module", params=list(KINDS))
def finished_run(request, tmp_path_factory):
    """(kind, trainer after a finished 2-step run, its output directory)."""
    root = tmp_path_factory.mktemp(request.param)
    trainer = Trainer(tiny(root, **KINDS[request.param], lr=3e-2))
    trainer.train(progress=False)
    return request.param, trainer, root / "run"


def greedy(model, tokenizer, prompts, max_new_tokens):
    """Greedy continuations of token-id prompts, as a user would run them: left-padded by the
    loaded tokenizer, trimmed at the first EOS."""
    tokenizer.padding_side = "left"  # a decoder-only model generates after its prompt's last token
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    rows = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        rows.append(row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
    return rows


def assert_generates_as_the_trainer(trainer, model, tokenizer, equal=True):
    """Greedy output on the held-out prompts (eval_limit of them) equals the evaluation's."""
    prompts = trainer.eval_prompts
    want = trainer.generate(prompts, 0.0, 1.0, trainer.config.max_new_tokens)
    got = greedy(model.eval(), tokenizer, prompts, trainer.config.max_new_tokens)
    assert ([tokenizer.decode(g) for g in got] == [trainer.tokenizer.decode(w) for w in want]) == equal


def load(path, kind):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loader = AutoPeftModelForCausalLM if kind == "lora" else AutoModelForCausalLM
    return loader.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_every_checkpoint_loads_with_from_pretrained(finished_run):
    """Fails on a checkpoint that holds only the trainer's state (full fine-tuning), or an adapter
    whose base_model_name_or_path is null (LoRA), or no tokenizer."""
    kind, trainer, out = finished_run
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / STATE_FILE).is_file() and (checkpoint / META_FILE).is_file()  # --resume's, kept
    if kind == "lora":
        base = json.loads((checkpoint / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert base == str(out / "toy-base")
    model, tokenizer = load(checkpoint, kind)
    assert_generates_as_the_trainer(trainer, model, tokenizer)
    # The training moved the output: the base alone does not generate as the trainer does.
    assert_generates_as_the_trainer(trainer, *load(out / "toy-base", "full"), equal=False)


@pytest.mark.parametrize("old_format", [False, True], ids=["new", "old-format"])
def test_export_writes_a_standalone_model(finished_run, tmp_path, old_format):
    """`pmi-opsd export CHECKPOINT OUT --merge`: the full model (LoRA merged), loaded with
    AutoModelForCausalLM, generates as the trainer does; also from a checkpoint that has only
    state.pt and checkpoint.json (before this issue's files). Without --merge a LoRA checkpoint
    exports its adapter. An OUT that holds files is refused. Fails without the subcommand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, trainer, out = finished_run
    checkpoint = out / "checkpoint-2"
    if old_format:
        old = out / "checkpoint-old"
        old.mkdir(exist_ok=True)
        for name in (STATE_FILE, META_FILE):
            (old / name).write_bytes((checkpoint / name).read_bytes())
        checkpoint = old
    assert cli_main(["export", str(checkpoint), str(tmp_path / "merged"), "--merge"]) == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert_generates_as_the_trainer(trainer, model, AutoTokenizer.from_pretrained(tmp_path / "merged"))
    if kind == "lora":
        assert cli_main(["export", str(checkpoint), str(tmp_path / "adapter")]) == 0
        assert_generates_as_the_trainer(trainer, *load(tmp_path / "adapter", kind))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("a user's file")
    assert cli_main(["export", str(checkpoint), str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "notes.txt").read_text() == "a user's file"


def hub_cache(root, repo_id, files_from):
    """A Hugging Face cache at root/hub holding repo_id, laid out as huggingface_hub lays it out:
    models--org--name/ with blobs/ (the files by hash), snapshots/<commit>/ (links to the blobs)
    and refs/main (the commit)."""
    import hashlib

    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for path in files_from.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (repo / "snapshots" / commit / path.name).symlink_to(os.path.relpath(blob, repo / "snapshots" / commit))
    return root / "hub"


def run_cli(args, env):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "pmi_kernels.train.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


def test_model_path_takes_a_hub_id_from_the_cache_offline(tmp_path):
    """--model-path org/name, the model only in the Hugging Face cache and HF_HUB_OFFLINE=1: the
    run trains and its LoRA adapter names the id as its base; an id not in the cache is a
    one-line error (exit 2) before anything runs (no output directory). Fails on the old check,
    'is not a local directory'."""
    from pmi_kernels.train.demo.toy import toy_model, toy_problems, toy_tokenizer

    tokenizer = toy_tokenizer()
    toy_model(tokenizer).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cache = hub_cache(tmp_path / "hf", "tiny-org/toy-qwen3", tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in toy_problems(8, 1)))
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf")}
    common = [
        "train",
        "--train-file",
        str(data),
        "--answer-field",
        "null",
        "--device",
        "cpu",
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--max-steps",
        "1",
        "--eval-limit",
        "2",
        "--use-chat-template",
        "false",
        "--diagnostics-every",
        "1",
    ]
    missing = run_cli([*common, "--model-path", "tiny-org/not-there", "--output-dir", str(tmp_path / "none")], env)
    assert missing.returncode == 2 and not (tmp_path / "none").exists()
    assert missing.stderr.strip().splitlines() == [
        "error: config: model_path 'tiny-org/not-there' is not a local directory, and as a Hugging Face Hub id it "
        "cannot be loaded (HF_HUB_OFFLINE is set and it is not in the Hugging Face cache)"
    ]
    done = run_cli([*common, "--model-path", "tiny-org/toy-qwen3", "--output-dir", str(tmp_path / "run")], env)
    assert done.returncode == 0, done.stderr[-3000:]
    adapter = json.loads((tmp_path / "run" / "checkpoint-1" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "tiny-org/toy-qwen3"


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith((".json", ".yaml", ".yml"))))
def test_every_recipe_loads_and_reads_the_same_as_yaml(name, tmp_path):
    """Each file in configs/ passes every check (as --dry-run reads it), and the same keys
    written as YAML (.yaml and .yml) give the same config. Fails on YAML refused (JSON only)."""
    import yaml

    from pmi_kernels.train.config import parse_args, read_config_file

    path = os.path.join(CONFIGS, name)
    config = parse_args(["--config", path, "--dry-run"])[0]
    for suffix in (".yaml", ".yml"):
        twin = tmp_path / ("recipe" + suffix)
        twin.write_text(yaml.safe_dump(read_config_file(path), sort_keys=False))
        assert parse_args(["--config", str(twin), "--dry-run"])[0] == config


def test_yaml_configs_take_the_same_keys_and_checks(tmp_path):
    """Numbers as their authors write them (1e-5, not a string as YAML 1.1 reads it), null, lists;
    a quoted number, an unknown key and a YAML syntax error are refused as in JSON, naming the
    file (and the line)."""
    from pmi_kernels.train.config import parse_config

    good = tmp_path / "run.yaml"
    good.write_text(
        "lr: 1e-5\nclip: null\nbeta: 2\nmarkers: [wait, hmm]\nwarmup_steps: 3\nlora: false\n"
        "anchor: true\nreport_to: none\n"
    )
    config = parse_config(["--config", str(good), "--dry-run", "--beta", "0.5"])
    assert (config.lr, config.clip, config.beta, config.markers, config.warmup_steps, config.lora) == (
        1e-5,
        None,
        0.5,
        ["wait", "hmm"],
        3,
        False,
    )
    assert config.report_to == ["none"]  # one string, as transformers' and TRL's configs write it
    assert type(config.lr) is float
    for text, message in [
        ("lr: '1e-5'\n", "lr"),
        ("lr: 1e-5\nbetta: 2\n", r"unknown keys \['betta'\]"),
        ("lr: 1e-5\nmarkers: [wait\n", r"bad.yml: not valid YAML .*line 3"),
    ]:
        bad = tmp_path / "bad.yml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            parse_config(["--config", str(bad), "--dry-run"])


def test_report_to_every_tracker_offline(tmp_path):
    """--report-to tensorboard,trackio,wandb,mlflow, each offline (trackio's local database,
    WANDB_MODE=offline, mlflow's file store): each tracker's own files hold every row's loss at
    its step, with metrics.jsonl's keys, and the run's config. Fails without report_to."""
    for module in ("tensorboard", "trackio", "wandb", "mlflow"):
        pytest.importorskip(module)
    out = tmp_path / "run"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "MLFLOW_TRACKING_URI": "",
    }
    done = run_cli(
        [
            "train",
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--sft-steps",
            "0",
            "--eval-limit",
            "2",
            "--lr",
            "0.0123",
            "--report-to",
            "tensorboard,trackio,wandb,mlflow",
        ],
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {row["step"]: row["loss"] for row in rows if "loss" in row}
    keys = {key for row in rows for key, value in row.items() if key != "step" and value is not None}
    assert len(losses) == 2

    import sqlite3

    db = sqlite3.connect(tmp_path / "trackio" / "pmi-opsd.db")
    logged = {}  # a step's row and its evaluation's are two rows
    for step, metrics in db.execute("SELECT step, metrics FROM metrics"):
        logged.setdefault(step, {}).update(json.loads(metrics))
    assert {step: logged[step]["loss"] for step in losses} == losses
    assert set().union(*logged.values()) == keys
    assert [json.loads(c)["lr"] for (c,) in db.execute("SELECT config FROM configs")] == [0.0123]

    wandb_file = next((out / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert all(json.dumps(loss).encode() in wandb_file for loss in losses.values())
    assert b"0.0123" in wandb_file  # the config

    mlflow_run = next(p for p in (out / "mlruns").glob("*/*") if (p / "metrics").is_dir())
    points = [line.split() for line in (mlflow_run / "metrics" / "loss").read_text().splitlines()]
    assert {int(step): float(value) for _, value, step in points} == losses
    metrics = mlflow_run / "metrics"
    assert {str(p.relative_to(metrics)) for p in metrics.rglob("*") if p.is_file()} == keys
    assert (mlflow_run / "params" / "lr").read_text() == "0.0123"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(losses)


def test_report_to_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    """An unknown tracker, "none" beside trackers, and a tracker whose library is missing (also
    tensorboard through the older --tensorboard true) are one-line errors naming the extra to
    install, before anything loads. Fails on the ModuleNotFoundError after the warm-up."""
    import importlib.util

    import pmi_kernels.train.loop as loop
    import pmi_kernels.train.trackers as trackers

    monkeypatch.setattr(loop, "load_model", lambda *a: pytest.fail("the model loaded before the check"))
    missing = {"wandb", "tensorboard"}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name, *a: None if name in missing else real_find_spec(name, *a)
    )
    for overrides, message in [
        (dict(report_to=["comet"]), "report_to: 'comet' is not one of tensorboard, trackio, wandb, mlflow, none"),
        (dict(report_to=["none", "mlflow"]), "report_to: 'none' with trackers"),
        (
            dict(report_to=["wandb"]),
            r"report_to wandb: its library is not installed \(pip install "
            r"'pmi-kernels\[trackers\]', or pip install wandb\)",
        ),
        (dict(tensorboard=True), r"report_to tensorboard: .*'pmi-kernels\[train\]'"),
    ]:
        with pytest.raises(ValueError, match=message):
            loop.Trainer(tiny(tmp_path, **overrides))


def test_every_flag_says_what_it_does_in_groups(capsys):
    """`pmi-opsd train --help`: every key's flag has a few words of help and its default, in the
    group its field names, none "(default see docs)"; docs/config.md is made from the same text.
    Fails on the old help (only "(default X)", ungrouped)."""
    import dataclasses

    from pmi_kernels.train import TrainConfig
    from pmi_kernels.train.config_help import GROUPS, REFERENCE, reference_text

    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    text = capsys.readouterr().out
    assert "see docs" not in text
    sections = {}  # group title -> its lines
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            title = line[:-1]
            sections[title] = []
        elif sections:
            sections[title].append(line)
    assert [title for title in sections if title in GROUPS] == list(GROUPS)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        words = f.metadata["help"].split()
        assert len(words) >= 3, f.name
        body = " ".join(" ".join(sections[f.metadata["group"]]).split())
        assert f"{flag} " in body and " ".join(words) + " (default " in body, f.name
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, REFERENCE)) as fh:
        assert fh.read() == reference_text(), f"{REFERENCE} is stale: regenerate it (its first lines say how)"


def test_a_sharded_checkpoint_holds_the_whole_model(tmp_path):
    """torchrun, two ranks, fsdp: the checkpoint's Hugging Face files (rank 0 writes the state dict
    the ranks gather) load with AutoModelForCausalLM and equal its shards read whole; export
    rebuilds the same weights from the shards alone. Fails on a rank's shard saved as the model."""
    from transformers import AutoModelForCausalLM

    from test_train_distributed import torchrun
    from test_train_fsdp import sharded_weights

    out = tmp_path / "run"
    done = torchrun(tmp_path, out, "--lora", "false", "--anchor", "true", "--fsdp", "true", "--max-steps", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    want = sharded_weights(out, 1)
    loaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint-1").state_dict()
    assert cli_main(["export", str(out / "checkpoint-1"), str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    assert len(want) > 10
    for name, value in want.items():
        assert torch.equal(loaded[name], value) and torch.equal(exported[name], value), name
