"""Sparse modules: PEER, Engram, mHC."""
