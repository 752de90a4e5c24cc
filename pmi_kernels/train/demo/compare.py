"""pmi-opsd compare: standard OPSD and the PMI target, with the frozen-base anchor and with the
self anchor, side by side on the toy's misread task (tasks.py; --toy-task shortcut or
arithmetic for the others). The main job (scripts/main.sh).

Per seed, one warmed-up base (built once into base_cache, runs/bases by default, keyed by all
that makes it: base_cache.py, so a later comparison loads it and the second run starts
distilling at once), then three runs from it on the same budget: the same steps, batch, learning rate, data order and
rollout seeds (the trainer seeds both from the seed); only the target differs:

    opsd       q = p_T (the teacher)                          mode opsd
    pmi-base   q = softmax(base + clip(Δ)/β), a frozen anchor  mode pmi, anchor true
    pmi-self   q = softmax(sg(s) + clip(Δ)/β), a moving one    mode pmi, anchor false

Before the runs and after each, a probe samples rollouts (temperature 1, as in training, with
the same seed every time) for held-out questions and measures, per token, KL(q‖p) of the run's
target, KL(p_T‖p), the student's entropy, its KL from the base (drift.py), the decomposition
diagnostics, and per rollout the epistemic markers, the length and how often the work is
skipped. Accuracy is greedy on all held-out problems (eval_limit), kept per problem: each run's
change from the start, and a PMI run's from standard OPSD, come with their paired standard
errors, and the misread task's rows give where the answers go wrong (misread, slip). With
--toy-eval-split validation every number is on a separate validation draw instead, the one to
choose settings on; --runs picks the runs (a sweep's). The table is printed and
written (table.md, summary.json); compare.png draws accuracy, entropy and the KL from the base
against steps, one line per run (the mean over seeds, the band their range).

    pmi-opsd compare                       # one seed: the main job
    pmi-opsd compare --seeds 0,1,2         # mean and spread over three
    pmi-opsd compare --toy-eval-split validation --runs pmi-self --lr 1e-4   # one setting, for a sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import signal
import statistics
import sys
import textwrap
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from ... import pmi_diagnostics
from ..config import TOY, TOY_DEFAULTS, TrainConfig, parse_config
from ..contexts import KINDS
from ..data.data import extract_answer
from ..data.tokenized import contexts_ids
from ..interrupts import Interrupted, StopRequest
from ..loop import Trainer
from ..metrics import count_markers, read_metrics
from ..run_dir import make_output_dir

RUNS = (
    ("opsd", dict(mode="opsd", anchor=False), "standard OPSD"),
    ("pmi-base", dict(mode="pmi", anchor=True), "PMI, frozen-base anchor"),
    ("pmi-self", dict(mode="pmi", anchor=False), "PMI, self anchor"),
)
# The comparison's sizes: one seed within about 5 minutes on 2 CPU cores (docs/demo.md).
COMPARE_DEFAULTS = {
    **TOY_DEFAULTS,
    "toy_task": "misread",
    "eval_limit": 640,
    "max_new_tokens": 72,
    "max_steps": 60,
    "eval_every": 20,
    "diagnostics_every": 5,
    "save_every": 1000,
    "lr": 5e-4,
    "markers": ["wait", "check"],
    "output_dir": "runs/compare",
    "base_cache": "runs/bases",
}
SET_PER_RUN = ("mode", "anchor", "resume", "overwrite")
PROBE_ROLLOUTS = 128
PROBE_SEED = 12345
# (summary key, column head, format)
COLUMNS = [
    ("accuracy", "accuracy", "{:.3f}"),
    ("accuracy_se", "s.e.", "{:.3f}"),
    ("accuracy_change", "vs start", "{:+.3f}"),
    ("accuracy_change_se", "s.e.(vs start)", "{:.3f}"),
    ("vs_opsd", "vs OPSD", "{:+.3f}"),
    ("vs_opsd_se", "s.e.(vs OPSD)", "{:.3f}"),
    ("misread", "misread", "{:.3f}"),
    ("slip", "slip", "{:.3f}"),
    ("kl_q_p", "KL(q‖p)", "{:.3f}"),
    ("kl_teacher_student", "KL(pT‖p)", "{:.3f}"),
    ("entropy_student", "H(p)", "{:.3f}"),
    ("kl_student_base", "KL(p‖base)", "{:.3f}"),
    ("markers/wait", "wait", "{:.2f}"),
    ("markers/check", "check", "{:.2f}"),
    ("work_skipped", "no work", "{:.2f}"),
    ("length", "length", "{:.1f}"),
    ("cos_total_ref", "cos(tot,ref)", "{:.2f}"),
    ("cos_total_pmi", "cos(tot,pmi)", "{:.2f}"),
    ("norm_ratio_ref_total", "‖ref‖/‖tot‖", "{:.2f}"),
]
NOTES = """KL(q‖p): of the run's own target (start: the PMI target, the same for both anchors there);
KL(pT‖p): the teacher's; H(p): the student's entropy; KL(p‖base): the student's from the warmed-up
base (drift.py); all per token of sampled rollouts for {probe} held-out questions. wait, check:
markers per rollout; no work: the share of rollouts that answer without working it out; length in
tokens. cos(tot,ref), cos(tot,pmi): cosine of the teacher's signal log pT - log p with its
reference-induced part log pR - log p and with the PMI residual log pT - log pR; ‖ref‖/‖tot‖:
the ratio of their norms. accuracy: greedy, on {eval} held-out problems (s.e. its binomial
standard error; vs start: the change from the same seed's start, the runs' paired comparison; vs OPSD:
a PMI run's change from standard OPSD, paired alike; each s.e.(...) is the paired standard error over
the problems, and over several seeds that of the mean over seeds, sqrt(sum of s.e.²) / seeds).
misread, slip: where the greedy answers go wrong, as shares of all {eval} problems (a task whose
rows keep their right reading, `operands`: the misread task): the work starts from other operands
than the question's (misread), or from the right ones but reaches a wrong answer (slip)."""
# Paired standard errors: over seeds, that of the mean (the others' s.e. is one seed's, averaged).
PAIRED_SE = ("accuracy_change_se", "vs_opsd_se")


# The parts of a shortcut- or misread-task rollout (tasks.py) the comparison reads the decomposition at.
PARTS = ("first token", "operands", "result", "'Wait'", "the check", "the answer")
WORK = re.compile(r"(\d+) [+-] (\d+) = (\d+)\.")


def position_parts(text: str) -> List[Optional[str]]:
    """The part (PARTS) each character of a rollout's text belongs to, None elsewhere: the first
    token (where a rollout works or answers at once); in a worked rollout the work's operands
    and result, the W of "Wait", the check's digits; the boxed answer's digits."""
    parts: List[Optional[str]] = [None] * len(text)
    if not text:
        return parts
    work = WORK.match(text)
    if work:
        for group, part in ((1, "operands"), (2, "operands"), (3, "result")):
            for k in range(*work.span(group)):
                parts[k] = part
        wait = text.find("Wait", work.end())
        if wait >= 0:
            parts[wait] = "'Wait'"
            end = text.find("The answer", wait)
            for k in range(wait, end if end >= 0 else len(text)):
                if text[k].isdigit():
                    parts[k] = "the check"
    boxed = text.find("\\boxed{")
    if boxed >= 0:
        for k in range(boxed + len("\\boxed{"), len(text)):
            if not text[k].isdigit():
                break
            parts[k] = "the answer"
    parts[0] = "first token"  # the choice between working and answering at once
    return parts


class ComparisonRun(Trainer):
    """One run of the comparison: its evaluation at step 0 is the start's, measured once (every
    run starts from the same base, and the evaluation is greedy). Each evaluation keeps its
    answers per problem (`grades`), for the paired comparisons and the error breakdown."""

    start_grades: Optional[List[Dict]] = None
    grades: Optional[List[Dict]] = None

    def evaluate(self) -> Optional[float]:
        if not self.eval_rows:
            return None
        if self.step == 0 and self.start_grades is not None:
            self.grades = self.start_grades
        else:
            self.grades = grade(self)
        return statistics.fmean(g["correct"] for g in self.grades)


def grade(trainer) -> List[Dict]:
    """Per held-out problem, {"correct": the share of its eval_samples answers that are right,
    "texts": the answers}: the trainer's evaluation on one process (the same batches of 32, so
    the same greedy answers), with its answers kept; a sampled one (eval_temperature > 0) is
    seeded by the probe's seed instead of the trainer's evaluation seed."""
    from tqdm import tqdm

    config, rows = trainer.config, trainer.eval_rows
    grades = [{"correct": 0.0, "texts": []} for _ in rows]
    torch.manual_seed(PROBE_SEED + config.seed)
    for _ in range(config.eval_samples):
        for start in tqdm(range(0, len(rows), 32), desc="evaluation", leave=False, mininterval=2):
            trainer.stop.check("evaluation")
            chunk = range(start, min(start + 32, len(rows)))
            outs = trainer.generate(
                [trainer.eval_prompts[i] for i in chunk], config.eval_temperature, 1.0, config.max_new_tokens
            )
            for i, out in zip(chunk, outs):
                text = trainer.tokenizer.decode(out, skip_special_tokens=True)
                grades[i]["texts"].append(text)
                grades[i]["correct"] += (
                    extract_answer(text, config.answer_pattern) == rows[i]["answer"]
                ) / config.eval_samples
    return grades


def error_breakdown(rows: List[Dict], grades: List[Dict]) -> Dict[str, float]:
    """{"misread", "slip"}: the shares of answers whose work starts from other operands than the
    row's right reading (`operands`), and of those that start right but end at a wrong answer;
    {} for rows without `operands` (the shortcut and arithmetic tasks'). Reads only the answers'
    text: the loss and the accuracy never see it."""
    if not rows or any("operands" not in row for row in rows):
        return {}
    misread = slip = answers = 0
    for row, graded in zip(rows, grades):
        left, right = row["operands"][:2]
        for text in graded["texts"]:
            answers += 1
            work = WORK.match(text)
            if work and (int(work[1]), int(work[2])) != (left, right):
                misread += 1
            elif work and extract_answer(text, r"\\boxed\{([^}]*)\}") != row["answer"]:
                slip += 1
    return {"misread": misread / answers, "slip": slip / answers}


def paired_se(after: List[Dict], before: List[Dict]) -> float:
    """The standard error of the mean change in correctness, problem by problem (the same problems)."""
    changes = [a["correct"] - b["correct"] for a, b in zip(after, before)]
    return statistics.stdev(changes) / math.sqrt(len(changes)) if len(changes) > 1 else float("nan")


def run_config(shared: TrainConfig, root: str, seed: int, name: str, overrides: dict) -> TrainConfig:
    return dataclasses.replace(
        shared,
        **overrides,
        seed=seed,
        output_dir=os.path.join(root, f"seed-{seed}", name),
        base_cache=shared.base_cache or os.path.join(root, "bases"),
        overwrite=True,
        resume=False,
    ).validate()


@torch.no_grad()
def probe(trainer, count: int = PROBE_ROLLOUTS, mode: Optional[str] = None) -> Dict[str, float]:
    """Means over sampled rollouts for the first `count` held-out questions (module docstring);
    kl_q_p is KL(q‖p) of the target of `mode` (the run's own by default)."""
    from tqdm import tqdm

    config = trainer.config
    rows = trainer.eval_rows[:count]
    # The trainer's own context reader, on these rows.
    contexts = trainer.contexts.on(
        contexts_ids(trainer.tokenizer, config.templates, KINDS, rows, config.use_chat_template)
    )
    torch.manual_seed(PROBE_SEED + config.seed)  # the same rollout seeds in every run
    rollouts = trainer.generate(contexts.prompts["student"], config.temperature, config.top_p, config.max_new_tokens)
    sums: Dict[str, float] = {}
    parts: Dict[str, list] = {part: [0, {"pmi": 0.0, "ref": 0.0}] for part in PARTS}
    for group in tqdm(contexts.groups(list(enumerate(rollouts))), desc="probe", leave=False, mininterval=2):
        trainer.stop.check("the probe")
        group_rollouts = [rollout for _, rollout in group]
        states, head, frozen = contexts.states([i for i, _ in group], group_rollouts, pmi_streams=True)
        diag = pmi_diagnostics(
            states["student"],
            states["teacher"],
            states["refonly"],
            states.get("anchor"),
            lm_head_weight=head.weight,
            lm_head_bias=head.bias,
            frozen_weight=frozen.weight,
            frozen_bias=frozen.bias,
            **config.loss_options().target_keywords(),
            check_finite=False,
        )
        for key, value in diag.items():
            sums[key] = sums.get(key, 0.0) + float(value.nan_to_num().sum())
        lengths = [len(rollout) for rollout in group_rollouts]
        per_rollout = {kind: state.split(lengths) for kind, state in states.items()}
        for k, rollout in enumerate(group_rollouts):
            add_parts(
                parts,
                trainer.tokenizer,
                rollout,
                {kind: split[k] for kind, split in per_rollout.items()},
                head,
                frozen,
                config.loss_temperature,
            )
    tokens = sum(map(len, rollouts))
    out = {key: value / max(1, tokens) for key, value in sums.items()}
    out.update(
        {
            f"where/{part}/{kind}": total / count
            for part, (count, sums_) in parts.items()
            if count
            for kind, total in sums_.items()
        }
    )
    drift = trainer.drift.measure(contexts, list(enumerate(rollouts)))
    out["kl_student_base"] = drift.get("drift/kl_student_base", float("nan"))
    out["kl_q_p"] = out["kl_teacher_student" if (mode or config.mode) == "opsd" else "kl_target_student"]
    texts = [trainer.tokenizer.decode(r, skip_special_tokens=True) for r in rollouts]
    out.update({f"markers/{k}": v / len(texts) for k, v in count_markers(texts, config.markers).items()})
    out["work_skipped"] = sum("=" not in text for text in texts) / len(texts)
    out["length"] = tokens / len(texts)
    return out


def add_parts(parts: Dict[str, list], tokenizer, rollout: List[int], states, head, frozen, temperature: float):
    """Adds, per part of the rollout (tasks.position_parts), the norms of the centered PMI
    residual Δ = log pT - log pR and of the reference-induced part log pR - log p: where each of
    the teacher's two signals lives. Reads only rollouts whose tokens are one character each
    (the toy tokenizer's)."""
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in rollout]
    if any(len(piece) > 1 for piece in pieces):
        return
    text_parts = position_parts("".join(pieces))
    rows = [k for k, piece in enumerate(pieces) if piece]  # a special token (the end) has no part
    if len(rows) != len(text_parts):
        return

    def logp(h: torch.Tensor, w: torch.nn.Linear) -> torch.Tensor:
        bias = None if w.bias is None else w.bias.float()
        return torch.log_softmax(F.linear(h.float(), w.weight.float(), bias) / temperature, -1)

    student, teacher, refonly = (
        logp(states["student"], head),
        logp(states["teacher"], frozen),
        logp(states["refonly"], frozen),
    )
    for kind, delta in (("pmi", teacher - refonly), ("ref", refonly - student)):
        norms = (delta - delta.mean(-1, keepdim=True)).norm(dim=-1)
        for row, part in zip(rows, text_parts):
            if part is not None:
                parts[part][1][kind] += float(norms[row])
    for part in text_parts:
        if part is not None:
            parts[part][0] += 1


def machine_busy_seconds() -> Optional[float]:
    """CPU seconds every process on the machine has used (/proc/stat), None where unreadable."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class ThreadFitter:
    """Fits torch's threads to the machine, every `every` seconds: 1 while other processes kept
    at least half a core busy over the last interval, else the default. On the shared 2-core
    machine docs/demo.md's timings come from, 2 threads beside another busy process ran the
    warm-up at about 1 step/s against 4 with 1 thread (the threads wait on each other's time
    slices); on an idle one 2 threads ran it at 7.8 steps/s. The table came out the same at
    either count. Set OMP_NUM_THREADS to fix the count instead."""

    def __init__(self, default: int, every: float = 5.0):
        self.default, self.every = default, every
        self.last = None  # (time, machine busy seconds, own CPU seconds)
        self.enabled = "OMP_NUM_THREADS" not in os.environ and default > 1

    def __call__(self) -> int:
        now = time.monotonic()
        if not self.enabled or (self.last is not None and now - self.last[0] < self.every):
            return torch.get_num_threads()
        busy, own = machine_busy_seconds(), own_cpu_seconds()
        if busy is None:
            self.enabled = False
            return torch.get_num_threads()
        if self.last is not None:
            others = ((busy - self.last[1]) - (own - self.last[2])) / max(now - self.last[0], 1e-9)
            threads = 1 if others >= 0.5 else self.default
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        self.last = (now, busy, own)
        return torch.get_num_threads()


class FittingStop(StopRequest):
    """The stop flag, whose checks (at every warm-up step, evaluation batch, training step and
    probe rollout) also fit the threads."""

    def __init__(self, fitter: ThreadFitter):
        super().__init__()
        self.fitter = fitter

    def check(self, where: str) -> None:
        self.fitter()
        super().check(where)


def standard_error(accuracy: float, n: int) -> float:
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")


def compare_seed(
    shared: TrainConfig,
    root: str,
    seed: int,
    stop: StopRequest,
    progress: bool = True,
    names: Optional[List[str]] = None,
) -> Dict:
    """{"start": {...}, run name: {...}, "curves": {run name: metrics rows}} for one seed; the
    runs named (RUNS' names), all by default."""
    out: Dict = {"curves": {}}
    grades: Dict[str, List[Dict]] = {}
    runs = [run for run in RUNS if run[0] in (names or [name for name, _, _ in RUNS])]
    for number, (name, overrides, label) in enumerate(runs, 1):
        config = run_config(shared, root, seed, name, overrides)
        print(f"[seed {seed}] {number}/{len(runs)} {name}: {label}", flush=True)
        trainer = ComparisonRun(config, stop)
        trainer.start_grades = grades.get("start")
        if "start" not in grades:
            split = "validation" if shared.toy_eval_split == "validation" else "held-out"
            print(f"[seed {seed}] the start: accuracy on {len(trainer.eval_rows)} {split} problems, probe", flush=True)
            start_accuracy = trainer.evaluate()  # the run's own step-0 evaluation reuses it
            grades["start"] = trainer.start_grades = trainer.grades
            # At the start KL(q‖p) is the PMI target's (the same for both anchors: the student is the base).
            out["start"] = {
                "accuracy": start_accuracy,
                **probe(trainer, mode="pmi"),
                **error_breakdown(trainer.eval_rows, trainer.grades),
            }
        result = trainer.train(progress=progress)
        if result["interrupted"]:
            raise Interrupted(signal.Signals[result["interrupted"]], result["where"])
        grades[name] = trainer.grades
        out[name] = {
            "accuracy": result["accuracy_after"],
            **probe(trainer),
            **error_breakdown(trainer.eval_rows, trainer.grades),
        }
        out["curves"][name] = read_metrics(trainer.metrics.path)
    n = shared.eval_limit * shared.eval_samples
    for key in ["start"] + [name for name, _, _ in runs]:
        out[key]["accuracy_se"] = standard_error(out[key]["accuracy"], n)
        out[key]["accuracy_change"] = out[key]["accuracy"] - out["start"]["accuracy"]  # paired: the same base
        out[key]["accuracy_change_se"] = paired_se(grades[key], grades["start"])
        if key.startswith("pmi") and "opsd" in grades:
            out[key]["vs_opsd"] = out[key]["accuracy"] - out["opsd"]["accuracy"]
            out[key]["vs_opsd_se"] = paired_se(grades[key], grades["opsd"])
    return out


def summarize(per_seed: Dict[int, Dict]) -> Dict[str, Dict[str, List[float]]]:
    """run -> column -> the per-seed values."""
    first = next(iter(per_seed.values()))
    rows = ["start"] + [name for name, _, _ in RUNS if name in first]
    return {
        row: {key: [per_seed[s][row].get(key, float("nan")) for s in per_seed] for key, _, _ in COLUMNS} for row in rows
    }


def format_table(summary: Dict[str, Dict[str, List[float]]], seeds: List[int]) -> str:
    """A markdown table: the value (one seed) or mean ± sd over seeds."""
    labels = {"start": "start (the warmed-up base)", **{name: label for name, _, label in RUNS}}
    heads = ["run"] + [head for _, head, _ in COLUMNS]
    lines = []
    for row, values in summary.items():
        cells = [labels[row]]
        for key, _, fmt in COLUMNS:
            xs = [x for x in values[key] if x is not None and not math.isnan(x)]
            if not xs:
                cells.append("n/a")
            elif len(seeds) == 1 or key == "accuracy_se":
                cells.append(fmt.format(statistics.fmean(xs)))
            elif key in PAIRED_SE:  # of the mean over seeds
                cells.append(fmt.format(math.sqrt(sum(x * x for x in xs)) / len(xs)))
            else:
                spread = fmt.replace("+", "").format(statistics.stdev(xs))  # a spread has no sign
                cells.append(f"{fmt.format(statistics.fmean(xs))} ± {spread}")
        lines.append(cells)
    widths = [max(len(r[i]) for r in [heads] + lines) for i in range(len(heads))]

    def fmt_row(r: List[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt_row(heads), rule] + [fmt_row(r) for r in lines])


def format_parts(per_seed: Dict[int, Dict]) -> str:
    """A markdown table of where the teacher's two signals live at the start (add_parts): per
    part of the rollouts, the mean norm of the PMI residual and of the reference-induced part
    (mean ± sd over seeds)."""

    def cell(part, kind):
        xs = [r["start"].get(f"where/{part}/{kind}") for r in per_seed.values()]
        xs = [x for x in xs if x is not None]
        if not xs:
            return "n/a"
        return f"{statistics.fmean(xs):.1f}" + (f" ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else "")

    lines = [
        "| part of the rollout | ‖Δ‖ PMI residual, log pT - log pR | ‖Δ_ref‖ reference-induced, log pR - log p |",
        "|---|---|---|",
    ]
    lines += [f"| {part} | {cell(part, 'pmi')} | {cell(part, 'ref')} |" for part in PARTS]
    return "\n".join(lines)


def plot_comparison(per_seed: Dict[int, Dict], out: str) -> str:
    """Accuracy, the student's entropy and its KL from the base against steps, one line per run
    (mean over seeds; the band is their range when there are several)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("eval/accuracy", "accuracy", "held-out accuracy (greedy)"),
        ("drift/entropy_student", "entropy_student", "student entropy (nats/token)"),
        ("drift/kl_student_base", "kl_student_base", "KL(student || base) (nats/token)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (key, start_key, title) in zip(axes, panels):
        for (name, _, label), color in zip(RUNS, ("tab:red", "tab:blue", "tab:orange")):
            if name not in next(iter(per_seed.values()))["curves"]:
                continue
            by_step: Dict[int, List[float]] = {}
            for result in per_seed.values():
                by_step.setdefault(0, []).append(result["start"][start_key])
                for row in result["curves"][name]:
                    if isinstance(row.get(key), (int, float)) and row["step"] > 0:
                        by_step.setdefault(row["step"], []).append(row[key])
            steps = sorted(by_step)
            mean = [statistics.fmean(by_step[s]) for s in steps]
            ax.plot(steps, mean, color=color, label=label, marker="o" if key == "eval/accuracy" else None, ms=3)
            if len(per_seed) > 1:
                ax.fill_between(
                    steps,
                    [min(by_step[s]) for s in steps],
                    [max(by_step[s]) for s in steps],
                    color=color,
                    alpha=0.15,
                    lw=0,
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("distillation step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    seeds = ", ".join(map(str, per_seed))
    task = next(iter(per_seed.values())).get("task", "shortcut")
    fig.suptitle(f"toy {task} task, one warmed-up base per seed (seeds {seeds})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


SEEDS_HELP = "comma-separated seeds, one warmed-up base and one set of runs each (default: --seed, 0)"
RUNS_HELP = (
    f"comma-separated runs, of {', '.join(name for name, _, _ in RUNS)} (default: all; fewer for a "
    "sweep of one run's settings)"
)


def help_text() -> str:
    """The module's description, then the options: --seeds, every train key, the comparison's defaults."""
    defaults = {key: value for key, value in COMPARE_DEFAULTS.items() if TOY_DEFAULTS.get(key) != value}
    shown = [
        f"--{key.replace('_', '-')} {','.join(value) if isinstance(value, list) else value}"
        for key, value in defaults.items()
    ]
    every_key = (
        "any key of pmi-opsd train (pmi-opsd train --help), for every run alike, except "
        f"{', '.join('--' + key for key in SET_PER_RUN)}, which the comparison sets per run"
    )
    wrap = dict(width=96, subsequent_indent=" " * 16, break_on_hyphens=False, break_long_words=False)
    return (
        f"{__doc__.strip()}\n\nusage: pmi-opsd compare [--seeds 0,1,2] [--KEY VALUE ...]\n\n"
        + textwrap.fill(f"  --seeds S     {SEEDS_HELP}", **wrap)
        + "\n"
        + textwrap.fill(f"  --runs R      {RUNS_HELP}", **wrap)
        + "\n"
        + textwrap.fill(f"  --KEY VALUE   {every_key}", **wrap)
        + "\n\n"
        + "The comparison's own defaults (the toy's otherwise):\n"
        + textwrap.fill(
            "  " + "   ".join(shown), width=96, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False
        )
    )


def main(argv) -> int:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # --seed is not --seeds
    parser.add_argument("--seeds", default=None, help=SEEDS_HELP)
    parser.add_argument("--runs", default=None, help=RUNS_HELP)
    known, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        print(help_text())
        return 0
    shared = parse_config(rest, toy_defaults=COMPARE_DEFAULTS, prog="pmi-opsd compare")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its bars for every save and load of the base
    for flag in (f"--{key}" for key in SET_PER_RUN):
        if any(arg == flag or arg.startswith(flag + "=") for arg in rest):
            raise ValueError(f"compare: {flag} is set per run by the comparison (pmi-opsd compare --help)")
    if shared.model_path != TOY:
        raise ValueError("compare: runs on the toy model (model_path toy)")
    try:
        seeds = [int(s) for s in known.seeds.split(",")] if known.seeds else [shared.seed]
    except ValueError as err:
        raise ValueError(f"--seeds: expected comma-separated integers, got {known.seeds!r}") from err
    if len(set(seeds)) != len(seeds) or any(not 0 <= seed < 2**32 for seed in seeds):
        raise ValueError(f"--seeds: expected distinct seeds in [0, 2**32), got {known.seeds!r}")
    names = known.runs.split(",") if known.runs else None
    known_names = [name for name, _, _ in RUNS]
    if names is not None and (not names or len(set(names)) != len(names) or set(names) - set(known_names)):
        raise ValueError(f"--runs: expected distinct names of {', '.join(known_names)}, got {known.runs!r}")
    root = shared.output_dir
    make_output_dir(root)
    start, load = time.perf_counter(), os.getloadavg()
    fitter = ThreadFitter(torch.get_num_threads())
    stop = FittingStop(fitter)
    per_seed = {}
    with stop.catching():
        try:
            for seed in seeds:
                per_seed[seed] = {**compare_seed(shared, root, seed, stop, names=names), "task": shared.toy_task}
        except Interrupted as err:
            print(
                f"interrupted by {signal.Signals(err.signum).name} during {err.where}; the comparison is "
                "incomplete (the warmed-up bases stay cached: run it again)",
                file=sys.stderr,
            )
            return err.exit_code
    usage = resource.getrusage(resource.RUSAGE_SELF)
    timing = {
        "wall_s": time.perf_counter() - start,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "load_average_1min": [load[0], os.getloadavg()[0]],
        "cpus": os.cpu_count(),
        "torch_threads": fitter.default if fitter.enabled else torch.get_num_threads(),
        "threads_fitted": fitter.enabled,
    }
    summary = summarize(per_seed)
    table = format_table(summary, seeds)
    notes = NOTES.format(probe=PROBE_ROLLOUTS, eval=shared.eval_limit * shared.eval_samples)
    split = " (on the validation draw)" if shared.toy_eval_split == "validation" else ""
    title = (
        f"task {shared.toy_task}{split}; {shared.max_steps} steps x {shared.batch_size} rollouts, "
        f"lr {shared.lr}, beta {shared.beta}, clip {shared.clip}; seeds {', '.join(map(str, seeds))}"
        + (" (mean ± sd)" if len(seeds) > 1 else "")
    )
    parts = (
        "Where the teacher's signal lives at the start (the warmed-up base's sampled rollouts; norms of the "
        f"centered log-ratios over the vocabulary, per token):\n{format_parts(per_seed)}"
    )
    print(f"\n{title}\n{table}\n\n{notes}\n\n{parts}\n")
    with open(os.path.join(root, "table.md"), "w") as fh:
        fh.write(f"{title}\n\n{table}\n\n{notes}\n\n{parts}\n")
    with open(os.path.join(root, "summary.json"), "w") as fh:
        json.dump(
            {
                "config": dataclasses.asdict(shared),
                "seeds": seeds,
                "timing": timing,
                "results": {
                    s: {k: v for k, v in r.items() if k not in ("curves", "task")} for s, r in per_seed.items()
                },
            },
            fh,
            indent=1,
            default=str,
        )
    print(f"plot: {plot_comparison(per_seed, os.path.join(root, 'compare.png'))}")
    print(f"table: {os.path.join(root, 'table.md')}   summary: {os.path.join(root, 'summary.json')}")
    print(
        f"time: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU, {timing['cpus']} CPUs, "
        f"{timing['torch_threads']} torch threads"
        + (" (1 while other processes were busy)" if fitter.enabled else "")
        + f", load average {load[0]:.1f} at the start and "
        f"{timing['load_average_1min'][1]:.1f} at the end"
    )
    return 0
