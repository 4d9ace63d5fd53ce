"""Reading checkpoints with a clear error for corrupt or truncated files."""
from __future__ import annotations

from pathlib import Path

import torch

from tsparse.config import ConfigError


def load_checkpoint(path: str | Path) -> dict:
    """`torch.load` a Lightning checkpoint on CPU; a corrupt or truncated file is a one-line ConfigError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path} does not exist") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError... on damaged files
        raise ConfigError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err})") from None
