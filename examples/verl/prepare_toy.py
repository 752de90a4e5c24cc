"""A tiny Qwen3 and toy word problems for a smoke run of the verl integration, built in code
(nothing is downloaded): <out>/model (the model and its character tokenizer, with a plain chat
template for verl's dataset) and <out>/{train,test}.parquet in verl's RL format, with
extra_info.question and extra_info.reference. benchmarks/gpu.sh's "verl" stage runs on them.

    python examples/verl/prepare_toy.py --out /tmp/pmi_verl_toy
"""

import argparse
import os

from pmi_kernels.train.demo.toy import toy_model, toy_problems, toy_tokenizer

CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def rows(count: int, seed: int, split: str):
    return [
        {
            "data_source": "openai/gsm8k",  # verl's GSM8K rule reward: logged, not trained on
            "prompt": [{"role": "user", "content": f"Question: {row['question']}\nAnswer: "}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": row["answer"]},
            "extra_info": {"split": split, "index": i, "question": row["question"], "reference": row["solution"]},
        }
        for i, row in enumerate(toy_problems(count, seed))
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import datasets

    tokenizer = toy_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    model_dir = os.path.join(args.out, "model")
    toy_model(tokenizer, seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for split, count, seed in (("train", 64, 0), ("test", 16, 1)):
        datasets.Dataset.from_list(rows(count, seed, split)).to_parquet(os.path.join(args.out, f"{split}.parquet"))
    print(f"wrote {model_dir}, train.parquet and test.parquet in {args.out}")


if __name__ == "__main__":
    main()
