"""tsparse: sparse brain upgrades (PEER, Engram, mHC) for LLaMA-family models."""
