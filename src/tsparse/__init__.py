"""tsparse: sparse brain upgrades (PEER, Engram, mHC) for LLaMA-family models.

Importing tsparse registers `TsparseConfig` / `TsparseForCausalLM` with transformers' Auto classes,
so `AutoModelForCausalLM.from_pretrained(DIR)` loads an exported tsparse model.
"""
from tsparse.modeling import TsparseConfig, TsparseForCausalLM

__all__ = ["TsparseConfig", "TsparseForCausalLM"]
