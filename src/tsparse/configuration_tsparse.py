"""`TsparseConfig`: a `LlamaConfig` plus one spec per attached module kind.

Each attached kind's spec is a top-level dict named after the kind (e.g. `"peer": {...}`), so that
config.json stays plain JSON; `module_data[kind]` holds what a kind derives when the model is first
built (e.g. Engram's hash multipliers and compressed-token map). Both are read through the registry.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from transformers import AutoConfig, LlamaConfig

from tsparse.checks import ConfigError
from tsparse.registry import KINDS, check_specs


class TsparseConfig(LlamaConfig):
    """A LlamaConfig plus the sparse modules: for each kind in `registry.KINDS`, an attribute of that name
    holding its spec dict (or None), and `module_data` (kind -> derived data)."""

    model_type = "tsparse_llama"

    module_data: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name in KINDS:
            if not hasattr(self, name):
                setattr(self, name, None)
        self.module_data = dict(self.module_data or {})
        specs = self.module_specs()  # validates every spec
        check_specs(specs, self.num_hidden_layers)
        missing = [name for name in specs if KINDS[name].prepare is not None and name not in self.module_data]
        if missing:
            raise ConfigError(f"config lacks module_data for {missing} (build it with TsparseConfig.from_base; a "
                              "config.json without it was saved by an older tsparse: export the run again)")

    def module_specs(self) -> dict[str, Any]:
        """The typed spec of every attached kind, e.g. {"peer": PEERSpec(...)}."""
        return {name: kind.spec(**getattr(self, name)) for name, kind in KINDS.items() if getattr(self, name)}

    @property
    def num_streams(self) -> int:
        """Residual streams of the model (1 unless a kind such as mHC carries several)."""
        return max([KINDS[name].streams(spec) for name, spec in self.module_specs().items()], default=1)

    @classmethod
    def from_base(cls, base: LlamaConfig, specs: dict[str, Any], hash_seed: int = 0, tokenizer=None) -> "TsparseConfig":
        """The base's architecture with the given module specs attached; each kind's `prepare` derives its
        module_data from the base, the tokenizer and `hash_seed`."""
        fields = {k: v for k, v in base.to_dict().items() if k not in ("model_type", "architectures", "module_data", *KINDS)}
        data = {name: KINDS[name].prepare(spec, base, tokenizer, hash_seed) for name, spec in specs.items()
                if KINDS[name].prepare is not None}
        return cls(**fields, **{k: dataclasses.asdict(s) for k, s in specs.items()}, module_data=data)


AutoConfig.register(TsparseConfig.model_type, TsparseConfig)
