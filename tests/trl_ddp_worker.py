"""One optimizer step of PurifiedOPSDTrainer under DDP: run by test_integrations_trl.py as
`torchrun --standalone --nproc_per_node 2 tests/trl_ddp_worker.py OUTPUT_DIR` (gloo, CPU).

Each process trains on its own rollouts; the gradient DDP averages must equal the sum over
both processes' micro-batches of pmi_kl on full logits, divided by the completion tokens of
the step on both (TRL's num_items_in_batch). float64, learning rate 0 (the parameters the
reference reads are those the step read). Prints "ok <rank>" when it holds.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from pmi_kernels import pmi_kl  # noqa: E402
from test_integrations_trl import full_logits, perturb_student, tiny_trainer  # noqa: E402


class RecordGradients(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def reference_gradients(model, micro_batches, step_tokens):
    """Sum over this process's micro-batches of pmi_kl's parameter gradients on full logits."""
    model.zero_grad(set_to_none=True)
    for micro in micro_batches:
        length = micro["completion_ids"].size(1)
        ids = torch.cat([micro["prompt_ids"], micro["completion_ids"]], 1)
        mask = torch.cat([micro["prompt_mask"], micro["completion_mask"]], 1)
        student = full_logits(model, ids, mask, length)
        with torch.no_grad(), model.disable_adapter():
            teacher = full_logits(model, micro["teacher_input_ids"], micro["teacher_attention_mask"], length)
            refonly = full_logits(model, micro["refonly_input_ids"], micro["refonly_attention_mask"], length)
        pmi_kl(
            student, teacher, refonly, mask=micro["completion_mask"], normalizer=step_tokens, jsd_beta=0.0
        ).backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def main(output_dir: Path):
    trainer = tiny_trainer(
        output_dir / f"rank{os.environ['RANK']}",
        True,
        torch.float64,
        learning_rate=0.0,
        max_grad_norm=0.0,
        max_steps=1,
        gradient_accumulation_steps=2,
    )
    perturb_student(trainer, lora=True)  # same seed on both processes; DDP broadcasts rank 0's anyway
    recorder = RecordGradients()
    trainer.add_callback(recorder)
    micro_batches, compute_loss = [], trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
        micro_batches.append(inputs)
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    assert len(micro_batches) == 2
    local_tokens = sum(micro["completion_mask"].sum() for micro in micro_batches)
    step_tokens = local_tokens.clone()
    dist.all_reduce(step_tokens)
    assert int(micro_batches[0]["num_items_in_batch"]) == int(step_tokens)
    for name, grad in reference_gradients(trainer.model, micro_batches, step_tokens).items():
        dist.all_reduce(grad)
        assert torch.allclose(recorder.grads[name], grad, rtol=1e-9, atol=1e-12 * float(grad.abs().max())), name
    print(f"ok {dist.get_rank()}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
