"""On-policy self-distillation with the PMI target: sample, read every context, distil.

One optimizer step = grad_accum micro-batches of batch_size questions. For each question the
student samples a rollout; the student, teacher and reference-only contexts (and the anchor)
are read to their final hidden states for the same rollout tokens; fused_pmi_kl turns those
and the lm_head into the loss without ever forming [tokens, vocab] logits.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import resource
import signal
import time
from typing import Dict, List

import torch

from .. import fused_pmi_kl, pmi_diagnostics
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TOY, TrainConfig
from .contexts import KINDS, prompt_ids, rollout_hidden, trim_rollout
from .data import extract_answer, load_examples
from .metrics import MetricsLog, count_markers
from .rollouts import VllmRollouts, merged_weights
from .toy import toy_model, toy_tokenizer


def load_model(config: TrainConfig, device):
    """(tokenizer, model): a local Hugging Face causal LM, or the toy one (built, and briefly
    taught the task by supervised fine-tuning; that base is saved so --resume finds it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if config.model_path == TOY:
        base_dir = os.path.join(config.output_dir, "toy-base")
        if config.resume and os.path.isdir(base_dir):
            return toy_tokenizer(), AutoModelForCausalLM.from_pretrained(base_dir).to(device)
        tokenizer = toy_tokenizer()
        return tokenizer, toy_model(tokenizer, config.seed).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" and config.bf16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(config.model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(config.model_path, dtype=dtype, local_files_only=True)
    return tokenizer, model.to(device)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config.validate()
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if config.device == "auto" else config.device)
        os.makedirs(config.output_dir, exist_ok=True)
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.tokenizer, model = load_model(config, self.device)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        if model.get_output_embeddings() is None:
            raise ValueError(f"model {config.model_path!r} has no lm_head (get_output_embeddings() is None)")
        self.train_rows, self.eval_rows = load_examples(config)
        self.prompts = {kind: [prompt_ids(self.tokenizer, config.templates, kind, ex, config.use_chat_template)
                               for ex in self.train_rows] for kind in KINDS}
        self.eval_prompts = [prompt_ids(self.tokenizer, config.templates, "student", ex, config.use_chat_template)
                             for ex in self.eval_rows]
        self._check_lengths(model)
        model_dir = config.model_path
        if config.model_path == TOY:
            model_dir = os.path.join(config.output_dir, "toy-base")
            if not config.resume:
                if config.sft_steps:
                    self.supervised_warmup(model)
                model.save_pretrained(model_dir)
                self.tokenizer.save_pretrained(model_dir)
        self.model, self.frozen = self._wrap(model)
        self.rollouts, self._synced_step = None, None
        if config.rollout_engine == "vllm":
            self.rollouts = self._vllm_engine(model, model_dir)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step, self.position = 0, 0
        self.metrics = MetricsLog(config.output_dir, config.tensorboard)
        self.stop_requested = False
        if config.resume:
            self._restore(load_checkpoint(config.output_dir))

    # ---- set-up -----------------------------------------------------------------------
    def _check_lengths(self, model) -> None:
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is None:
            return
        for kind, ids in self.prompts.items():
            for i, prompt in enumerate(ids):
                if len(prompt) + self.config.max_new_tokens > limit:
                    raise ValueError(f"train row {i}: the {kind} context ({len(prompt)} tokens) plus max_new_tokens "
                                     f"({self.config.max_new_tokens}) exceeds the model's {limit} positions")

    def _wrap(self, model):
        """(trained model, frozen base or None). LoRA: the base is the same model, adapter off."""
        config = self.config
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora:
            from peft import LoraConfig, get_peft_model
            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            targets = [t for t in config.lora_targets if t in present]
            if not targets:
                raise ValueError(f"none of lora_targets {config.lora_targets} is a module of the model")
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets)
            return get_peft_model(model, lora), None
        frozen = copy.deepcopy(model).eval().requires_grad_(False) if self._needs_base() else None
        return model, frozen

    def _vllm_engine(self, model, model_dir: str) -> VllmRollouts:
        prompts = [*self.prompts["student"], *self.eval_prompts]
        length = max(map(len, prompts), default=0) + self.config.max_new_tokens
        limit = getattr(model.config, "max_position_embeddings", None)
        return VllmRollouts(model_dir, self.device, model.dtype, min(length, limit or length), self.config.seed,
                            self.config.vllm_kwargs)

    def _needs_base(self) -> bool:
        return self.config.teacher_weights == "base" or self.config.anchor

    def _lr_factor(self, step: int) -> float:
        config = self.config
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if config.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    def _autocast(self):
        if self.device.type == "cuda" and self.config.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- the model's parts ------------------------------------------------------------
    def _base_model(self):
        return self.model.get_base_model() if self.config.lora else self.model

    @contextlib.contextmanager
    def _frozen_weights(self, use_base: bool):
        """The decoder and lm_head to read the frozen contexts with."""
        if use_base and self.config.lora:
            with self.model.disable_adapter():
                yield self._base_model().get_decoder(), self._base_model().get_output_embeddings()
        elif use_base:
            yield self.frozen.get_decoder(), self.frozen.get_output_embeddings()
        else:
            yield self._base_model().get_decoder(), self._base_model().get_output_embeddings()

    def rollout_states(self, example_index: int, rollout: List[int], with_refonly: bool):
        """Hidden states [T, H] of the rollout in each context; only the student's has a graph."""
        prompts = {kind: self.prompts[kind][example_index] for kind in KINDS}
        base = self._base_model()
        with self._autocast():
            states = {"student": rollout_hidden(base.get_decoder(), prompts["student"], rollout, self.device)}
            with torch.no_grad():
                with self._frozen_weights(self.config.teacher_weights == "base") as (decoder, head):
                    states["teacher"] = rollout_hidden(decoder, prompts["teacher"], rollout, self.device)
                    if with_refonly:
                        states["refonly"] = rollout_hidden(decoder, prompts["refonly"], rollout, self.device)
                    frozen_head = head
                if self.config.anchor:
                    with self._frozen_weights(True) as (decoder, _):
                        states["anchor"] = rollout_hidden(decoder, prompts["student"], rollout, self.device)
        head = base.get_output_embeddings()
        states = {k: v.to(head.weight.dtype) for k, v in states.items()}
        return states, head, frozen_head

    # ---- sampling and evaluation ------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: List[List[int]], temperature: float, top_p: float, max_new_tokens: int):
        """Sampled (temperature > 0) or greedy continuations, trimmed after EOS."""
        tok = self.tokenizer
        if self.rollouts is not None:
            if self._synced_step != self.step:  # the weights changed since the engine last got them
                self.rollouts.load_weights(merged_weights(self.model, self.config.lora))
                self._synced_step = self.step
            seed = int(torch.randint(2**31 - 1, ()))  # from the step-seeded generator: a resume samples alike
            outs = self.rollouts.generate(prompts, temperature, top_p, max_new_tokens, tok.eos_token_id, seed)
            return [trim_rollout(out, tok.eos_token_id, tok.pad_token_id) for out in outs]
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        self.model.eval()
        sample = temperature > 0
        with self._autocast():
            out = self.model.generate(**batch, do_sample=sample, temperature=temperature if sample else None,
                                      top_p=top_p if sample else None, top_k=None, max_new_tokens=max_new_tokens,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        self.model.train()
        width = batch["input_ids"].shape[1]
        return [trim_rollout(row[width:].tolist(), tok.eos_token_id, tok.pad_token_id) for row in out]

    def evaluate(self) -> float:
        """Accuracy on the held-out rows, averaged over eval_samples samples per question."""
        config, rows = self.config, self.eval_rows
        if not rows:
            return float("nan")
        prompts = self.eval_prompts
        correct = 0
        for _ in range(config.eval_samples):
            for i in range(0, len(rows), 32):
                outs = self.generate(prompts[i:i + 32], config.eval_temperature, 1.0, config.max_new_tokens)
                for ex, out in zip(rows[i:i + 32], outs):
                    text = self.tokenizer.decode(out, skip_special_tokens=True)
                    correct += extract_answer(text, config.answer_pattern) == ex["answer"]
        return correct / (len(rows) * config.eval_samples)

    def supervised_warmup(self, model) -> None:
        """Teacher-forced cross-entropy from each context to the reference solution (the toy's
        first lesson): a tiny model has to be taught to read a reference in its context before
        it can act as its own teacher, as a real LLM already can."""
        config, tok = self.config, self.tokenizer
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.sft_lr)
        rng = random.Random(config.seed)
        model.train()
        for _ in range(config.sft_steps):
            rows = rng.sample(range(len(self.train_rows)), config.sft_batch_size)
            seqs, labels = [], []
            for i in rows:
                prompt = self.prompts[rng.choice(KINDS)][i]
                answer = tok(self.train_rows[i]["solution"], add_special_tokens=False).input_ids + [tok.eos_token_id]
                seqs.append(prompt + answer)
                labels.append([-100] * len(prompt) + answer)
            width = max(map(len, seqs))
            ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs], device=self.device)
            lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels], device=self.device)
            attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
            loss = model(input_ids=ids, attention_mask=attention, labels=lab).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # ---- one step ---------------------------------------------------------------------
    def next_indices(self, count: int) -> List[int]:
        """The data order: a fresh permutation per epoch, seeded, so a resume continues it."""
        n = len(self.train_rows)
        out = []
        for pos in range(self.position, self.position + count):
            epoch, offset = divmod(pos, n)
            order = list(range(n))
            random.Random(self.config.seed * 7919 + epoch).shuffle(order)
            out.append(order[offset])
        self.position += count
        return out

    def train_step(self) -> Dict:
        config = self.config
        # Sampling is seeded by the step, so an interrupted and resumed run samples the same.
        torch.manual_seed(config.seed * 1_000_003 + self.step)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        diagnose = (self.step + 1) % config.diagnostics_every == 0
        totals: Dict[str, float] = {"loss": 0.0}
        texts, lengths = [], []
        for _ in range(config.grad_accum):
            indices = self.next_indices(config.batch_size)
            rollouts = self.generate([self.prompts["student"][i] for i in indices], config.temperature,
                                     config.top_p, config.max_new_tokens)
            tokens = sum(map(len, rollouts))
            lengths += [len(r) for r in rollouts]
            texts += [self.tokenizer.decode(r, skip_special_tokens=True) for r in rollouts]
            for i, rollout in zip(indices, rollouts):
                if rollout:
                    self._distil(i, rollout, tokens * config.grad_accum, diagnose, totals)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - start
        token_count = max(1, sum(lengths))
        record = {"step": self.step, "loss": totals.pop("loss"), "lr": self.scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm), "response_length": sum(lengths) / max(1, len(lengths)),
                  "tokens_per_s": sum(lengths) / elapsed, "peak_memory_gib": self._peak_memory_gib()}
        record.update({f"diag/{k}": v / token_count for k, v in totals.items()})
        if "diag/kl_target_student" in record:
            record["kl_q_p"] = record["diag/kl_target_student"]
        record.update({f"markers/{k}": v for k, v in count_markers(texts, config.markers).items()})
        return record

    def _distil(self, index: int, rollout: List[int], normalizer: int, diagnose: bool, totals: Dict) -> None:
        config = self.config
        pmi = config.mode == "pmi"
        states, head, frozen_head = self.rollout_states(index, rollout, with_refonly=pmi or diagnose)
        loss = fused_pmi_kl(states["student"], head.weight, states["teacher"], states.get("refonly") if pmi else None,
                            states.get("anchor"), lm_head_bias=head.bias,
                            frozen_weight=frozen_head.weight.detach(),
                            frozen_bias=None if frozen_head.bias is None else frozen_head.bias.detach(),
                            beta=config.beta, clip=config.clip, center=config.center,
                            temperature=config.loss_temperature, jsd_beta=config.jsd_beta,
                            entry_clip=config.entry_clip, reduction="sum", check_finite=False) / normalizer
        loss.backward()
        totals["loss"] += float(loss.detach())  # the normalizer makes the step's sum a token mean
        if diagnose:
            diag = pmi_diagnostics(states["student"], states["teacher"], states["refonly"], states.get("anchor"),
                                   lm_head_weight=head.weight.detach(),
                                   lm_head_bias=None if head.bias is None else head.bias.detach(),
                                   frozen_weight=frozen_head.weight.detach(),
                                   frozen_bias=None if frozen_head.bias is None else frozen_head.bias.detach(),
                                   beta=config.beta, clip=config.clip, center=config.center,
                                   temperature=config.loss_temperature, check_finite=False)
            for key, value in diag.items():
                totals[key] = totals.get(key, 0.0) + float(value.nan_to_num().sum())

    def _peak_memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    # ---- checkpoints and the loop -----------------------------------------------------
    def _state(self) -> Dict:
        return {"trainable": {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step, "position": self.position, "rng": rng_state(), "config": vars(self.config)}

    def _restore(self, state: Dict) -> None:
        params = dict(self.model.named_parameters())
        missing = set(state["trainable"]) - set(params)
        if missing:
            raise ValueError(f"--resume: checkpoint parameters not in this model: {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.position = state["step"], state["position"]
        set_rng_state(state["rng"])

    def save(self) -> str:
        save_pretrained = self.model.save_pretrained if self.config.lora else None
        return save_checkpoint(self.config.output_dir, self.step, self._state(), save_pretrained)

    def _request_stop(self, signum, frame):
        self.stop_requested = True

    def train(self, progress: bool = True) -> Dict:
        """Run to max_steps (or a SIGINT/SIGTERM, after which the step in flight finishes and a
        checkpoint is written). Returns the accuracies before and after."""
        from tqdm import tqdm
        config = self.config
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            before = self.evaluate() if self.step == 0 else None
            if before is not None:
                self.metrics.write({"step": 0, "eval/accuracy": before})
            bar = tqdm(total=config.max_steps, initial=self.step, disable=not progress, desc="opsd")
            while self.step < config.max_steps and not self.stop_requested:
                record = self.train_step()
                if config.eval_every and self.step % config.eval_every == 0 and self.step < config.max_steps:
                    record["eval/accuracy"] = self.evaluate()
                if self.step % config.log_every == 0:
                    self.metrics.write(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", len=f"{record['response_length']:.0f}")
                if self.step % config.save_every == 0 or self.stop_requested:
                    self.save()
            bar.close()
            after = None
            if self.step >= config.max_steps:
                after = self.evaluate()
                self.metrics.write({"step": self.step, "eval/accuracy": after})
                self.save()
            return {"accuracy_before": before, "accuracy_after": after, "steps": self.step,
                    "interrupted": self.stop_requested}
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
