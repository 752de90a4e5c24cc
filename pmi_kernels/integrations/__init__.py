"""pmi_kernels inside other trainers.

    pmi_kernels.integrations.trl   PurifiedOPSDTrainer: TRL's SDFT trainer with the
                                   reference-only context and fused_pmi_kl (pip install
                                   "pmi-kernels[trl]")

Each integration is imported on its own, so that this package needs none of them installed.
"""
