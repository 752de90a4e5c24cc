"""On-policy self-distillation with the PMI target: sample, read every context, distil.

One optimizer step = grad_accum micro-batches of batch_size questions. For each question the
student samples a rollout; the student, teacher and reference-only contexts (and the anchor)
are read to their final hidden states for the same rollout tokens, a micro-batch's rollouts
packed into one forward per context (packing.py); one fused_pmi_kl call per pack turns those
and the lm_head into the loss without ever forming [tokens, vocab] logits. The loss is the
mean over every rollout token of the step, whatever the micro-batches and packs. The metrics
log each step's time split (sampling, context forwards, loss, backward, optimizer).

A run keeps what it has: a step whose loss or gradients are not finite is skipped, a stop
signal ends the run with its last consistent state saved, and checkpoints are atomic
(checkpoint.py); the output directory is checked before anything loads (run_dir.py).

Under torchrun each rank samples its slice of every micro-batch and the step's gradients are
summed over the ranks, so a config takes the same step at any world size (distributed.py); with
fsdp the model is sharded by FSDP2, which reduces the gradients itself, and every rank runs as
many forwards as the others (a rank with fewer packs reads a filler one, its loss times zero).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from .. import fused_pmi_kl, pmi_diagnostics
from .checkpoint import (latest_sharded, load_checkpoint, read_latest, rng_state, save_checkpoint, set_rng_state,
                         sharded_staging, write_dir_atomically)
from .config import TOY, TrainConfig
from .contexts import KINDS, rollout_hidden, trim_rollout
from .data.data import extract_answer, load_examples
from .data.packing import check_isolation, packed_hidden, rollout_groups, rope_switch_length
from .data.tokenized import contexts_ids
from .demo.base_cache import warmed_up_base
from .distributed import (SyncedStop, WholeModelDecoder, broadcast_module, check_same_config, check_world,
                          first_over_ranks, join_world, most_over_ranks, on_main, shard_model, sum_gradients,
                          sum_over_ranks, training_device)
from .drift import Drift
from .export import checkpoint_writer
from .interrupts import Interrupted, StopRequest, TrainingFailed, fault_point
from .metrics import MetricsLog, StepTimer, accuracy_at, count_markers, cut_metrics, evaluated_at
from .model import check_lengths, check_lora_targets, load_model, position_limit, wrap_model
from .rollouts import VllmRollouts, merged_weights
from .run_dir import TOY_BASE, prepare_output_dir, start_output_dir
from .trackers import start_trackers


class Trainer:
    def __init__(self, config: TrainConfig, stop: Optional[StopRequest] = None):
        self.config = config.validate()
        self.world = world = join_world(config.device)  # one process, or a rank under torchrun
        self.device = training_device(config.device, world)
        self.stop = SyncedStop(world, self.device, stop or StopRequest()) if world.distributed else stop or StopRequest()
        # Refusals and the resume checks, before anything heavy (rank 0 looks; every rank hears).
        # Rank 0 holds the output directory's lock for as long as the run lasts.
        self._dir_lock = None
        check_same_config(world, config)

        def prepare():
            check_world(config, world)
            self._dir_lock, meta = prepare_output_dir(config, world.size)
            return meta
        resumed = on_main(world, prepare)
        try:
            self._set_up(config, resumed)
        except BaseException:
            self.close()  # a run that failed to start holds nothing, nor leaves a directory it made empty
            if self._dir_lock is not None:
                self._dir_lock.abandon()
            raise

    def close(self) -> None:
        """Release the output directory's lock (train() does when it ends): another run may use
        the directory while this trainer still exists. The trackers' runs end too."""
        if self._dir_lock is not None:
            self._dir_lock.release()
        if getattr(self, "metrics", None) is not None:  # the trackers' runs end with it
            self.metrics.close()

    def _set_up(self, config: TrainConfig, resumed: Optional[dict]) -> None:
        """Everything after the output directory's checks: the data and the model (checked before
        --overwrite removes anything), the warm-up, the wrapping, and a resumed run's state."""
        world = self.world
        state = load_checkpoint(config.output_dir) if resumed is not None else None
        # A bad file is refused before the model loads. Until the output directory is started
        # (start_output_dir), a stop signal ends set-up with nothing changed.
        self.train_rows, self.eval_rows = load_examples(config, self.stop)
        self.stop.check("reading the data")
        random.seed(config.seed)
        torch.manual_seed(config.seed)
        self.tokenizer, model = load_model(config, self.device)
        self.stop.check("loading the model")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        if model.get_output_embeddings() is None:
            raise ValueError(f"model {config.model_path!r} has no lm_head (get_output_embeddings() is None)")
        check_lora_targets(model, config)
        # Far too long a row is refused on a prefix, before all of it is tokenized.
        limit = dict(positions=position_limit(model), max_new_tokens=config.max_new_tokens, stop=self.stop)
        self.prompts = contexts_ids(self.tokenizer, config.templates, KINDS, self.train_rows, config.use_chat_template,
                                    **limit)
        self.eval_prompts = contexts_ids(self.tokenizer, config.templates, ["student"], self.eval_rows,
                                         config.use_chat_template, split="eval", **limit)["student"]
        self.stop.check("tokenizing the data")
        check_lengths(model, {**{f"templates.{kind} (train)": self.prompts[kind] for kind in KINDS},
                              "templates.student (eval)": self.eval_prompts}, config.max_new_tokens)
        self._alone_above = None  # rollout_groups: a sequence longer goes in a pack of its own
        if config.packed:
            self._check_packing(model)
        on_main(world, lambda: start_output_dir(config))  # every check passed: --overwrite may remove now
        model_dir = config.model_path
        if config.model_path == TOY:
            model_dir = os.path.join(config.output_dir, TOY_BASE)
            if not config.resume:
                model = warmed_up_base(model, config, self.tokenizer, self.train_rows, self.prompts, self.device,
                                       self.stop)  # base_cache.py: built, or loaded from the cache
                on_main(world, lambda: write_dir_atomically(
                    model_dir, lambda d: (model.save_pretrained(d), self.tokenizer.save_pretrained(d))))
        self.model, self.frozen = wrap_model(model, config)
        for module in (self.model, self.frozen):  # rank 0's weights everywhere, as DDP starts
            if module is not None:
                broadcast_module(world, module)
                if config.fsdp:
                    shard_model(module)
        self.rollouts, self._synced_step = None, None
        if config.rollout_engine == "vllm":
            self.rollouts = self._vllm_engine(model, model_dir)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.step, self.position = 0, 0
        self.nonfinite_in_a_row, self.nonfinite_total = 0, 0
        self._saved_step: Optional[int] = None  # the step the newest checkpoint holds
        self._redo_evaluation = False  # resumed from a step whose evaluation a stop cut short
        # TensorBoard drops what an interrupted run logged after the checkpoint it resumes from.
        self.metrics = MetricsLog(config.output_dir, start_trackers(
            config, world.main, purge_step=None if resumed is None else resumed["step"] + 1))
        self.drift = Drift(config.drift_warn_kl if world.main else None, Drift.advice(config))  # rank 0 warns
        if state is not None:
            self._restore(state)
            # A resumed run writes again what came after its checkpoint, and the evaluation it
            # starts with (before training, or after it when the run was already at max_steps).
            if world.main:
                redo = self.step == 0 or self.step >= config.max_steps
                cut_metrics(self.metrics.path, self.step, redo_evaluation=redo)
            # A stop during a scheduled evaluation saved the step without it: it runs first.
            due = config.eval_every and self.step % config.eval_every == 0 and 0 < self.step < config.max_steps
            self._redo_evaluation = bool(due) and on_main(world, lambda: not evaluated_at(self.metrics.path, self.step))

    # ---- set-up -----------------------------------------------------------------------
    def _check_packing(self, model) -> None:
        """A pack's sequences must not see each other (packing.check_isolation, on two of the
        contexts, the model in eval mode: no dropout); sequences past a rope switch go alone."""
        training = model.training
        model.eval()
        try:
            with self._autocast():
                check_isolation(model.get_decoder(), [self.prompts["student"][0], self.prompts["teacher"][0]],
                                model.get_input_embeddings().num_embeddings, self.device)
        finally:
            model.train(training)
        self._alone_above = rope_switch_length(model.config)

    def _vllm_engine(self, model, model_dir: str) -> VllmRollouts:
        prompts = [*self.prompts["student"], *self.eval_prompts]
        length = max(map(len, prompts), default=0) + self.config.max_new_tokens
        limit = getattr(model.config, "max_position_embeddings", None)
        return VllmRollouts(model_dir, self.device, model.dtype, min(length, limit or length), self.config.seed,
                            self.config.vllm_kwargs)

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

    def reader(self, model):
        """What reads a context to its final hidden states: the decoder, or under FSDP2 the whole
        model (its root unit holds the embeddings: distributed.WholeModelDecoder)."""
        return WholeModelDecoder(model) if self.config.fsdp else model.get_decoder()

    @contextlib.contextmanager
    def _frozen_weights(self, use_base: bool):
        """The decoder and lm_head to read the frozen contexts with."""
        if use_base and self.config.lora:
            with self.model.disable_adapter():
                yield self.reader(self._base_model()), self._base_model().get_output_embeddings()
        elif use_base:
            yield self.reader(self.frozen), self.frozen.get_output_embeddings()
        else:
            yield self.reader(self._base_model()), self._base_model().get_output_embeddings()

    def read_hidden(self, decoder, kind: str, indices: Sequence[int], rollouts: Sequence[List[int]]) -> torch.Tensor:
        """[sum of rollout lengths, H]: the final hidden states of the rollouts (none empty) in
        context `kind`, rows in order. Packed: the sequences in one forward (packing.py); else
        one forward per rollout."""
        prompts = [self.prompts[kind][i] for i in indices]
        if self.config.packed:
            return packed_hidden(decoder, prompts, rollouts, self.device)
        return torch.cat([rollout_hidden(decoder, p, r, self.device) for p, r in zip(prompts, rollouts)])

    def groups(self, pairs: Sequence) -> List[List]:
        """(example index, rollout) pairs in the groups read together (packing.rollout_groups)."""
        return rollout_groups(pairs, self.prompts, self.config.packed, self.config.max_tokens_per_micro_batch,
                              self._alone_above)

    def group_states(self, indices: List[int], rollouts: List[List[int]], pmi_streams: bool):
        """Hidden states [sum of rollout lengths, H] of the rollouts (none empty) in each context,
        rows in order; only the student's has a graph (read_hidden). pmi_streams: the
        reference-only context and the anchor too (the PMI target, or the diagnostics, read them)."""
        def read(decoder, kind):
            return self.read_hidden(decoder, kind, indices, rollouts)
        base = self._base_model()
        with self._autocast():
            states = {}
            # The frozen contexts first: the passing peak of their forwards (the longest
            # contexts) then never sits on top of the student's activations, held for the backward.
            with torch.no_grad():
                with self._frozen_weights(self.config.teacher_weights == "base") as (decoder, head):
                    states["teacher"] = read(decoder, "teacher")
                    if pmi_streams:
                        states["refonly"] = read(decoder, "refonly")
                    frozen_head = head
                if self.config.anchor and pmi_streams:
                    with self._frozen_weights(True) as (decoder, _):
                        states["anchor"] = read(decoder, "student")
            states["student"] = read(self.reader(base), "student")
        head = base.get_output_embeddings()
        states = {k: v.to(head.weight.dtype) for k, v in states.items()}
        return states, head, frozen_head

    def rollout_states(self, example_index: int, rollout: List[int], pmi_streams: bool):
        """Hidden states [T, H] of one rollout in each context."""
        return self.group_states([example_index], [rollout], pmi_streams)

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
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      stopping_criteria=self.stop.generation_criteria(),
                                      synced_gpus=self.config.fsdp)  # a rank that is done forwards on with the rest
        self.model.train()
        width = batch["input_ids"].shape[1]
        return [trim_rollout(row[width:].tolist(), tok.eos_token_id, tok.pad_token_id) for row in out]

    def evaluate(self) -> Optional[float]:
        """Accuracy on the held-out rows, averaged over eval_samples samples per question (None
        without held-out rows). A stop signal ends it between batches (raises Interrupted)."""
        config, rows, world = self.config, self.eval_rows, self.world
        if not rows:
            return None
        torch.manual_seed(self._seed(evaluation=True))  # a resumed run's evaluation samples alike
        mine = range(world.rank, len(rows), world.size)  # each rank its share, in batches of 32
        batches = -(-len(range(0, len(rows), world.size)) // 32)  # rank 0's count: the same checks on every rank
        from tqdm import tqdm
        correct = 0
        for _ in range(config.eval_samples):
            for b in tqdm(range(batches), desc="evaluation", leave=False, mininterval=2, disable=not world.main):
                fault_point("evaluation-batch")
                self.stop.check("evaluation")
                chunk = mine[32 * b:32 * (b + 1)]
                if not chunk:
                    if config.fsdp:  # its forwards gather the weights with the other ranks'
                        self.generate(self.eval_prompts[:1], config.eval_temperature, 1.0, config.max_new_tokens)
                    continue
                outs = self.generate([self.eval_prompts[i] for i in chunk], config.eval_temperature, 1.0,
                                     config.max_new_tokens)
                for i, out in zip(chunk, outs):
                    text = self.tokenizer.decode(out, skip_special_tokens=True)
                    correct += extract_answer(text, config.answer_pattern) == rows[i]["answer"]
        self.stop.check("evaluation")  # a stop that cut the last batch's generation short
        correct = sum_over_ranks(world, {"correct": correct}, self.device)["correct"]
        return correct / (len(rows) * config.eval_samples)

    # ---- one step ---------------------------------------------------------------------
    def next_indices(self, count: int) -> List[int]:
        """This rank's share of the next `count` rows of the data order (a fresh permutation per
        epoch, seeded, so a resume continues it): the ranks take consecutive equal slices."""
        n, share = len(self.train_rows), count // self.world.size
        out = []
        start = self.position + self.world.rank * share
        for pos in range(start, start + share):
            epoch, offset = divmod(pos, n)
            order = list(range(n))
            random.Random(self.config.seed * 7919 + epoch).shuffle(order)
            out.append(order[offset])
        self.position += count
        return out

    def train_step(self) -> Dict:
        """One optimizer step, or a skipped one if its loss or gradients are not finite. A stop
        signal during it abandons it: the state stays that after the previous step."""
        position = self.position
        try:
            return self._train_step()
        except Interrupted:
            self.position = position
            self.optimizer.zero_grad(set_to_none=True)
            raise

    def _seed(self, evaluation: bool = False) -> int:
        """The step's sampling seed on this rank (its evaluation's, apart)."""
        world = self.world
        return ((self.config.seed * 1_000_003 + self.step) * world.size + world.rank) * 2 + evaluation

    def _train_step(self) -> Dict:
        config, world = self.config, self.world
        # Sampling is seeded by the step (and the rank), so an interrupted and resumed run samples the same.
        torch.manual_seed(self._seed())
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        lr = config.lr * self._lr_factor(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        diagnose = (self.step + 1) % config.diagnostics_every == 0
        timer = StepTimer(self.device)
        micro_batches = []  # of (example index, rollout); the loss is the token mean over all of them
        with timer("sampling"):
            for _ in range(config.grad_accum):
                self.stop.check("a step's sampling")
                indices = self.next_indices(config.batch_size)
                rollouts = self.generate([self.prompts["student"][i] for i in indices], config.temperature,
                                         config.top_p, config.max_new_tokens)
                micro_batches.append(list(zip(indices, rollouts)))
        batch = [pair for micro_batch in micro_batches for pair in micro_batch]
        counts = {"tokens": sum(len(rollout) for _, rollout in batch), "rollouts": len(batch)}
        counts = sum_over_ranks(world, counts, self.device)  # the loss is the mean over every rank's tokens
        tokens = int(counts["tokens"])
        totals: Dict[str, float] = {"loss": 0.0}
        for micro_batch in micro_batches:
            self.stop.check("a step")  # every rank, once per micro-batch: a stop waits for no more than one
            groups = self.groups(micro_batch)
            fillers = self.fillers(len(groups))  # agreed before the packs run, or a rank waits on the others
            for group in groups:
                fault_point("step-rollout")
                self.stop.check_local("a step")
                self._distil(group, tokens, diagnose, totals, timer)
            for group in fillers:
                self._distil(group, tokens, diagnose, {"loss": 0.0}, timer, scale=0.0)
        if world.distributed:
            with timer("all_reduce"):  # gradients (FSDP2 reduced its own) and the logged sums, over the ranks
                if not config.fsdp:
                    sum_gradients(world, self.trainable)
                totals = sum_over_ranks(world, totals, self.device)
        with timer("optimizer"):
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            finite = math.isfinite(totals["loss"]) and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        self.nonfinite_total += not finite
        self.step += 1
        elapsed = time.perf_counter() - start
        record = {"step": self.step, "loss": totals.pop("loss"), "lr": lr, "grad_norm": grad_norm,
                  "skipped": not finite, "nonfinite_steps": self.nonfinite_total,
                  "response_length": tokens / max(1, counts["rollouts"]), "tokens_per_s": tokens / elapsed,
                  "peak_memory_gib": self._peak_memory_gib(), "time/step": elapsed}
        record.update({f"time/{part}": seconds for part, seconds in timer.seconds.items()})
        record.update({f"diag/{k}": v / max(1, tokens) for k, v in totals.items()})  # per token
        # KL(q || p_student) for the run's own target q: the teacher in OPSD mode (the
        # diagnostics' target is always the PMI one).
        kl_key = "diag/kl_target_student" if config.mode == "pmi" else "diag/kl_teacher_student"
        if kl_key in record:
            record["kl_q_p"] = record[kl_key]
        texts = [self.tokenizer.decode(rollout, skip_special_tokens=True) for _, rollout in batch]
        markers = sum_over_ranks(world, count_markers(texts, config.markers), self.device)
        record.update({f"markers/{k}": int(v) for k, v in markers.items()})
        if diagnose:  # drift.py: the student's KL from the frozen base (over every rank's rollouts); a warning
            record.update(self.drift.measure(self, batch, lambda sums: sum_over_ranks(world, sums, self.device)))
            self.drift.check(self.step, record)
        return record

    def filler_group(self) -> List:
        """A one-token rollout of the first row: read by a rank with fewer packs than the others."""
        return [(0, [self.tokenizer.eos_token_id])]

    def fillers(self, count: int) -> List[List]:
        """The filler groups a rank with `count` groups reads after them: under FSDP2 every rank
        runs as many forwards as the others (each gathers weights with them); none otherwise."""
        if not self.config.fsdp:
            return []
        return [self.filler_group()] * (most_over_ranks(self.world, count, self.device) - count)

    def _distil(self, group: List, normalizer: int, diagnose: bool, totals: Dict, timer: StepTimer,
                scale: float = 1.0) -> None:
        """The loss over every token of a group of (index, rollout) pairs, one fused_pmi_kl call,
        divided by the step's token count; its gradients, times scale, accumulate into the
        parameters'. FSDP2 averages gradients over the ranks where the step needs their sum, so
        there the backward is of the loss times the world size."""
        options = self.config.loss_options()  # the loss keys, as LossOptions (validate() checked them)
        pmi = options.pmi
        indices, rollouts = [i for i, _ in group], [rollout for _, rollout in group]
        with timer("forwards"):
            states, head, frozen_head = self.group_states(indices, rollouts, pmi_streams=pmi or diagnose)

        def frozen():  # read at each use: under FSDP2 a backward reshards the weights it gathered
            return dict(frozen_weight=frozen_head.weight.detach(),
                        frozen_bias=None if frozen_head.bias is None else frozen_head.bias.detach())
        with timer("loss"):
            loss = fused_pmi_kl(states["student"], head.weight, states["teacher"],
                                states.get("refonly") if pmi else None, states.get("anchor"), lm_head_bias=head.bias,
                                **frozen(), normalizer=normalizer, **options.keywords(), check_finite=False)
        with timer("backward"):
            (loss * (scale * (self.world.size if self.config.fsdp else 1))).backward()
        totals["loss"] += float(loss.detach())  # the normalizer makes the step's sum a token mean
        if diagnose:
            with timer("diagnostics"):
                diag = pmi_diagnostics(states["student"], states["teacher"], states["refonly"], states.get("anchor"),
                                       lm_head_weight=head.weight.detach(),
                                       lm_head_bias=None if head.bias is None else head.bias.detach(), **frozen(),
                                       **options.target_keywords(), check_finite=False)
                for key, value in diag.items():
                    totals[key] = totals.get(key, 0.0) + float(value.nan_to_num().sum())

    def _peak_memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    # ---- checkpoints and the loop -----------------------------------------------------
    def _state(self) -> Dict:
        """What state.pt holds; under FSDP2 the weights and optimizer state are in sharded/ instead."""
        sharded = self.config.fsdp
        state = {"trainable": {} if sharded else {n: p.detach().cpu() for n, p in self.model.named_parameters()
                                                  if p.requires_grad},
                 "optimizer": {} if sharded else self.optimizer.state_dict(), "step": self.step,
                 "position": self.position, "nonfinite": [self.nonfinite_in_a_row, self.nonfinite_total],
                 "drift_warned": self.drift.warned, "rng": rng_state()}
        if sharded:
            state["sharded_optimizer"] = bool(self.optimizer.state)
        return state

    def _sharded_state(self, with_optimizer: bool) -> Dict:
        """The model's (and optimizer's) state as DTensor shards, for torch.distributed.checkpoint.
        An optimizer that has not stepped is left out: reading its state would create it, with a
        step count that changes Adam's first update."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        state = {"model": get_model_state_dict(self.model)}
        if with_optimizer:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        return state

    def _restore(self, state: Dict) -> None:
        if self.config.fsdp:  # every rank reads its shards
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
            sharded = self._sharded_state(with_optimizer=state["sharded_optimizer"])
            dcp.load(sharded, checkpoint_id=latest_sharded(self.config.output_dir))
            set_model_state_dict(self.model, sharded["model"])
            if "optimizer" in sharded:
                set_optimizer_state_dict(self.model, self.optimizer, sharded["optimizer"])
        params = dict(self.model.named_parameters())
        missing = set(state["trainable"]) - set(params)
        if missing:
            raise ValueError(f"--resume: checkpoint parameters not in this model: {sorted(missing)[:3]}")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        if not self.config.fsdp:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.position = state["step"], state["position"]
        self.nonfinite_in_a_row, self.nonfinite_total = state["nonfinite"]
        self.drift.warned = bool(state.get("drift_warned", False))  # warned once per run, resumed or not
        self._saved_step = self.step
        set_rng_state(state["rng"])

    def save(self) -> str:
        """A checkpoint of the current step; refused (TrainingFailed) if any parameter or
        optimizer value is not finite, so the previous checkpoint stays the newest."""
        if self.config.fsdp:  # the root unit stays gathered after forwards without a backward (evaluation)
            for module in filter(None, (self.model, self.frozen)):
                module.reshard()
        names = {p: n for n, p in self.model.named_parameters()}
        tensors = [(name, p) for p, name in names.items() if p.requires_grad]
        tensors += [(f"the optimizer's {key} of {names[p]}", value) for p, entry in self.optimizer.state.items()
                    for key, value in entry.items() if value.is_floating_point()]
        local = lambda tensor: tensor.to_local() if hasattr(tensor, "to_local") else tensor  # noqa: E731 (a shard)
        bad = next((name for name, tensor in tensors if not torch.isfinite(local(tensor)).all()), None)
        bad = first_over_ranks(self.world, bad) if self.config.fsdp else bad  # all ranks refuse together
        if bad is not None:
            raise TrainingFailed(f"step {self.step}: {bad} is not finite; not saved, so the newest checkpoint "
                                 f"is still {read_latest(self.config.output_dir)}")
        meta = {"step": self.step, "config": dataclasses.asdict(self.config), "world_size": self.world.size}
        save_pretrained = checkpoint_writer(self)  # under FSDP2 a collective: every rank gathers
        sharded = None
        if self.config.fsdp:  # every rank writes its shards, then rank 0 moves them into the checkpoint
            import torch.distributed.checkpoint as dcp
            sharded = sharded_staging(self.config.output_dir, self.step)
            on_main(self.world, lambda: shutil.rmtree(sharded, ignore_errors=True))
            dcp.save(self._sharded_state(with_optimizer=bool(self.optimizer.state)), checkpoint_id=sharded)
        # Otherwise every rank holds the same weights and optimizer state: rank 0 writes them.
        path = on_main(self.world, lambda: save_checkpoint(self.config.output_dir, self.step, self._state(), meta,
                                                           save_pretrained, keep=self.config.keep_checkpoints,
                                                           sharded=sharded))
        self._saved_step = self.step
        return path

    def train(self, progress: bool = True) -> Dict:
        """Run to max_steps. SIGINT/SIGTERM at any point (evaluation, a step, a save) end the run
        with its last consistent state saved; the result names the signal ("interrupted")."""
        result = {"accuracy_before": None, "accuracy_after": None, "steps": self.step, "interrupted": None,
                  "checkpoint": None}
        with self.stop.catching():
            try:
                self._run(result, progress)
            except Interrupted as stop:
                result["interrupted"], result["where"] = signal.Signals(stop.signum).name, stop.where
                if self._saved_step != self.step:
                    self.save()
            finally:
                self.close()  # the run is over: another may use the directory
        result["steps"], result["checkpoint"] = self.step, read_latest(self.config.output_dir)
        return result

    def _run(self, result: Dict, progress: bool) -> None:
        from tqdm import tqdm
        config = self.config
        if self.step == 0 and self._saved_step is None and config.model_path == TOY and config.sft_steps:
            self.save()  # the warmed-up start: a stop before the first scheduled save can --resume
        if self.step == 0:
            result["accuracy_before"] = self._evaluate_and_log()
        else:  # a resumed run: the evaluation its first start logged
            result["accuracy_before"] = on_main(self.world, lambda: accuracy_at(self.metrics.path, 0))
            if self._redo_evaluation:
                self._evaluate_and_log()
        bar = tqdm(total=config.max_steps, initial=self.step, disable=not progress or not self.world.main, desc="opsd")
        try:
            while self.step < config.max_steps:
                self.stop.check("a step")
                record = self.train_step()
                try:
                    if config.eval_every and self.step % config.eval_every == 0 and self.step < config.max_steps:
                        record["eval/accuracy"] = self.evaluate()
                finally:  # an interrupted evaluation still leaves the step's row
                    self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", len=f"{record['response_length']:.0f}")
                if self.step % config.save_every == 0:
                    self.save()
        finally:
            bar.close()
        result["accuracy_after"] = self._evaluate_and_log()
        if self._saved_step != self.step:
            self.save()

    def _evaluate_and_log(self) -> Optional[float]:
        accuracy = self.evaluate()
        if accuracy is not None and self.world.main:
            self.metrics.write({"step": self.step, "eval/accuracy": accuracy})
        return accuracy

    def _log(self, record: Dict) -> None:
        """Every log_every steps, every evaluated step and every skipped one; too many skipped
        in a row end the run."""
        from tqdm import tqdm
        logged = record["skipped"] or self.step % self.config.log_every == 0 or "eval/accuracy" in record
        if logged and self.world.main:
            self.metrics.write(record)
        if not record["skipped"]:
            return
        limit = self.config.max_nonfinite_steps
        if self.world.main:
            tqdm.write(f"step {self.step}: the loss or a gradient is not finite; step skipped, no update "
                       f"({self.nonfinite_in_a_row} in a row, the run stops at {limit})", file=sys.stderr)
        if self.nonfinite_in_a_row >= limit:
            raise TrainingFailed(
                f"stopped at step {self.step}: {limit} steps in a row had a non-finite loss or gradient "
                f"(max_nonfinite_steps); the newest checkpoint is {read_latest(self.config.output_dir)}. "
                "Check the loss options (beta, clip, loss_temperature) and lr")
