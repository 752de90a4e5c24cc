"""Issue #25: what a Hugging Face user expects of the trainer. Every checkpoint loads with
from_pretrained as it is (LoRA: AutoPeftModelForCausalLM, the adapter naming its base; full
fine-tuning: AutoModelForCausalLM), and `pmi-opsd export` writes a standalone model from any
checkpoint, the old ones without those files too; greedy generation from each loaded model
equals the trainer's own evaluation output."""
import json

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
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    rows = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        rows.append(row[:row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row)
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

