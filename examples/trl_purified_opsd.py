"""Purified OPSD with TRL, on a CPU in seconds: a tiny random Qwen3 and a character tokenizer
built in code (nothing is downloaded), arithmetic word problems whose worked solutions are the
privileged context, and a few steps of PurifiedOPSDTrainer, LoRA by default.

    pip install "pmi-kernels[trl]"
    python examples/trl_purified_opsd.py                          # LoRA, the PMI target
    python examples/trl_purified_opsd.py --mode opsd --full-finetune

With your own model, pass it (or its path) and its tokenizer, and a dataset with "prompt" and
"privileged_context" columns; the rest is as in TRL's SDFT trainer.
"""

import argparse
import tempfile

from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from pmi_kernels.integrations.trl import PurifiedOPSDConfig, PurifiedOPSDTrainer
from pmi_kernels.train.demo.toy import toy_model, toy_problems, toy_tokenizer

LOGGED = ("loss", "pmi/kl_target_student", "entropy", "diag/cos_total_ref", "diag/norm_ratio_ref_total")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("pmi", "opsd"), default="pmi")
    parser.add_argument("--full-finetune", action="store_true", help="train every weight (default: LoRA)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    return parser.parse_args(argv)


def word_problems(count: int) -> Dataset:
    """SDFT's columns: the student's prompt, and the reference solution as the privileged context."""
    return Dataset.from_list(
        [
            {"prompt": f"Question: {row['question']}\nAnswer: ", "privileged_context": row["solution"]}
            for row in toy_problems(count, seed=0)
        ]
    )


def train(options, output_dir: str):
    tokenizer = toy_tokenizer()
    model = toy_model(tokenizer, seed=0)
    if options.full_finetune:
        # TRL builds the frozen teacher of full fine-tuning from the model's path.
        model.save_pretrained(f"{output_dir}/base")
        model = AutoModelForCausalLM.from_pretrained(f"{output_dir}/base")
    args = PurifiedOPSDConfig(
        output_dir=output_dir,
        max_steps=options.steps,
        learning_rate=1e-3,
        logging_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=24,
        # The three contexts, each followed by the student's completion:
        #   student         Question: ...\nAnswer:                              (the dataset's prompt)
        #   teacher         Here is a reference solution: ...\nQuestion: ...\nAnswer:
        #   reference-only  Here is a reference solution: ...\nAnswer:          (no question)
        teacher_prompt_template="Here is a reference solution:\n{privileged_context}\n{prompt}",
        refonly_prompt_template="Here is a reference solution:\n{privileged_context}\nAnswer: ",
        pmi_mode=options.mode,
        pmi_beta=1.0,
        pmi_clip=10.0,
        pmi_jsd_beta=0.0,
        # A CPU run: fp32, no checkpointing, no checkpoints or trackers.
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
    )
    peft_config = None if options.full_finetune else LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    trainer = PurifiedOPSDTrainer(
        model, args=args, train_dataset=word_problems(32), processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def main(argv=None):
    options = parse_args(argv)
    if options.output_dir:
        logs = train(options, options.output_dir)
    else:
        with tempfile.TemporaryDirectory() as output_dir:
            logs = train(options, output_dir)
    for entry in logs:
        print(f"step {entry['step']}: " + ", ".join(f"{key} {entry[key]:.4f}" for key in LOGGED))
    return logs


if __name__ == "__main__":
    main()
