"""Value checks shared by the specs, the config and the CLIs: each failure is one ConfigError line
that names the key and what is allowed."""
from __future__ import annotations

import json
from pathlib import Path
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


def check_placement(specs: dict, num_layers: int) -> None:
    """Every spec's `layers` lie inside a model of `num_layers` decoder layers."""
    for kind, spec in specs.items():
        bad = [i for i in spec.layers if i >= num_layers]
        if bad:
            raise ConfigError(f"{kind}.layers={spec.layers}: {bad} outside this model's layers [0, {num_layers - 1}]")


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or one ConfigError line."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value
