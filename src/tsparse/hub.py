"""Fail fast when the Hugging Face hub cannot be reached (instead of ~25 s of retries)."""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True if HF_HUB_OFFLINE is unset and a TCP connection to the hub endpoint succeeds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


class HubUnreachableError(RuntimeError):
    """The hub is needed but cannot be reached; the message names the offline alternative."""


def require_hub(what: str, offline_option: str) -> None:
    if not hub_reachable():
        raise HubUnreachableError(f"{what} needs the Hugging Face hub, which is unreachable: use {offline_option}")
