"""pmi_kernels inside other trainers.

    pmi_kernels.integrations.trl   PurifiedOPSDTrainer: TRL's SDFT trainer with the
                                   reference-only context and fused_pmi_kl (pip install
                                   "pmi-kernels[trl]")
    pmi_kernels.integrations.verl  the PMI loss inside verl's FSDP2 actor worker, on its
                                   rollout batch (pip install "pmi-kernels[verl]"; docs/verl.md)
    pmi_kernels.integrations.models  the decoder and lm_head both read of a causal LM

Each integration is imported on its own, so that this package needs none of them installed.
"""
