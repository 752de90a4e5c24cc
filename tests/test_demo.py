"""Issue #17: the main job's comparison. The embedded shortcut task's structure, the cached
warm-up base (reused, and rebuilt when it is corrupt or does not match), and the comparison's
output (its table's rows and columns, its files, the second run skipping the warm-up)."""

import json
import os
import random
import re
import statistics
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from pmi_kernels.train.cli import main as cli_main  # noqa: E402
from pmi_kernels.train.config import TrainConfig  # noqa: E402
from pmi_kernels.train.data.data import extract_answer  # noqa: E402
from pmi_kernels.train.demo import base_cache, compare  # noqa: E402
from pmi_kernels.train.demo.tasks import problems, warmup_target  # noqa: E402
from pmi_kernels.train.loop import Trainer  # noqa: E402
from test_train import TINY  # noqa: E402

QUESTION = re.compile(r"has (\d+) \w+ and (gets|gives) (\d+) (more|away)")


def solve(question: str) -> int:
    """The answer, read from the question alone."""
    a, verb, b, _ = QUESTION.search(question).groups()
    return int(a) + int(b) if verb == "gets" else int(a) - int(b)


def test_the_shortcut_task_needs_the_question():
    """The question carries the numbers, the reference only the method and the answer. Fails on
    a reference that leaks an operand (then the PMI residual has nothing to teach: the
    arithmetic task's flaw) or on an answer that the question does not determine."""
    rows = problems("shortcut", 400, seed=3)
    pattern = TrainConfig().answer_pattern
    for row in rows:
        assert solve(row["question"]) == int(row["answer"])
        reference = row["solution"]
        assert extract_answer(reference, pattern) == row["answer"]
        without_answer = reference.replace(f"\\boxed{{{row['answer']}}}", "")
        assert not re.search(r"\d", without_answer), reference  # no number but the answer
        assert reference.split(".")[0] in ("Add them", "Subtract")
        # The worked solutions the student is taught are correct, and some check with markers.
        for text, _ in row["warmup"]["student"]:
            assert extract_answer(text, pattern) == row["answer"]
            for left, op, right, result in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", text):
                assert (int(left) + int(right) if op == "+" else int(left) - int(right)) == int(result)
    rng = random.Random(0)
    texts = [warmup_target(row, "student", rng) for row in rows[:200]]
    assert 0.2 < sum("Wait, let me check" in t for t in texts) / len(texts) < 0.8
    # Both answer kinds (addition, subtraction), and the arithmetic task keeps its worked references.
    assert {row["solution"].split(".")[0] for row in rows} == {"Add them", "Subtract"}
    assert all(re.search(r"\d+ [+-] \d+ =", row["solution"]) for row in problems("arithmetic", 20, seed=3))


def test_the_teacher_is_taught_the_shortcut_and_the_student_the_work():
    """What each context is taught to write: with the reference in view (teacher, refonly) the
    answer alone half the time; without it (student) always the work. Fails if the student is
    taught the shortcut (then no context would need the question)."""
    rows = problems("shortcut", 300, seed=1)
    rng = random.Random(0)
    for kind, low, high in (("student", 0.0, 0.0), ("teacher", 0.35, 0.65), ("refonly", 0.35, 0.65)):
        share = sum("=" not in warmup_target(row, kind, rng) for row in rows) / len(rows)
        assert low <= share <= high, (kind, share)
    with pytest.raises(ValueError, match="toy_task"):
        problems("nope", 1, 0)


def test_position_parts_name_the_work_and_the_answer():
    """The parts the comparison reads the decomposition at. Fails on an operand read as the
    result (the PMI residual's and the reference's places swapped) or a check digit as the work."""
    text = "19 + 3 = 22. Wait, let me check: 22 - 3 = 19. The answer is \\boxed{22}."
    marked = [(char, part) for char, part in zip(text, compare.position_parts(text)) if part]
    assert marked == [
        ("1", "first token"),
        ("9", "operands"),
        ("3", "operands"),
        ("2", "result"),
        ("2", "result"),
        ("W", "'Wait'"),
        ("2", "the check"),
        ("2", "the check"),
        ("3", "the check"),
        ("1", "the check"),
        ("9", "the check"),
        ("2", "the answer"),
        ("2", "the answer"),
    ]
    shortcut = "The answer is \\boxed{7}."
    assert [p for p in compare.position_parts(shortcut) if p] == ["first token", "the answer"]
    assert set(compare.PARTS) >= {p for p in compare.position_parts(text) if p}


def cached(tmp_path, **overrides):
    return TrainConfig(
        **{
            **TINY,
            "output_dir": str(tmp_path / "run"),
            "sft_steps": 2,
            "sft_batch_size": 4,
            "base_cache": str(tmp_path / "bases"),
            "overwrite": True,
            **overrides,
        }
    )


@pytest.fixture
def warmups(monkeypatch):
    """Counts the supervised warm-ups run."""
    calls = []
    real = base_cache.supervised_warmup

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(base_cache, "supervised_warmup", counting)
    return calls


def base_weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.contexts.base_model().named_parameters() if "lora" not in n}


def test_the_second_run_loads_the_cached_base(tmp_path, warmups):
    """Built once, then loaded bit for bit without a warm-up, and the LoRA initialization after
    it is the same either way. Fails on a second warm-up (the cache unused) or on a loaded base
    or adapter that differs from the built one."""
    first = Trainer(cached(tmp_path))
    first.close()  # its directory, for the second
    second = Trainer(cached(tmp_path))
    second.close()
    assert len(warmups) == 1
    a, b = base_weights(first), base_weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    lora = [n for n, p in first.model.named_parameters() if p.requires_grad]
    assert lora and all(
        torch.equal(dict(first.model.named_parameters())[n], dict(second.model.named_parameters())[n]) for n in lora
    )
    # A change of a key the warm-up reads names another base.
    Trainer(cached(tmp_path, sft_lr=1e-3))
    assert len(warmups) == 2 and len(os.listdir(tmp_path / "bases")) == 2


@pytest.mark.parametrize("damage", ["truncated weights", "flipped byte", "edited key", "missing manifest"])
def test_a_damaged_cached_base_is_rebuilt(tmp_path, warmups, capsys, damage):
    """A cached base whose files or key do not check out is said so and rebuilt, never loaded.
    Fails if a damaged base is used silently (a flipped byte loads without error) or crashes."""
    config = cached(tmp_path)
    first = Trainer(config)
    first.close()
    path = base_cache.base_path(config, "cpu")
    weights = os.path.join(path, "model.safetensors")
    if damage == "truncated weights":
        with open(weights, "r+b") as fh:
            fh.truncate(os.path.getsize(weights) // 2)
    elif damage == "flipped byte":
        with open(weights, "r+b") as fh:
            fh.seek(os.path.getsize(weights) - 5)
            byte = fh.read(1)
            fh.seek(-1, os.SEEK_CUR)
            fh.write(bytes([byte[0] ^ 0x40]))
    elif damage == "edited key":
        key_file = os.path.join(path, base_cache.KEY_FILE)
        key = json.load(open(key_file))
        key["sft_steps"] = 999
        json.dump(key, open(key_file, "w"))
    else:
        os.remove(os.path.join(path, base_cache.MANIFEST))
    capsys.readouterr()
    second = Trainer(config)
    assert len(warmups) == 2
    assert "is not used" in capsys.readouterr().err
    a, b = base_weights(first), base_weights(second)
    assert all(torch.equal(a[n], b[n]) for n in a)  # rebuilt: the same warm-up, the same base
    assert base_cache.cache_problem(path, base_cache.base_key(config, "cpu")) is None


def test_abandoned_stores_are_removed(tmp_path, warmups):
    """A run killed while it stored a base leaves .toy-base-<digest>.tmp-<pid>; the next run that
    uses the cache removes it when its process is gone, and leaves a live process's store alone.
    Fails if abandoned temporaries pile up (each the size of a base)."""
    config = cached(tmp_path)
    cache = tmp_path / "bases"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = cache / f".toy-base-{'0' * 16}.tmp-{dead.pid}"
    live = cache / f".toy-base-{'1' * 16}.tmp-{os.getpid()}"
    for path in (abandoned, live):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"partial")
    Trainer(config).close()
    assert not abandoned.exists() and live.exists()
    assert os.path.isdir(base_cache.base_path(config, "cpu"))


def test_base_cache_is_checked():
    with pytest.raises(ValueError, match="base_cache"):
        TrainConfig(base_cache="").validate()
    with pytest.raises(ValueError, match="toy_task"):
        TrainConfig(toy_task="algebra").validate()
    with pytest.raises(ValueError, match="drift_warn_kl"):
        TrainConfig(drift_warn_kl=0.0).validate()


def test_table_has_a_row_per_run_and_the_columns():
    """The comparison's table: the start and the three runs, every column, mean ± sd over
    seeds. Fails on a lost run or column, or a spread printed for one seed."""
    result = {row: {key: 0.5 for key, _, _ in compare.COLUMNS} for row in ["start", "opsd", "pmi-base", "pmi-self"]}
    other = {row: {key: 0.7 for key, _, _ in compare.COLUMNS} for row in result}
    one = compare.format_table(compare.summarize({0: result}), [0]).splitlines()
    heads = [c.strip() for c in one[0].strip("|").split("|")]
    assert heads == ["run"] + [head for _, head, _ in compare.COLUMNS]
    for needed in ("accuracy", "s.e.", "vs start", "KL(q‖p)", "H(p)", "KL(p‖base)", "wait", "check", "cos(tot,ref)"):
        assert needed in heads
    assert [line.split("|")[1].strip() for line in one[2:]] == [
        "start (the warmed-up base)",
        "standard OPSD",
        "PMI, frozen-base anchor",
        "PMI, self anchor",
    ]
    assert "±" not in "\n".join(one)
    two = compare.format_table(compare.summarize({0: result, 1: other}), [0, 1])
    assert "0.600 ± 0.141" in two and "+0.600 ± 0.141" in two  # accuracy; its change from the start


def test_compare_runs_end_to_end_and_reuses_its_base(tmp_path, warmups, capsys, monkeypatch):
    """`pmi-opsd compare` on a tiny budget: the table (4 rows), table.md, summary.json and the
    plot; a second invocation loads the base (no warm-up). Fails on a run missing from the
    output, a second warm-up, or per-run flags that the comparison sets silently taken."""
    monkeypatch.setattr(compare, "PROBE_ROLLOUTS", 4)
    flags = [
        "--output-dir",
        str(tmp_path / "cmp"),
        "--base-cache",
        str(tmp_path / "bases"),
        "--device",
        "cpu",
        "--sft-steps",
        "2",
        "--sft-batch-size",
        "4",
        "--max-steps",
        "2",
        "--eval-limit",
        "8",
        "--eval-every",
        "1",
        "--diagnostics-every",
        "1",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
    ]
    assert cli_main(["compare", *flags]) == 0
    out = capsys.readouterr().out
    assert "(built)" in out
    for label in ("start (the warmed-up base)", "standard OPSD", "PMI, frozen-base anchor", "PMI, self anchor"):
        assert label in out
    assert "Where the teacher's signal lives" in out and all(f"| {part} |" in out for part in compare.PARTS)
    root = tmp_path / "cmp"
    assert (root / "compare.png").stat().st_size > 0 and (root / "table.md").exists()
    summary = json.load(open(root / "summary.json"))
    results = summary["results"]["0"]
    assert set(results) == {"start", "opsd", "pmi-base", "pmi-self"}
    # KL(q‖p) is each row's own target's: the PMI target's at the start (probed by the OPSD run).
    assert results["start"]["kl_q_p"] == results["start"]["kl_target_student"]
    assert results["opsd"]["kl_q_p"] == results["opsd"]["kl_teacher_student"]
    assert results["pmi-self"]["kl_q_p"] == results["pmi-self"]["kl_target_student"]
    assert cli_main(["compare", *flags]) == 0
    assert "(cached)" in capsys.readouterr().out and len(warmups) == 1
    assert cli_main(["compare", *flags, "--anchor", "true"]) == 2
    assert "--anchor" in capsys.readouterr().err
    for seeds in ("0,x", "1,1"):
        assert cli_main(["compare", *flags, "--seeds", seeds]) == 2
        assert "--seeds" in capsys.readouterr().err


def test_one_thread_while_other_processes_are_busy(monkeypatch):
    """The comparison's threads: 1 while other processes used half a core or more over the last
    interval (the machine's CPU time less this process's), else the default; OMP_NUM_THREADS
    left alone. Fails on a busy machine run at the default (the measured 4-8x slowdown), on an
    idle one held at 1, or on this process's own load counted as the others'."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    clock = {"now": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(compare.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(compare, "machine_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(compare, "own_cpu_seconds", lambda: clock["own"])

    def tick(seconds, own, others):
        clock["now"] += seconds
        clock["own"] += own
        clock["busy"] += own + others
        return fitter()

    try:
        fitter = compare.ThreadFitter(2, every=5.0)
        fitter()
        assert tick(5, own=9.0, others=0.5) == 2  # this process busy, the others at 0.1 core
        assert tick(5, own=4.0, others=4.0) == 1  # another process at 0.8 core
        assert tick(2, own=1.0, others=0.0) == 1  # too soon to look again
        assert tick(5, own=5.0, others=0.5) == 2  # the other process gone
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        fixed = compare.ThreadFitter(2)
        fixed()
        clock["now"] += 5
        clock["busy"] += 9.0
        assert fixed() == 2
    finally:
        torch.set_num_threads(before)


# Issue #27: the misread task, whose correction only the question-conditioned part holds.
MISREAD_QUESTION = re.compile(r"has (\d+) (\w+)s(?: and (\d+) (\w+)s)? and (gets|gives) (\d+) (?:more )?\2s")


def read_right(question: str):
    """(left, right, distractor or None, answer), read from the question alone."""
    (
        left,
        item,
        distractor,
        other,
        verb,
        right,
    ) = MISREAD_QUESTION.search(question).groups()
    left, right = int(left), int(right)
    answer = left + right if verb == "gets" else left - right
    return left, right, None if distractor is None else int(distractor), answer


def test_the_old_tasks_rows_are_unchanged():
    """The shortcut and arithmetic tasks draw the rows they drew before the misread task came
    (digests taken from the code before it). Fails if the new task's draws moved theirs: their
    README numbers would no longer reproduce."""
    import hashlib

    def digest(rows):
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    assert digest(problems("shortcut", 300, 7)) == "e7a2b720129f1d33"
    assert digest(problems("arithmetic", 300, 7)) == "b2feb1e93c1b602e"
    assert digest(problems("shortcut", 2640, 0)) == "fd346d70101b43d6"


def test_the_misread_task_needs_the_question_and_the_student_misreads_it():
    """The misread task: the question determines the answer (the distractor aside), the
    reference holds no number but the answer, half the questions carry a distractor, and the
    warm-up teaches the student to use the distractor on those some of the time, the teacher
    and the reference-only teacher never. Fails if the teacher misreads too (nothing to
    correct), the reference leaks the operands (then the reference-induced part, not the PMI
    residual, would hold the correction) or the student misreads a question without a distractor."""
    from pmi_kernels.train.demo import tasks

    rows = problems("misread", 600, seed=5)
    pattern = TrainConfig().answer_pattern
    with_distractor = [row for row in rows if row["operands"][2] is not None]
    assert 0.4 < len(with_distractor) / len(rows) < 0.6
    for row in rows:
        left, right, distractor, answer = read_right(row["question"])
        assert row["operands"] == [left, right, distractor] and answer == int(row["answer"]) >= 0
        assert extract_answer(row["solution"], pattern) == row["answer"]
        assert not re.search(r"\d", row["solution"].replace(f"\\boxed{{{row['answer']}}}", ""))
        assert distractor is None or (distractor != right and 1 <= distractor <= min(9, left))
        assert left <= 18 and right <= 9
        for kind in ("teacher", "refonly"):  # with the reference in view: the right operands, or the shortcut
            for text, _ in row["warmup"][kind]:
                work = compare.WORK.match(text)
                assert extract_answer(text, pattern) == row["answer"]
                assert work is None or (int(work[1]), int(work[2])) == (left, right)
        misread = sum(
            share
            for text, share in row["warmup"]["student"]
            if (int(compare.WORK.match(text)[1]), int(compare.WORK.match(text)[2])) != (left, right)
        )
        assert misread == pytest.approx(0.0 if distractor is None else tasks.MISREAD_SHARE)
        for text, _ in row["warmup"]["student"]:  # the student's work is right arithmetic on what it read
            for a, op, b, result in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", text):
                assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(result)


def test_the_loss_and_the_evaluation_never_see_which_part_is_which():
    """Honesty: the contexts the loss reads are rendered from the question and the reference
    alone, and the accuracy from the answer alone; the row's `operands` (the right reading) and
    `warmup` reach neither. Fails if a context or the accuracy changes when they are removed."""
    from pmi_kernels.train.contexts import KINDS
    from pmi_kernels.train.data.tokenized import contexts_ids
    from pmi_kernels.train.demo.toy import toy_tokenizer

    rows = problems("misread", 40, seed=2)
    bare = [{key: row[key] for key in ("question", "solution", "answer")} for row in rows]
    config = TrainConfig(use_chat_template=False)
    tokenizer = toy_tokenizer()
    assert contexts_ids(tokenizer, config.templates, KINDS, rows, False) == contexts_ids(
        tokenizer, config.templates, KINDS, bare, False
    )

    class Answering:  # a trainer whose model answers every question with its right answer, worked
        eval_rows, eval_prompts, stop = rows, [[i] for i in range(len(rows))], compare.StopRequest()
        tokenizer = toy_tokenizer()

        def __init__(self):
            self.config = config

        def generate(self, prompts, *_):
            return [
                self.tokenizer(f"1 + 1 = 2. The answer is \\boxed{{{rows[i]['answer']}}}.").input_ids
                for (i,) in prompts
            ]

    grades = compare.grade(Answering())
    assert [g["correct"] for g in grades] == [1.0] * len(rows)
    assert compare.error_breakdown(bare, grades) == {}  # without the right reading: no breakdown, same accuracy


def test_the_error_breakdown_and_the_paired_standard_error():
    """misread: the work starts from other operands than the right reading; slip: from the
    right ones, to a wrong answer. The paired s.e. is that of the per-problem changes. Fails on
    a misread counted as a slip, or an unpaired s.e."""
    rows = [{"operands": [7, 5, 3], "answer": "12"}] * 4
    texts = [
        "7 + 3 = 10. The answer is \\boxed{10}.",
        "7 + 5 = 13. The answer is \\boxed{13}.",
        "7 + 5 = 12. The answer is \\boxed{12}.",
        "The answer is \\boxed{12}.",
    ]
    grades = [{"correct": float(i >= 2), "texts": [t]} for i, t in enumerate(texts)]
    assert compare.error_breakdown(rows, grades) == {"misread": 0.25, "slip": 0.25}
    before = [{"correct": c} for c in (0.0, 0.0, 1.0, 1.0)]
    after = [{"correct": c} for c in (1.0, 0.0, 1.0, 0.0)]
    changes = [1.0, 0.0, 0.0, -1.0]
    assert compare.paired_se(after, before) == pytest.approx(statistics.stdev(changes) / 2)
    assert compare.paired_se(before, before) == 0.0


def test_the_validation_draw_is_apart_from_training_and_held_out():
    """toy_eval_split validation: eval_limit problems drawn by another seed, none of them a
    training or held-out question, the training rows unchanged. Fails if settings chosen on it
    could have seen the held-out problems."""
    from pmi_kernels.train.data.data import load_examples

    for task in ("misread", "shortcut"):
        config = TrainConfig(toy_task=task, eval_limit=200)
        train, held_out = load_examples(config)
        train_v, validation = load_examples(TrainConfig(toy_task=task, eval_limit=200, toy_eval_split="validation"))
        assert train_v == train and len(validation) == 200
        taken = {row["question"] for row in train + held_out}
        assert not taken & {row["question"] for row in validation}
        assert len({row["question"] for row in validation}) == 200
    with pytest.raises(ValueError, match="toy_eval_split"):
        TrainConfig(toy_eval_split="test").validate()


def test_compare_on_the_misread_task_with_a_subset_of_runs(tmp_path, capsys, monkeypatch):
    """--runs names the runs (a sweep's); the table has their rows, the paired columns and the
    error breakdown. Fails on a run that was not asked for, or a missing breakdown."""
    monkeypatch.setattr(compare, "PROBE_ROLLOUTS", 4)
    flags = [
        "--output-dir",
        str(tmp_path / "cmp"),
        "--base-cache",
        str(tmp_path / "bases"),
        "--device",
        "cpu",
        "--toy-task",
        "misread",
        "--toy-eval-split",
        "validation",
        "--sft-steps",
        "2",
        "--sft-batch-size",
        "4",
        "--max-steps",
        "1",
        "--eval-limit",
        "8",
        "--max-new-tokens",
        "12",
        "--batch-size",
        "2",
    ]
    assert cli_main(["compare", *flags, "--runs", "opsd,pmi-base"]) == 0
    out = capsys.readouterr().out
    assert "standard OPSD" in out and "PMI, frozen-base anchor" in out and "PMI, self anchor" not in out
    assert "task misread (on the validation draw)" in out
    results = json.load(open(tmp_path / "cmp" / "summary.json"))["results"]["0"]
    assert set(results) == {"start", "opsd", "pmi-base"}
    assert {"misread", "slip", "accuracy_change_se"} <= set(results["start"])
    assert {"vs_opsd", "vs_opsd_se"} <= set(results["pmi-base"]) and "vs_opsd" not in results["opsd"]
    assert cli_main(["compare", *flags, "--runs", "pmi-base,nope"]) == 2
    assert "--runs" in capsys.readouterr().err
