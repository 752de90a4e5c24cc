"""GSM8K as verl's RL parquet, with the fields the PMI actor reads: extra_info.question (the
question alone) and extra_info.reference (the worked solution). The prompt, data_source and
reward_model are verl's GSM8K example's, so verl's rule reward (logged; trained on only with
actor_rollout_ref.pmi.use_task_rewards) works unchanged.

    python examples/verl/prepare_gsm8k.py --local_dir ~/data/pmi
"""

import argparse
import os

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def to_row(example, split: str, index: int) -> dict:
    question, solution = example["question"], example["answer"]
    return {
        "data_source": "openai/gsm8k",
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": solution.split("####")[-1].strip().replace(",", "")},
        "extra_info": {"split": split, "index": index, "question": question, "reference": solution},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local_dir", default="~/data/pmi")
    args = parser.parse_args()
    import datasets

    out = os.path.expanduser(args.local_dir)
    os.makedirs(out, exist_ok=True)
    for split, name in (("train", "train"), ("test", "test")):
        data = datasets.load_dataset("openai/gsm8k", "main", split=split)
        data = data.map(
            lambda example, index: to_row(example, split, index), with_indices=True, remove_columns=data.column_names
        )
        data.to_parquet(os.path.join(out, f"{name}.parquet"))


if __name__ == "__main__":
    main()
