"""A thin OPSD-PMI training loop around fused_pmi_kl (see loop.py), and its CLI."""

from .config import TrainConfig, parse_config

__all__ = ["TrainConfig", "parse_config", "Trainer"]


def __getattr__(name):
    # The loop imports transformers; load it only when asked for.
    if name == "Trainer":
        from .loop import Trainer

        return Trainer
    raise AttributeError(name)
