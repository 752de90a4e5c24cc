"""python -m pmi_kernels.train.tools.diagnose: the decomposition of the teacher's signal on your model.

For a few (question, reference solution) pairs, the model samples a rollout from the question
alone; the student, teacher and reference-only contexts are read over that rollout, and the
per-token diagnostics of pmi_diagnostics are averaged per example and printed as a table.
cos(Δ_total, Δ_ref) near 1 with |Δ_ref|/|Δ_total| near 1 means the teacher's signal is mostly
the reference-induced shortcut; cos(Δ_total, Δ_it) is the share of the transferable part.

    python -m pmi_kernels.train.tools.diagnose --model-path DIR --data pairs.jsonl --limit 8
    python -m pmi_kernels.train.tools.diagnose                     # the toy model, after a short warm-up
"""

from __future__ import annotations

import argparse
import sys

import torch

from ... import pmi_diagnostics
from ..config import TOY, TOY_DEFAULTS, TrainConfig

COLUMNS = [
    ("cos_total_ref", "cos(tot,ref)"),
    ("cos_total_pmi", "cos(tot,pmi)"),
    ("norm_ratio_ref_total", "|ref|/|tot|"),
    ("kl_teacher_student", "KL(pT||pS)"),
    ("kl_target_student", "KL(q||pS)"),
    ("entropy_student", "H(pS)"),
    ("entropy_target", "H(q)"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=TOY, help="a local Hugging Face causal LM directory, or 'toy'")
    parser.add_argument("--data", help="jsonl/parquet with question and solution fields (not needed for toy)")
    parser.add_argument("--question-field", default="question")
    parser.add_argument("--solution-field", default="solution")
    parser.add_argument("--limit", type=int, default=8, help="how many pairs")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    parser.add_argument("--sft-steps", type=int, default=None, help="toy only: supervised warm-up steps")
    parser.add_argument("--output-dir", default="runs/diagnose")
    args = parser.parse_args(argv)
    from ..loop import Trainer

    toy = args.model_path == TOY
    values = dict(TOY_DEFAULTS) if toy else {}
    values.update(
        model_path=args.model_path,
        train_file=args.data,
        answer_field=None,
        lora=False,
        anchor=False,
        teacher_weights="current",
        question_field=args.question_field,
        solution_field=args.solution_field,
        output_dir=args.output_dir,
        eval_limit=0,
        answer_pattern=r"(.+)",
        overwrite=True,
    )
    for key in ("max_new_tokens", "sft_steps"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    try:
        trainer = Trainer(TrainConfig(**values))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'example':>7} {'tokens':>6} " + " ".join(f"{label:>12}" for _, label in COLUMNS))
    rows = []
    for i in range(min(args.limit, len(trainer.train_rows))):
        rollout = trainer.generate(
            [trainer.prompts["student"][i]], args.temperature, 1.0, trainer.config.max_new_tokens
        )[0]
        if not rollout:
            continue
        with torch.no_grad():
            states, head, _ = trainer.contexts.rollout_states(i, rollout, pmi_streams=True)
            diag = pmi_diagnostics(
                states["student"],
                states["teacher"],
                states["refonly"],
                lm_head_weight=head.weight,
                lm_head_bias=head.bias,
                check_finite=False,
            )
        means = [float(diag[key].mean()) for key, _ in COLUMNS]
        rows.append(means)
        print(f"{i:>7} {len(rollout):>6} " + " ".join(f"{m:>12.4f}" for m in means))
    if rows:
        avg = [sum(col) / len(rows) for col in zip(*rows)]
        print(f"{'mean':>7} {'':>6} " + " ".join(f"{m:>12.4f}" for m in avg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
