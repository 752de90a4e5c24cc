"""model_path as from_pretrained takes it: a local directory, or a Hugging Face Hub id resolved
through the Hugging Face cache (HF_HOME, HF_HUB_CACHE), downloaded when missing unless
HF_HUB_OFFLINE=1. The check reads the model's config.json only, so a missing id, a typo or a
gated model is a one-line error before the data or the weights load."""

from __future__ import annotations

import os
from typing import Optional


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_model_path(model_path: str) -> None:
    """A local directory, or a hub id whose config.json is in the cache or (online) on the Hub."""
    if os.path.isdir(model_path):
        return
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .checkpoint import error_line

    try:
        validate_repo_id(model_path)
    except HFValidationError:
        raise ValueError(
            f"config: model_path {model_path!r} is neither a local directory nor a Hugging Face "
            "Hub id (organization/name)"
        ) from None
    try:
        hf_hub_download(model_path, "config.json")
    except Exception as err:  # noqa: BLE001 (not found, gated, offline, no network: each its own class)
        where = (
            "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
            if offline()
            else f"the Hub did not give its config.json: {error_line(err)}"
        )
        raise ValueError(
            f"config: model_path {model_path!r} is not a local directory, and as a Hugging Face "
            f"Hub id it cannot be loaded ({where})"
        ) from None


def cached_config_json(model_path: str) -> Optional[str]:
    """model_path's config.json on this machine (its directory's, or the cache's for a hub id),
    without a download; None when there is none."""
    path = os.path.join(model_path, "config.json")
    if os.path.isfile(path) or os.path.isdir(model_path):
        return path if os.path.isfile(path) else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model_path, "config.json")
    except Exception:  # noqa: BLE001 (not a valid hub id: it has no cached files)
        return None
    return cached if isinstance(cached, str) else None
