"""Issue #28, items 4, 8 and 11: what the trainer's commands are given. A data or config file's
problem is one line naming the file and line; a row far too long for the model is refused
before all of it is tokenized; a stop signal during set-up ends it at once (exit 130/143); every
subcommand refuses bad input with one line and exit 2."""

import json
import os
import random
import string

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.prompts import DEFAULT_TEMPLATES, prompt_ids  # noqa: E402
from pmi_kernels.train import interrupts  # noqa: E402
from pmi_kernels.train.cli import main as cli_main  # noqa: E402
from pmi_kernels.train.contexts import KINDS  # noqa: E402
from pmi_kernels.train.data.tokenized import PREFIX_CHARS, contexts_ids  # noqa: E402
from pmi_kernels.train.demo.toy import toy_model, toy_problems, toy_tokenizer  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import tiny, tiny_flags  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The toy model and its character tokenizer as a local model directory (512 positions)."""
    path = tmp_path_factory.mktemp("model")
    tokenizer = toy_tokenizer()
    toy_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


# ---- data and config files (item 8) ----------------------------------------------------
BAD_LINES = {
    "bad-json": (b'{"question": "q?", "solution": ', "line 3: not valid JSON"),
    "a-list": (b'["q?", "s"]', "line 3: a JSON list, not an object of fields"),
    "a-number": (b"7", "line 3: a JSON int, not an object of fields"),
    "not-utf8": (b'{"question": "caf\xe9?"}', "line 3: not UTF-8 text"),
}


@pytest.mark.parametrize("bad", BAD_LINES)
def test_a_bad_line_of_a_data_file_is_named(tmp_path, capsys, model_dir, bad):
    """The third line of the train file is broken: exit 2, one line naming the file and the line.
    Fails on datasets' DatasetGenerationError, which named neither the line nor (for a
    non-object) the problem."""
    line, message = BAD_LINES[bad]
    rows = [json.dumps(row).encode() for row in toy_problems(4, 0)]
    data = tmp_path / "train.jsonl"
    data.write_bytes(b"\n".join(rows[:2] + [line] + rows[2:]) + b"\n")
    assert cli_main(["train", *tiny_flags(tmp_path, model_path=model_dir, train_file=data)]) == 2
    assert one_line_error(capsys).startswith(f"error: {data}: {message}")


def test_a_refused_run_leaves_no_directory_it_made(tmp_path, capsys, model_dir):
    """A run refused at start (--resume of nothing; a bad data line, found after the directory
    is locked) removes the output directory it created, still empty; one the user made is kept.
    Fails on the trainer that left an empty runs/<name>/ behind (found by a new-user trial)."""
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(toy_problems(1, 0)[0]) + "\n{oops\n")
    made_by_user = tmp_path / "mine"
    made_by_user.mkdir()
    for out, flags in (
        (tmp_path / "resumed", ["--resume", "true"]),
        (tmp_path / "bad", ["--train-file", str(data)]),
        (made_by_user, ["--train-file", str(data)]),
    ):
        argv = ["train", *tiny_flags(tmp_path, model_path=model_dir, output_dir=out), *flags]
        assert cli_main(argv) == 2
        assert one_line_error(capsys).startswith("error: ")
        assert out.exists() == (out == made_by_user)


def test_a_row_without_a_field_is_named_by_its_line(tmp_path, model_dir):
    """Blank lines are skipped but counted: the row on line 4 is named so. Fails on a 0-based row
    index that is no line of the file."""
    rows = toy_problems(3, 0)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join([json.dumps(rows[0]), "", json.dumps(rows[1]), json.dumps({"question": "q?"})]))
    with pytest.raises(ValueError, match=f"^{data}: line 4 has no text field 'solution'$"):
        Trainer(tiny(tmp_path, model_path=str(model_dir), train_file=str(data)))


@pytest.mark.parametrize("layout", ["json-array", "parquet", "utf8-bom"])
def test_other_layouts_read_the_same_rows(tmp_path, model_dir, layout):
    """A JSON array of objects, parquet and a UTF-8 file with a byte-order mark give the rows a
    JSON Lines file gives. Fails on a layout the reader no longer takes."""
    rows = toy_problems(5, 4)
    want = Trainer(
        tiny(tmp_path / "lines", model_path=str(model_dir), train_file=str(write_rows(tmp_path / "rows.jsonl", rows)))
    ).train_rows
    data = tmp_path / f"rows.{'parquet' if layout == 'parquet' else 'json'}"
    if layout == "parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(data)
    elif layout == "json-array":
        data.write_text(json.dumps(rows, indent=2))
    else:
        data.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(row) for row in rows).encode())
    got = Trainer(tiny(tmp_path / layout, model_path=str(model_dir), train_file=str(data))).train_rows
    assert got == want and len(got) == 5


@pytest.mark.parametrize("what", ["directory", "missing"])
def test_a_data_path_that_is_no_file_says_what_it_is(tmp_path, capsys, model_dir, what):
    """--train-file naming a directory says so (it said "does not exist"). Fails on one message
    for both."""
    path = tmp_path / "data"
    if what == "directory":
        path.mkdir()
    assert cli_main(["train", *tiny_flags(tmp_path, model_path=model_dir, train_file=path)]) == 2
    said = "is a directory; name a .jsonl, .json or .parquet file in it" if what == "directory" else "does not exist"
    assert one_line_error(capsys) == f"error: config: train_file {str(path)!r} {said}"


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    """Fails on the bare UnicodeDecodeError message, which named no file."""
    config, raw = tmp_path / "c.json", b'{"beta": 2.0, "markers": ["caf\xe9"]}'
    config.write_bytes(raw)
    assert cli_main(["train", "--config", str(config)]) == 2
    assert one_line_error(capsys).startswith(f"error: --config {config}: not UTF-8 text (byte {raw.index(0xE9)}:")


# ---- every subcommand's bad input (item 11) -----------------------------------------------
def test_plot_and_compare_refuse_bad_paths_in_one_line(tmp_path, capsys, monkeypatch):
    """`plot` of a missing metrics file, a bare `plot` where no run is, a metrics file with a bad
    line, `compare --output-dir` naming a file: exit 2 and one line, as `train`. Fails on the
    raw tracebacks (exit 1) they gave."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["plot", "--metrics", "missing.jsonl"]) == 2
    assert (
        one_line_error(capsys) == "error: --metrics missing.jsonl: does not exist (a run's metrics.jsonl, in its "
        "output_dir)"
    )
    assert cli_main(["plot"]) == 2
    assert one_line_error(capsys).startswith("error: --metrics runs/toy/metrics.jsonl: does not exist")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": \n{"step": 2}\n')
    assert cli_main(["plot", "--metrics", "metrics.jsonl"]) == 2
    assert one_line_error(capsys).startswith("error: metrics.jsonl: line 2: not valid JSON")
    assert cli_main(["plot", "--metrics", "metrics.jsonl", "--out", "nowhere/m.png"]) == 2
    assert one_line_error(capsys) == "error: --out nowhere/m.png: its directory does not exist"
    (tmp_path / "a-file").write_text("")
    assert cli_main(["compare", "--output-dir", "a-file"]) == 2
    assert (
        one_line_error(capsys) == "error: config: output_dir 'a-file' cannot be created (FileExistsError: File exists)"
    )


def test_plot_leaves_out_a_last_line_cut_short(tmp_path, capsys):
    """A run killed while it wrote a row leaves a partial last line: plot draws the rows before it."""
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "lo')
    assert cli_main(["plot", "--metrics", str(metrics)]) == 0
    assert (tmp_path / "metrics.png").stat().st_size > 1000


# ---- rows far too long for the model (item 4) -----------------------------------------
class RecordingTokenizer:
    """A tokenizer's __call__, recording the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest, self.chat_template = tokenizer, 0, None

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, [texts] if isinstance(texts, str) else texts)])
        return self.tokenizer(texts, **kwargs)


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained here on the toy's texts (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    texts = [row["question"] + " " + row["solution"] for row in toy_problems(300, 0)]
    core.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>")


def words(rng, chars: int) -> str:
    vocabulary = [w for row in toy_problems(50, 1) for w in row["question"].split()] + [
        "".join(rng.choices(string.ascii_letters, k=rng.randint(3, 12))) for _ in range(200)
    ]
    text = []
    while sum(map(len, text)) < chars:
        text.append(rng.choice(vocabulary))
    return " ".join(text)[:chars]


@pytest.mark.parametrize("kind", ["toy", "bpe"])
def test_a_long_row_is_refused_on_a_prefix(kind):
    """A question of 500,000 characters, the model's 512 positions: refused naming the context and
    the row, with a token count the whole text does pass, having tokenized no text longer than
    PREFIX_CHARS; with positions enough, the same row's ids are its whole text's. Fails on the
    whole row tokenized before the check (a 2 MB question took 24 s and 1.4 GB), or on a prefix
    check that refuses a row that fits."""
    seed = int(torch.randint(2**31 - 1, ()))  # from the test's seed (conftest)
    tokenizer = toy_tokenizer() if kind == "toy" else bpe_tokenizer()
    rows = toy_problems(3, seed % 1000)
    rows.insert(1, {**rows[0], "question": words(random.Random(seed), 500_000)})
    recording = RecordingTokenizer(tokenizer)
    with pytest.raises(
        ValueError,
        match=r"^templates.student \(train\): row 1: its context \(more than (\d+) tokens"
        r"\) plus max_new_tokens \(10\) exceeds the model's 512 positions$",
    ) as err:
        contexts_ids(recording, DEFAULT_TEMPLATES, KINDS, rows, False, positions=512, max_new_tokens=10)
    assert recording.longest <= PREFIX_CHARS
    stated = int(err.value.args[0].split("more than ")[1].split(" ")[0])
    whole = len(prompt_ids(tokenizer, DEFAULT_TEMPLATES, "student", rows[1], False))
    assert 502 < stated < whole
    got = contexts_ids(tokenizer, DEFAULT_TEMPLATES, KINDS, rows, False, positions=10**7, max_new_tokens=10)
    assert got == {kind: [prompt_ids(tokenizer, DEFAULT_TEMPLATES, kind, row, False) for row in rows] for kind in KINDS}


def test_the_trainer_refuses_a_long_row_before_tokenizing_it(tmp_path, model_dir, monkeypatch):
    """A 1 MB question in a train file: the run is refused (exit 2) without the trainer's tokenizer
    ever reading more than PREFIX_CHARS characters of it. Fails on the row tokenized in full."""
    from transformers import PreTrainedTokenizerFast

    rows = toy_problems(4, 0)
    rows[2]["question"] = "x" * 2**20
    data = write_rows(tmp_path / "train.jsonl", rows)
    longest = []
    real = PreTrainedTokenizerFast.__call__

    def recording(self, text=None, *args, **kwargs):
        longest.append(max(map(len, [text] if isinstance(text, str) else text or [""])))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerFast, "__call__", recording)
    with pytest.raises(ValueError, match=r"templates.student \(train\): row 2: its context \(more than"):
        Trainer(tiny(tmp_path, model_path=str(model_dir), train_file=str(data)))
    assert longest and max(longest) <= PREFIX_CHARS


# ---- a stop during set-up (item 4) -----------------------------------------------------
@pytest.mark.parametrize(
    "fault,code,where",
    [("data-row@2=SIGINT", 130, "reading the data"), ("tokenize-chunk@2=SIGTERM", 143, "tokenizing the data")],
)
def test_a_stop_during_set_up_ends_it(tmp_path, capsys, monkeypatch, model_dir, fault, code, where):
    """SIGINT while the data is read, SIGTERM while it is tokenized: the run ends there, with the
    signal's exit code and one line, nothing written; the same for a resumed run, whose message
    says it is as it was. Fails on a signal ignored until the training loop (the bug: a long
    tokenization went on to its end, then the run failed or trained)."""
    data = write_rows(tmp_path / "train.jsonl", toy_problems(6, 0))
    flags = tiny_flags(tmp_path, model_path=model_dir, train_file=data, eval_file=data, max_steps=1)
    monkeypatch.setenv(interrupts.FAULT_ENV, fault)
    interrupts.FAULT_ARRIVALS.clear()
    assert cli_main(["train", *flags]) == code
    name = "SIGINT" if code == 130 else "SIGTERM"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted by {name} during {where}: the run had no checkpoint yet; start it again"
    )
    assert not (tmp_path / "run").exists()  # nothing written, not even the directory it made
    monkeypatch.delenv(interrupts.FAULT_ENV)
    assert cli_main(["train", *flags]) == 0
    before = sorted(os.listdir(tmp_path / "run"))
    monkeypatch.setenv(interrupts.FAULT_ENV, fault)
    interrupts.FAULT_ARRIVALS.clear()
    assert cli_main(["train", *flags, "--resume"]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted by {name} during {where}: the run is as it was; continue it with --resume"
    )
    assert sorted(os.listdir(tmp_path / "run")) == before


@pytest.mark.parametrize("command", [["train", "--max-steps", "1"], ["plot", "--metrics", "metrics.jsonl"]])
def test_a_subcommand_without_the_train_extra_says_what_to_install(tmp_path, command):
    """pip install pmi-kernels (no [train]) installs pmi-opsd too: without transformers or
    matplotlib a subcommand is one line naming the extra, exit 2. Fails on the traceback of
    ModuleNotFoundError (found by a new-user trial)."""
    import subprocess
    import sys

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    hide = "import sys; sys.modules.update(transformers=None, matplotlib=None); "
    code = hide + "from pmi_kernels.train.cli import main; sys.exit(main(sys.argv[1:]))"
    out = subprocess.run(
        [sys.executable, "-c", code, *command], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: pmi-opsd {command[0]} needs the 'train' extra (no module named "
        f"{'transformers' if command[0] == 'train' else 'matplotlib'!r}): pip install 'pmi-kernels[train]'"
    ]


def test_plot_and_compare_help_name_their_options(capsys):
    """compare --help names --seeds, the keys it sets per run and its own defaults; plot --help
    says what --metrics is and its default. Fails on the help that printed the module's docstring
    alone, and on --metrics without a word (found by a new-user trial)."""
    from pmi_kernels.train.config import TOY_DEFAULTS
    from pmi_kernels.train.demo.compare import COMPARE_DEFAULTS, SET_PER_RUN

    assert cli_main(["compare", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    own = [key for key, value in COMPARE_DEFAULTS.items() if TOY_DEFAULTS.get(key) != value]
    for flag in ["--seeds", *(f"--{key}" for key in SET_PER_RUN), *(f"--{key.replace('_', '-')}" for key in own)]:
        assert flag in text, flag
    with pytest.raises(SystemExit):
        cli_main(["plot", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: pmi-opsd plot" in text and "--metrics METRICS a run's metrics.jsonl" in text
