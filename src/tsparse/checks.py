"""Value checks shared by the specs, the config and the CLIs: each failure is one ConfigError line
that names the key and what is allowed."""
from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
    """A bad config key or value; the message is one line naming the key and the allowed values."""


def is_int(value: Any) -> bool:
    """An int that is not a bool (YAML true is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {allowed}")


def check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")


def check_min(key: str, value: Any, minimum: int) -> None:
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")


def check_positive(key: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{key}={value!r} must be a {'non-negative' if allow_zero else 'positive'} number")


def check_count(key: str, value: Any, unit: str) -> None:
    """A positive integer count of `unit` (tokens, sequences, steps)."""
    if not is_int(value) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive number of {unit} (an integer >= 1)")


def check_layers(key: str, layers: Iterable[Any]) -> None:
    """Distinct non-negative layer indices (the model config checks the upper bound)."""
    layers = list(layers)
    if any(not is_int(i) or i < 0 for i in layers) or len(set(layers)) != len(layers):
        raise ConfigError(f"{key}={layers} must be distinct non-negative layer indices")
