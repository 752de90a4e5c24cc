"""The embedded default: a tiny Qwen3-shaped model, a character tokenizer and arithmetic word
problems with worked solutions, all built in code (nothing is downloaded)."""

from __future__ import annotations

import random
import string

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana"]
ITEMS = ["apple", "book", "coin", "shell", "stamp", "marble"]


def draw_problems(count: int, seed: int):
    """`count` word problems' draws, seeded, each (name, item, a, b, adds): "gets b more" from a
    when adds, else "gives b away" from a + b; either way the answer of the subtraction is a."""
    rng = random.Random(seed)
    for _ in range(count):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(2, 20), rng.randint(1, 9)
        yield name, item, a, b, rng.random() < 0.5


def toy_problems(count: int, seed: int):
    """Addition and subtraction word problems: question, worked solution, answer."""
    rows = []
    for name, item, a, b, adds in draw_problems(count, seed):
        if adds:
            question = f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have?"
            answer, work = a + b, f"{a} + {b} = {a + b}"
        else:
            question = f"{name} has {a + b} {item}s and gives {b} away. How many {item}s are left?"
            answer, work = a, f"{a + b} - {b} = {a}"
        rows.append(
            {"question": question, "solution": f"{work}. The answer is \\boxed{{{answer}}}.", "answer": str(answer)}
        )
    return rows


def toy_tokenizer():
    """One token per printable character, plus <pad>, <bos>, <eos>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def toy_model(tokenizer, seed: int = 0, hidden: int = 96, layers: int = 2):
    """A Qwen3 causal LM small enough to train on a CPU in a minute. Its head size is 32, a size
    vLLM's CPU attention supports (rollout_engine="vllm")."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3ForCausalLM(config)
