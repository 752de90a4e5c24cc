"""The final hidden states of the rollout tokens in each context, and the reader that the
step, the drift signal and the comparison's probe read every context through (ContextReader).

The token layout (the states at positions L - 1 ... L + T - 2 of prompt + rollout[:-1]) is
pmi_kernels.prompts' rollout_positions. These states are the final decoder output (after the
final norm); the lm_head is never applied here - fused_pmi_kl does that.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..prompts import rollout_positions
from .data.packing import packed_hidden, rollout_groups
from .distributed import WholeModelDecoder, World, most_over_ranks

if TYPE_CHECKING:  # config.py imports rollouts.py, which imports this module
    from .config import TrainConfig

KINDS = ("student", "teacher", "refonly")


def rollout_hidden(decoder, prompt: List[int], rollout: List[int], device) -> torch.Tensor:
    """[T, H]: the decoder's final hidden states that predict each rollout token."""
    ids = torch.tensor(prompt + rollout[:-1], device=device)[None]
    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
    return hidden[rollout_positions(len(prompt), len(rollout))]


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on a GPU when the config asks for it; nothing otherwise."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ContextReader:
    """Reads the contexts of rows (prompt ids per kind and row) over rollouts to their final
    hidden states: the student's with the trained weights (and a graph), the teacher's and the
    reference-only context's with the frozen ones (or the current ones: teacher_weights), the
    anchor's with the frozen base. Packed: a group's rollouts in one forward per context.

    model is the trained model (a PEFT model with LoRA), frozen the frozen copy of full
    fine-tuning (None with LoRA, whose base is the model with its adapter off, or when nothing
    reads the base); filler_token is what a filler group's one-token rollout holds;
    alone_above is the length past which a sequence goes in a pack of its own (the rope switch)."""

    def __init__(
        self,
        config: TrainConfig,
        world: World,
        device: torch.device,
        model,
        frozen,
        prompts: Dict[str, List[List[int]]],
        filler_token: int,
        alone_above: Optional[int] = None,
    ):
        self.config, self.world, self.device = config, world, device
        self.model, self.frozen = model, frozen
        self.prompts = prompts
        self.filler_token = filler_token
        self.alone_above = alone_above

    def on(self, prompts: Dict[str, List[List[int]]]) -> "ContextReader":
        """The same reader over other rows' prompt ids."""
        return ContextReader(
            self.config, self.world, self.device, self.model, self.frozen, prompts, self.filler_token, self.alone_above
        )

    def autocast(self):
        return autocast(self.device, self.config.bf16)

    def base_model(self):
        """The trained model without the PEFT wrapper (its base layers carry the adapter)."""
        return self.model.get_base_model() if self.config.lora else self.model

    def reads_base(self) -> bool:
        """Whether the frozen base can be read: LoRA's base, or full fine-tuning's frozen copy."""
        return self.config.lora or self.frozen is not None

    def decoder(self, model):
        """What reads a context to its final hidden states: the decoder, or under FSDP2 the whole
        model (its root unit holds the embeddings: distributed.WholeModelDecoder)."""
        return WholeModelDecoder(model) if self.config.fsdp else model.get_decoder()

    @contextlib.contextmanager
    def frozen_weights(self, use_base: bool) -> Iterator[Tuple]:
        """The decoder and lm_head to read the frozen contexts with."""
        if use_base and self.config.lora:
            with self.model.disable_adapter():
                yield self.decoder(self.base_model()), self.base_model().get_output_embeddings()
        elif use_base:
            yield self.decoder(self.frozen), self.frozen.get_output_embeddings()
        else:
            yield self.decoder(self.base_model()), self.base_model().get_output_embeddings()

    def hidden(self, decoder, kind: str, indices: Sequence[int], rollouts: Sequence[List[int]]) -> torch.Tensor:
        """[sum of rollout lengths, H]: the final hidden states of the rollouts (none empty) in
        context `kind`, rows in order. Packed: the sequences in one forward (packing.py); else
        one forward per rollout."""
        prompts = [self.prompts[kind][i] for i in indices]
        if self.config.packed:
            return packed_hidden(decoder, prompts, rollouts, self.device)
        return torch.cat([rollout_hidden(decoder, p, r, self.device) for p, r in zip(prompts, rollouts)])

    def groups(self, pairs: Sequence) -> List[List]:
        """(row index, rollout) pairs in the groups read together (packing.rollout_groups)."""
        return rollout_groups(
            pairs, self.prompts, self.config.packed, self.config.max_tokens_per_micro_batch, self.alone_above
        )

    def filler_group(self) -> List:
        """A one-token rollout of the first row: read by a rank with fewer packs than the others."""
        return [(0, [self.filler_token])]

    def fillers(self, count: int) -> List[List]:
        """The filler groups a rank with `count` groups reads after them: under FSDP2 every rank
        runs as many forwards as the others (each gathers weights with them); none otherwise."""
        if not self.config.fsdp:
            return []
        return [self.filler_group()] * (most_over_ranks(self.world, count, self.device) - count)

    def states(self, indices: List[int], rollouts: List[List[int]], pmi_streams: bool):
        """(states, head, frozen head): hidden states [sum of rollout lengths, H] of the rollouts
        (none empty) in each context, rows in order, in the head's dtype; only the student's has
        a graph. pmi_streams: the reference-only context and the anchor too (the PMI target, or
        the diagnostics, read them)."""

        def read(decoder, kind):
            return self.hidden(decoder, kind, indices, rollouts)

        base = self.base_model()
        with self.autocast():
            states = {}
            # The frozen contexts first: the passing peak of their forwards (the longest
            # contexts) then never sits on top of the student's activations, held for the backward.
            with torch.no_grad():
                with self.frozen_weights(self.config.teacher_weights == "base") as (decoder, head):
                    states["teacher"] = read(decoder, "teacher")
                    if pmi_streams:
                        states["refonly"] = read(decoder, "refonly")
                    frozen_head = head
                if self.config.anchor and pmi_streams:
                    with self.frozen_weights(True) as (decoder, _):
                        states["anchor"] = read(decoder, "student")
            states["student"] = read(self.decoder(base), "student")
        head = base.get_output_embeddings()
        states = {k: v.to(head.weight.dtype) for k, v in states.items()}
        return states, head, frozen_head

    def rollout_states(self, index: int, rollout: List[int], pmi_streams: bool):
        """states() of one rollout: hidden states [T, H] in each context."""
        return self.states([index], [rollout], pmi_streams)
