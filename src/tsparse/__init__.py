"""tsparse: sparse brain upgrades (PEER, Engram, mHC) for LLaMA-family models.

Importing tsparse registers `TsparseConfig` / `TsparseForCausalLM` with transformers' Auto classes,
so `AutoModelForCausalLM.from_pretrained(DIR)` loads an exported tsparse model.
"""
from tsparse.configuration_tsparse import TsparseConfig
from tsparse.modeling_tsparse import TsparseForCausalLM

__all__ = ["TsparseConfig", "TsparseForCausalLM"]
