"""One optimizer step of the trainer (pmi_kernels.train), packed against the per-rollout loop,
measured side by side in one run; and (--mode loss) one step's loss, fused against the reference.

--mode step (default). The trainer's own train_step, its rollouts fixed (random tokens, the same
for every variant, so sampling is left out); tokens/s = the step's rollout tokens over its time
less sampling (context forwards, loss, backward, optimizer), and the time split it logs.
Every variant runs on one trainer, a step each in turn (the order alternating) after two
warm-up rounds; the medians are reported.
- CPU: the toy model (LoRA, its prompts), the toy run's 8 rollouts x 40 tokens unless told;
  variants "packed" (attn_implementation "auto": varlen, one sdpa call per sequence),
  "packed-mask" (sdpa over the whole pack with the block-diagonal mask), "per-rollout" and,
  with --budget N [N ...], "packed<=N" (varlen, packs of at most N tokens) for each N. Tokens/s by the wall clock
  and per second of the process's CPU time (steadier on a shared machine). Peak memory: for each
  variant a fresh process (so one variant's freed memory cannot serve another's) runs two
  steps, then a third during which its peak resident memory (VmHWM) is read.
- GPU (--gpu): a Qwen3-1.7B-shaped model with random bf16 weights (V = 151,936), 32 rollouts x
  1,024 tokens after prompts of 64-512 tokens (the teacher's 512 longer), LoRA r64 on every
  projection, gradient checkpointing; variants "packed" (varlen attention: flash-attn's if
  installed, else torch's varlen_attn), "padded" (each context one right-padded batch through
  sdpa with a padding mask) and "per-rollout" (sdpa); peak CUDA memory per step. Before
  timing, the packed hidden states are checked against per-rollout ones.

--mode loss: a Qwen3-1.7B-shaped model's student, teacher and reference-only contexts over one
rollout of --tokens tokens, the loss and the backward: fused_pmi_kl on the gathered hidden
states against the plain-torch reference on full fp32 logits; an out-of-memory step is OOM.

    python -m benchmarks train_step --budget 600                # CPU, the toy model
    python -m benchmarks train_step --gpu --out DIR            # on a GPU (a CPU check: --gpu --tiny)
    python -m benchmarks train_step --mode loss --tokens 8192   # on a GPU (CPU: --tiny)
    python -m benchmarks train_step --repeats 1 --rollouts 2 --rollout-tokens 8   # quick, on a CPU
"""

from __future__ import annotations

import argparse
import atexit
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import torch

from . import harness

PROMPTS = {"student": 256, "teacher": 768, "refonly": 512}  # --mode loss: the three contexts' prompt lengths


def qwen3_1p7b(tiny: bool = False):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    if tiny:
        config = Qwen3Config(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    else:
        config = Qwen3Config(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
        )
    config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(config)


# ---- --mode step ------------------------------------------------------------------------------
def padded_hidden(decoder, prompts, rollouts, device):
    """packing.packed_hidden's result from one right-padded batch with a padding mask (sdpa)."""
    seqs = [p + r[:-1] for p, r in zip(prompts, rollouts)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return torch.cat([hidden[i, len(p) - 1 : len(p) - 1 + len(r)] for i, (p, r) in enumerate(zip(prompts, rollouts))])


def scratch_dir() -> str:
    """A temporary output directory for the trainer, removed when the process ends."""
    path = tempfile.mkdtemp(prefix="bench_train_step-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def build_trainer(args, out_dir: str):
    """The trainer on the toy model (CPU) or a Qwen3-1.7B-shaped one (--gpu), its rollouts fixed."""
    from pmi_kernels.train import TrainConfig, loop

    gpu = args.gpu
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"  # --gpu --tiny: the GPU workload's code on a CPU
    config = TrainConfig(
        output_dir=out_dir,
        device=device,
        sft_steps=0,
        use_chat_template=False,
        batch_size=args.rollouts,
        max_new_tokens=args.rollout_tokens,
        diagnostics_every=10**6,
        lora_rank=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        gradient_checkpointing=gpu,
        attn_implementation="sdpa",
        lr=5e-6,
    )
    if gpu:  # no weights on disk: the model is built on the GPU, and the toy base is not saved

        def load_model(config, device):
            with torch.device(device):
                model = qwen3_1p7b(args.tiny).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
            from pmi_kernels.train.demo.toy import toy_tokenizer

            return toy_tokenizer(), model

        loop.load_model, loop.write_dir_atomically = load_model, lambda *a, **k: None
    trainer = loop.Trainer(config)
    gen = torch.Generator().manual_seed(0)
    vocab = len(trainer.tokenizer)  # rollouts the tokenizer can decode (the markers count them)
    if gpu:  # prompts as long as a chain-of-thought task's: the teacher's carries the reference
        trainer.train_rows = trainer.train_rows[: args.rollouts]
        short = 8 if args.tiny else 64
        student = [int(n) for n in torch.randint(short, 8 * short + 1, (args.rollouts,), generator=gen)]
        lengths = {
            "student": student,
            "teacher": [n + 8 * short for n in student],
            "refonly": [8 * short] * args.rollouts,
        }
        trainer.contexts = trainer.contexts.on(
            {kind: [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths[kind]] for kind in lengths}
        )
    rollouts = [torch.randint(4, vocab, (args.rollout_tokens,), generator=gen).tolist() for _ in range(args.rollouts)]
    trainer.generate = lambda prompts, *a: rollouts[: len(prompts)]
    return trainer


def use_variant(trainer, variant: str, args) -> None:
    """Point the trainer at a variant between steps (never inside one: a checkpointed layer
    recomputes with the attention it ran with)."""
    from pmi_kernels.train import contexts
    from pmi_kernels.train.data import packing

    trainer.config.packed = variant != "per-rollout"
    trainer.config.max_tokens_per_micro_batch = (
        int(variant[len("packed<=") :]) if variant.startswith("packed<=") else None
    )
    contexts.packed_hidden = padded_hidden if variant == "padded" else packing.packed_hidden
    attn = (
        "sdpa"
        if variant in ("padded", "per-rollout", "packed-mask")
        else packing.resolve_attn_implementation("auto", trainer.device)
    )
    if attn == packing.VARLEN:
        packing.register_varlen()
    trainer.contexts.base_model().set_attn_implementation(attn)


def step_row(trainer, variant: str) -> dict:
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    record = trainer.train_step()
    after = resource.getrusage(resource.RUSAGE_SELF)
    tokens = trainer.config.batch_size * trainer.config.max_new_tokens
    work = record["time/step"] - record["time/sampling"]
    cpu_s = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    return {
        "variant": variant,
        "tokens": tokens,
        "seconds": work,
        "tokens_per_s": tokens / work,
        "cpu_seconds": cpu_s,
        "tokens_per_cpu_s": tokens / cpu_s,
        "peak_memory_gib": record["peak_memory_gib"],
        **{key: value for key, value in record.items() if key.startswith("time/")},
    }


def memory_kib() -> dict:
    with open("/proc/self/status") as fh:
        return {line.split(":")[0]: int(line.split()[1]) for line in fh if line.startswith(("VmRSS", "VmHWM"))}


def measure_cpu_memory(args, variant: str) -> dict:
    """In a fresh process: two warm-up steps, then the peak resident memory during a third (VmHWM,
    reset before it), also above the process's before its first step."""
    trainer = build_trainer(args, scratch_dir())
    use_variant(trainer, variant, args)
    baseline = memory_kib()["VmRSS"]
    trainer.train_step()
    trainer.train_step()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    trainer.train_step()
    peak = memory_kib()["VmHWM"]
    return {"variant": variant, "peak_rss_mib": peak / 1024, "peak_extra_mib": (peak - baseline) / 1024}


def check_packed_on_gpu(trainer) -> float:
    """Largest |packed - per-rollout| hidden state over two rollouts, relative to the largest state."""
    from pmi_kernels.train.contexts import rollout_hidden
    from pmi_kernels.train.data import packing

    decoder, device = trainer.contexts.base_model().get_decoder(), trainer.device
    prompts, rollouts = trainer.prompts["teacher"][:2], trainer.generate([0, 0])
    with torch.no_grad(), trainer.contexts.autocast():
        got = packing.packed_hidden(decoder, prompts, rollouts, device).float()
    use_variant(trainer, "per-rollout", argparse.Namespace(gpu=True, budget=None))
    with torch.no_grad(), trainer.contexts.autocast():
        want = torch.cat([rollout_hidden(decoder, p, r, device) for p, r in zip(prompts, rollouts)]).float()
    return float((got - want).abs().max() / want.abs().max())


def run_step_mode(args) -> dict:
    """Every variant on one trainer, a step each in turn (the order alternating), after two
    warm-up rounds; on CPU, each variant's peak memory from a fresh process."""
    variants = ["packed", "padded", "per-rollout"] if args.gpu else ["packed", "packed-mask", "per-rollout"]
    variants += [f"packed<={budget}" for budget in args.budget or []]
    trainer = build_trainer(args, scratch_dir())
    if args.gpu:
        use_variant(trainer, "packed", args)
        print(
            f"packed ({trainer.contexts.base_model().config._attn_implementation}) against per-rollout hidden "
            "states: "
            f"largest difference {check_packed_on_gpu(trainer):.2e} of the largest state",
            flush=True,
        )
    rows = []
    for rep in range(args.repeats + 2):
        for variant in variants if rep % 2 == 0 else variants[::-1]:
            use_variant(trainer, variant, args)
            if args.gpu:
                torch.cuda.empty_cache()
            row = step_row(trainer, variant)
            if rep < 2:
                continue  # warm-up
            rows.append(row)
            print(
                f"{variant:14s} {row['tokens_per_s']:9.1f} tok/s  {row['tokens_per_cpu_s']:8.1f} tok/cpu-s  "
                + (f"peak {row['peak_memory_gib']:6.2f} GiB  " if args.gpu else "")
                + " ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("time/")),
                flush=True,
            )
    memory = {}
    if not args.gpu:
        for variant in variants:
            cmd = harness.fresh_process("train_step", ["--memory-of", variant, *args.argv])
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=harness.fresh_process_env())
            memory[variant] = json.loads(done.stdout.splitlines()[-1])
            print(
                f"{variant:14s} peak RSS {memory[variant]['peak_rss_mib']:7.1f} MiB "
                f"({memory[variant]['peak_extra_mib']:+.1f} MiB over the process before its first step)",
                flush=True,
            )
    summary = {}
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        summary[variant] = {key: statistics.median(r[key] for r in mine) for key in mine[0] if key != "variant"}
        if not args.gpu:
            summary[variant].update({k: v for k, v in memory[variant].items() if k != "variant"})
    base = summary["per-rollout"]
    memory_key = "peak_memory_gib" if args.gpu else "peak_rss_mib"
    for variant, s in summary.items():
        s["speedup"] = s["tokens_per_s"] / base["tokens_per_s"]
        s["cpu_speedup"] = s["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        s["memory_ratio"] = s[memory_key] / base[memory_key]
        print(
            f"median {variant:14s} {s['tokens_per_s']:9.1f} tok/s ({s['speedup']:.2f}x the per-rollout loop; "
            f"{s['cpu_speedup']:.2f}x per CPU second), peak memory {s['memory_ratio']:.3f}x the loop's"
        )
    return {"rows": rows, "memory": memory, "median": summary}


# ---- --mode loss ------------------------------------------------------------------------------
def loss_step(model, contexts, tokens: int, fused: bool):
    """Forward every context to the rollout's hidden states, the loss, and the backward."""
    from pmi_kernels import fused_pmi_kl
    from pmi_kernels.prompts import rollout_positions
    from pmi_kernels.reference import pmi_kl_reference

    decoder, head = model.get_decoder(), model.get_output_embeddings()
    states = {}
    for kind, ids in contexts.items():
        with torch.set_grad_enabled(kind == "student"):
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
        states[kind] = hidden[rollout_positions(ids.shape[1] - tokens + 1, tokens)]
    if fused:
        loss = fused_pmi_kl(
            states["student"], head.weight, states["teacher"], states["refonly"], jsd_beta=0.0, check_finite=False
        )
    else:
        with torch.no_grad():
            frozen = {k: head(states[k]) for k in ("teacher", "refonly")}
        loss = pmi_kl_reference(head(states["student"]), frozen["teacher"], frozen["refonly"], jsd_beta=0.0)
    loss.backward()
    model.zero_grad(set_to_none=True)


def run_loss_mode(args, device: str) -> dict:
    with torch.device(device):  # initialize in place: a 1.7B model is slow to initialize on a CPU
        model = qwen3_1p7b(args.tiny).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    vocab = model.config.vocab_size
    rows = []
    gen = torch.Generator().manual_seed(0)
    for tokens in args.tokens:
        rollout = torch.randint(0, vocab, (tokens,), generator=gen)
        contexts = {
            kind: torch.cat([torch.randint(0, vocab, (plen,), generator=gen), rollout])[None, :-1].to(device)
            for kind, plen in PROMPTS.items()
        }
        for fused in (True, False):
            name = "fused_pmi_kl on hidden states" if fused else "plain torch reference on fp32 logits"
            row = {"tokens": tokens, "loss": name}
            try:
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                row["ms"] = harness.median_ms_few(lambda: loss_step(model, contexts, tokens, fused), device, calls=2)
                if device == "cuda":
                    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            except Exception as err:  # noqa: BLE001 (an OOM is a result; anything else is raised)
                if not harness.is_oom(err):
                    raise
                row["ms"] = "OOM"
                model.zero_grad(set_to_none=True)
            rows.append(row)
            shown = (
                "OOM"
                if row["ms"] == "OOM"
                else f"{row['ms']:9.1f} ms" + (f"  peak {row['peak_gib']:6.1f} GiB" if "peak_gib" in row else "")
            )
            print(f"rollout {tokens:6d} tokens  {name:40s} {shown}")
    return {"model": "tiny" if args.tiny else "Qwen3-1.7B shape, random weights", "rows": rows}


def record_step(results: harness.Results, args: argparse.Namespace, summary: dict) -> None:
    """The medians of --mode step as records: throughput, memory and the ratios to the loop."""
    case = f"train step {args.rollouts}x{args.rollout_tokens}"
    params = dict(
        rollouts=args.rollouts,
        rollout_tokens=args.rollout_tokens,
        lora_rank=args.lora_rank,
        gpu=args.gpu,
        tiny=args.tiny,
        repeats=args.repeats,
    )
    memory = ("peak_memory_gib", "peak_memory", "GiB") if args.gpu else ("peak_rss_mib", "peak_rss", "MiB")
    for variant, s in summary.items():
        results.add(case, variant, "throughput", s["tokens_per_s"], "tokens/s", **params)
        results.add(case, variant, "cpu_throughput", s["tokens_per_cpu_s"], "tokens/CPU s", **params)
        results.add(case, variant, memory[1], s[memory[0]], memory[2], **params)
        if not args.gpu:
            results.add(case, variant, "peak_rss_above_start", s["peak_extra_mib"], "MiB", **params)
        for key, value in s.items():
            if key.startswith("time/"):
                results.add(case, variant, key, value, "s", **params)
        results.add_ratio(case, variant, "per-rollout", s["speedup"], **params)
        results.add_ratio(case, f"{variant} per CPU second", "per-rollout per CPU second", s["cpu_speedup"], **params)
        results.add_ratio(case, f"{variant} {memory[1]}", f"per-rollout {memory[1]}", s["memory_ratio"], **params)


def record_loss(results: harness.Results, args: argparse.Namespace, rows: list[dict]) -> None:
    for row in rows:
        params = dict(tokens=row["tokens"], tiny=args.tiny, prompts=PROMPTS)
        case = f"one rollout's loss and backward, {row['tokens']} tokens"
        oom = row["ms"] == "OOM"
        results.add(case, row["loss"], "time", None if oom else row["ms"], "ms", "OOM" if oom else "ok", **params)
        if "peak_gib" in row:
            results.add(case, row["loss"], "peak_memory", row["peak_gib"], "GiB", **params)


def main(argv: Sequence[str] | None = None) -> None:
    parser = harness.parser("train_step", __doc__, repeats=8)
    parser.add_argument("--mode", choices=("step", "loss"), default="step")
    parser.add_argument("--gpu", action="store_true", help="step: the Qwen3-1.7B-shaped workload on CUDA")
    parser.add_argument("--rollouts", type=int, help="step: rollouts per step (8 on CPU, 32 with --gpu)")
    parser.add_argument("--rollout-tokens", type=int, help="step: tokens per rollout (40 on CPU, 1024 with --gpu)")
    parser.add_argument("--lora-rank", type=int, help="step: LoRA rank (8 on CPU, 64 with --gpu)")
    parser.add_argument(
        "--budget", type=int, nargs="+", help="step: also packed under each of these max_tokens_per_micro_batch"
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768], help="loss: rollout lengths")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (to check the script on a CPU)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # step, CPU: one variant's peak memory, in this process
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for the memory measurement's processes
    defaults = (32, 1024, 64) if args.gpu else (8, 40, 8)
    args.rollouts, args.rollout_tokens, args.lora_rank = (
        given or default for given, default in zip((args.rollouts, args.rollout_tokens, args.lora_rank), defaults)
    )
    if args.memory_of:
        print(json.dumps(measure_cpu_memory(args, args.memory_of)))
        return
    if args.device == "auto":  # the step's CPU workload stays on the CPU unless --gpu
        args.device = "cuda" if (args.gpu or args.mode == "loss") and torch.cuda.is_available() else "cpu"
    args = harness.resolve(args)
    device = args.device
    if args.gpu and device != "cuda" and not args.tiny:
        parser.error("--gpu needs a CUDA device (or --tiny, to check the script on a CPU)")
    results = harness.Results("train_step", args.out, device)
    print(results.device)
    if args.mode == "step":
        record_step(results, args, run_step_mode(args)["median"])
    else:
        record_loss(results, args, run_loss_mode(args, device)["rows"])
    results.close()


if __name__ == "__main__":
    main()
