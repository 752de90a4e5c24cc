"""One OPSD-PMI training step of a Qwen3-1.7B-shaped model (random bf16 weights, V = 151,936,
gradient checkpointing, sdpa attention): student, teacher and reference-only contexts over the
same rollout, the loss, and the backward into every weight. The loss is fused_pmi_kl on the
gathered hidden states, or the plain-torch reference on full fp32 logits; step time and peak
memory for each, at each rollout length, in one run. An out-of-memory step is recorded as OOM.

    python benchmarks/bench_train_step.py --out benchmarks/results        # on a GPU
    python benchmarks/bench_train_step.py --tiny --tokens 64              # a CPU smoke run
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_info, is_oom, median_ms_few, slug, write_json  # noqa: E402

from pmi_kernels import fused_pmi_kl  # noqa: E402
from pmi_kernels.reference import pmi_kl_reference  # noqa: E402
from pmi_kernels.train.contexts import rollout_positions  # noqa: E402

PROMPTS = {"student": 256, "teacher": 768, "refonly": 512}  # prompt lengths of the three contexts


def qwen3_1p7b(tiny: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    if tiny:
        config = Qwen3Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    else:
        config = Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=40960, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def step(model, contexts, tokens: int, fused: bool):
    """Forward every context to the rollout's hidden states, the loss, and the backward."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    states = {}
    for kind, ids in contexts.items():
        with torch.set_grad_enabled(kind == "student"):
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
        states[kind] = hidden[rollout_positions(ids.shape[1] - tokens + 1, tokens)]
    if fused:
        loss = fused_pmi_kl(states["student"], head.weight, states["teacher"], states["refonly"],
                            jsd_beta=0.0, check_finite=False)
    else:
        with torch.no_grad():
            frozen = {k: head(states[k]) for k in ("teacher", "refonly")}
        loss = pmi_kl_reference(head(states["student"]), frozen["teacher"], frozen["refonly"], jsd_beta=0.0)
    loss.backward()
    model.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="rollout lengths")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (to check the script on a CPU)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = device_info(device)
    print(info)
    with torch.device(device):  # initialize in place: a 1.7B model is slow to initialize on a CPU
        model = qwen3_1p7b(args.tiny).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.train()
    vocab = model.config.vocab_size
    results = {"info": info, "model": "tiny" if args.tiny else "Qwen3-1.7B shape, random weights", "rows": []}
    gen = torch.Generator().manual_seed(0)
    for tokens in args.tokens:
        rollout = torch.randint(0, vocab, (tokens,), generator=gen)
        contexts = {kind: torch.cat([torch.randint(0, vocab, (plen,), generator=gen), rollout])[None, :-1].to(device)
                    for kind, plen in PROMPTS.items()}
        for fused in (True, False):
            name = "fused_pmi_kl on hidden states" if fused else "plain torch reference on fp32 logits"
            row = {"tokens": tokens, "loss": name}
            try:
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                row["ms"] = median_ms_few(lambda: step(model, contexts, tokens, fused), device, calls=2)
                if device == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as err:  # noqa: BLE001 (an OOM is a result; anything else is raised)
                if not is_oom(err):
                    raise
                row["ms"] = "OOM"
                model.zero_grad(set_to_none=True)
            results["rows"].append(row)
            shown = "OOM" if row["ms"] == "OOM" else f"{row['ms']:9.1f} ms" + (
                f"  peak {row['peak_gib']:6.1f} GiB" if "peak_gib" in row else "")
            print(f"rollout {tokens:6d} tokens  {name:40s} {shown}")
    write_json(os.path.join(args.out, f"train_step_{slug(info['device'])}_{info['date']}.json"), results)


if __name__ == "__main__":
    main()
