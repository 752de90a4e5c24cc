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

The Trainer puts the parts together: the context reader (contexts.py), the rollout sampler
(rollouts.py), the step's loss, schedule and record (step.py), the drift signal (drift.py) and
the checkpointer (checkpoint.py).
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import time
from typing import Dict, List, Optional

import torch

from .checkpoint import Checkpointer, load_checkpoint, read_latest, write_dir_atomically
from .config import TOY, TrainConfig
from .contexts import KINDS, ContextReader, autocast
from .data.data import extract_answer, load_examples
from .data.packing import check_isolation, rope_switch_length
from .data.tokenized import contexts_ids
from .demo.base_cache import warmed_up_base
from .distributed import (
    SyncedStop,
    broadcast_module,
    check_same_config,
    check_world,
    join_world,
    on_main,
    shard_model,
    sum_gradients,
    sum_over_ranks,
    training_device,
)
from .drift import Drift
from .interrupts import Interrupted, StopRequest, TrainingFailed, fault_point
from .metrics import MetricsLog, StepTimer, accuracy_at, count_markers, cut_metrics, evaluated_at
from .model import check_lengths, check_lora_targets, load_model, position_limit, wrap_model
from .rollouts import RolloutSampler, vllm_rollouts
from .run_dir import TOY_BASE, prepare_output_dir, start_output_dir
from .step import distil, lr_factor, peak_memory_gib, sampling_seed, step_record
from .trackers import start_trackers


class Trainer:
    """One run: the set-up (the checks, the data, the model, the warm-up, a resumed state), then
    train(). Its parts: contexts (ContextReader), sampler (RolloutSampler), checkpoints
    (Checkpointer), drift (Drift); step.py's distil, schedule and record make each step."""

    def __init__(self, config: TrainConfig, stop: Optional[StopRequest] = None):
        self.config = config.validate()
        self.world = world = join_world(config.device)  # one process, or a rank under torchrun
        self.device = training_device(config.device, world)
        self.stop = (
            SyncedStop(world, self.device, stop or StopRequest()) if world.distributed else stop or StopRequest()
        )
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
        prompts = contexts_ids(
            self.tokenizer, config.templates, KINDS, self.train_rows, config.use_chat_template, **limit
        )
        self.eval_prompts = contexts_ids(
            self.tokenizer,
            config.templates,
            ["student"],
            self.eval_rows,
            config.use_chat_template,
            split="eval",
            **limit,
        )["student"]
        self.stop.check("tokenizing the data")
        check_lengths(
            model,
            {
                **{f"templates.{kind} (train)": prompts[kind] for kind in KINDS},
                "templates.student (eval)": self.eval_prompts,
            },
            config.max_new_tokens,
        )
        alone_above = self._packing_limit(model, prompts) if config.packed else None
        on_main(world, lambda: start_output_dir(config))  # every check passed: --overwrite may remove now
        model_dir = config.model_path
        if config.model_path == TOY:
            model_dir = os.path.join(config.output_dir, TOY_BASE)
            if not config.resume:
                model = warmed_up_base(
                    model, config, self.tokenizer, self.train_rows, prompts, self.device, self.stop
                )  # base_cache.py: built, or loaded from the cache
                on_main(
                    world,
                    lambda: write_dir_atomically(
                        model_dir, lambda d: (model.save_pretrained(d), self.tokenizer.save_pretrained(d))
                    ),
                )
        self.model, self.frozen = wrap_model(model, config)
        for module in (self.model, self.frozen):  # rank 0's weights everywhere, as DDP starts
            if module is not None:
                broadcast_module(world, module)
                if config.fsdp:
                    shard_model(module)
        self.contexts = ContextReader(
            config, world, self.device, self.model, self.frozen, prompts, self.tokenizer.eos_token_id, alone_above
        )
        engine = None
        if config.rollout_engine == "vllm":
            engine = vllm_rollouts(config, model, model_dir, self.device, [*prompts["student"], *self.eval_prompts])
        self.sampler = RolloutSampler(config, self.model, self.tokenizer, self.device, self.stop, engine)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.checkpoints = Checkpointer(config, world, self.model, self.frozen, self.optimizer, self.tokenizer)
        self.step, self.position = 0, 0
        self.nonfinite_in_a_row, self.nonfinite_total = 0, 0
        self._redo_evaluation = False  # resumed from a step whose evaluation a stop cut short
        # TensorBoard drops what an interrupted run logged after the checkpoint it resumes from.
        self.metrics = MetricsLog(
            config.output_dir,
            start_trackers(config, world.main, purge_step=None if resumed is None else resumed["step"] + 1),
        )
        self.drift = Drift(config.drift_warn_kl if world.main else None, Drift.advice(config))  # rank 0 warns
        if state is not None:
            self.checkpoints.restore(state)
            self.step, self.position = state["step"], state["position"]
            self.nonfinite_in_a_row, self.nonfinite_total = state["nonfinite"]
            self.drift.warned = bool(state.get("drift_warned", False))  # warned once per run, resumed or not
            # A resumed run writes again what came after its checkpoint, and the evaluation it
            # starts with (before training, or after it when the run was already at max_steps).
            if world.main:
                redo = self.step == 0 or self.step >= config.max_steps
                cut_metrics(self.metrics.path, self.step, redo_evaluation=redo)
            # A stop during a scheduled evaluation saved the step without it: it runs first.
            due = config.eval_every and self.step % config.eval_every == 0 and 0 < self.step < config.max_steps
            self._redo_evaluation = bool(due) and on_main(world, lambda: not evaluated_at(self.metrics.path, self.step))

    # ---- set-up -----------------------------------------------------------------------
    def _packing_limit(self, model, prompts: Dict[str, List[List[int]]]) -> Optional[int]:
        """A pack's sequences must not see each other (packing.check_isolation, on two of the
        contexts, the model in eval mode: no dropout); the length past which a sequence goes in
        a pack of its own (a rope switch), or None."""
        training = model.training
        model.eval()
        try:
            with autocast(self.device, self.config.bf16):
                check_isolation(
                    model.get_decoder(),
                    [prompts["student"][0], prompts["teacher"][0]],
                    model.get_input_embeddings().num_embeddings,
                    self.device,
                )
        finally:
            model.train(training)
        return rope_switch_length(model.config)

    @property
    def prompts(self) -> Dict[str, List[List[int]]]:
        """Each training row's prompt ids in each context (the context reader's)."""
        return self.contexts.prompts

    # ---- sampling and evaluation ------------------------------------------------------
    def generate(
        self, prompts: List[List[int]], temperature: float, top_p: float, max_new_tokens: int
    ) -> List[List[int]]:
        """Sampled (temperature > 0) or greedy continuations with the current weights, trimmed
        after EOS (rollouts.RolloutSampler)."""
        return self.sampler.generate(prompts, temperature, top_p, max_new_tokens, self.step)

    def evaluate(self) -> Optional[float]:
        """Accuracy on the held-out rows, averaged over eval_samples samples per question (None
        without held-out rows). A stop signal ends it between batches (raises Interrupted)."""
        config, rows, world = self.config, self.eval_rows, self.world
        if not rows:
            return None
        torch.manual_seed(sampling_seed(config, world, self.step, evaluation=True))  # a resumed run's samples alike
        mine = range(world.rank, len(rows), world.size)  # each rank its share, in batches of 32
        batches = -(-len(range(0, len(rows), world.size)) // 32)  # rank 0's count: the same checks on every rank
        from tqdm import tqdm

        correct = 0
        for _ in range(config.eval_samples):
            for b in tqdm(range(batches), desc="evaluation", leave=False, mininterval=2, disable=not world.main):
                fault_point("evaluation-batch")
                self.stop.check("evaluation")
                chunk = mine[32 * b : 32 * (b + 1)]
                if not chunk:
                    if config.fsdp:  # its forwards gather the weights with the other ranks'
                        self.generate(self.eval_prompts[:1], config.eval_temperature, 1.0, config.max_new_tokens)
                    continue
                outs = self.generate(
                    [self.eval_prompts[i] for i in chunk], config.eval_temperature, 1.0, config.max_new_tokens
                )
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

    def _sample(self, timer: StepTimer) -> List[List]:
        """The step's micro-batches of (row index, rollout): grad_accum of this rank's share of
        batch_size rows each, with a rollout sampled for every row."""
        config = self.config
        micro_batches = []
        with timer("sampling"):
            for _ in range(config.grad_accum):
                self.stop.check("a step's sampling")
                indices = self.next_indices(config.batch_size)
                rollouts = self.generate(
                    [self.prompts["student"][i] for i in indices],
                    config.temperature,
                    config.top_p,
                    config.max_new_tokens,
                )
                micro_batches.append(list(zip(indices, rollouts)))
        return micro_batches

    def _train_step(self) -> Dict:
        config, world = self.config, self.world
        # Sampling is seeded by the step (and the rank), so an interrupted and resumed run samples the same.
        torch.manual_seed(sampling_seed(config, world, self.step))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        lr = config.lr * lr_factor(config, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        diagnose = (self.step + 1) % config.diagnostics_every == 0
        timer = StepTimer(self.device)
        micro_batches = self._sample(timer)  # the loss is the token mean over all of them
        batch = [pair for micro_batch in micro_batches for pair in micro_batch]
        counts = {"tokens": sum(len(rollout) for _, rollout in batch), "rollouts": len(batch)}
        counts = sum_over_ranks(world, counts, self.device)  # the loss is the mean over every rank's tokens
        tokens = int(counts["tokens"])
        totals: Dict[str, float] = {"loss": 0.0}
        for micro_batch in micro_batches:
            self.stop.check("a step")  # every rank, once per micro-batch: a stop waits for no more than one
            groups = self.contexts.groups(micro_batch)
            fillers = self.contexts.fillers(len(groups))  # agreed before the packs run, or a rank waits on the others
            for group in groups:
                fault_point("step-rollout")
                self.stop.check_local("a step")
                distil(self.contexts, group, tokens, diagnose, totals, timer)
            for group in fillers:
                distil(self.contexts, group, tokens, diagnose, {"loss": 0.0}, timer, scale=0.0)
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
        record = step_record(
            config,
            self.step,
            totals,
            lr,
            grad_norm,
            not finite,
            self.nonfinite_total,
            tokens,
            counts["rollouts"],
            elapsed,
            peak_memory_gib(self.device),
            timer,
        )
        texts = [self.tokenizer.decode(rollout, skip_special_tokens=True) for _, rollout in batch]
        markers = sum_over_ranks(world, count_markers(texts, config.markers), self.device)
        record.update({f"markers/{k}": int(v) for k, v in markers.items()})
        if diagnose:  # drift.py: the student's KL from the frozen base (over every rank's rollouts); a warning
            record.update(
                self.drift.measure(self.contexts, batch, lambda sums: sum_over_ranks(world, sums, self.device))
            )
            self.drift.check(self.step, record)
        return record

    # ---- checkpoints and the loop -----------------------------------------------------
    def progress(self) -> Dict:
        """What a checkpoint keeps of the run's progress, beside the weights and optimizer state."""
        return {
            "step": self.step,
            "position": self.position,
            "nonfinite": [self.nonfinite_in_a_row, self.nonfinite_total],
            "drift_warned": self.drift.warned,
        }

    def save(self) -> str:
        """A checkpoint of the current step; refused (TrainingFailed) if any parameter or
        optimizer value is not finite, so the previous checkpoint stays the newest."""
        return self.checkpoints.save(self.progress())

    def train(self, progress: bool = True) -> Dict:
        """Run to max_steps. SIGINT/SIGTERM at any point (evaluation, a step, a save) end the run
        with its last consistent state saved; the result names the signal ("interrupted")."""
        result = {
            "accuracy_before": None,
            "accuracy_after": None,
            "steps": self.step,
            "interrupted": None,
            "checkpoint": None,
        }
        with self.stop.catching():
            try:
                self._run(result, progress)
            except Interrupted as stop:
                result["interrupted"], result["where"] = signal.Signals(stop.signum).name, stop.where
                if self.checkpoints.saved_step != self.step:
                    self.save()
            finally:
                self.close()  # the run is over: another may use the directory
        result["steps"], result["checkpoint"] = self.step, read_latest(self.config.output_dir)
        return result

    def _run(self, result: Dict, progress: bool) -> None:
        from tqdm import tqdm

        config = self.config
        if self.step == 0 and self.checkpoints.saved_step is None and config.model_path == TOY and config.sft_steps:
            self.save()  # the warmed-up start: a stop before the first scheduled save can --resume
        if self.step == 0:
            result["accuracy_before"] = self._evaluate_and_log()
        else:  # a resumed run: the evaluation its first start logged
            result["accuracy_before"] = on_main(self.world, lambda: accuracy_at(self.metrics.path, 0))
            if self._redo_evaluation:
                self._evaluate_and_log()
        bar = tqdm(
            total=config.max_steps, initial=self.step, disable=not progress or not self.world.main, desc=config.mode
        )
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
        if self.checkpoints.saved_step != self.step:
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
            tqdm.write(
                f"step {self.step}: the loss or a gradient is not finite; step skipped, no update "
                f"({self.nonfinite_in_a_row} in a row, the run stops at {limit})",
                file=sys.stderr,
            )
        if self.nonfinite_in_a_row >= limit:
            raise TrainingFailed(
                f"stopped at step {self.step}: {limit} steps in a row had a non-finite loss or gradient "
                f"(max_nonfinite_steps); the newest checkpoint is {read_latest(self.config.output_dir)}. "
                "Check the loss options (beta, clip, loss_temperature) and lr"
            )
