"""Sparse modules: PEER, Engram, mHC, each with the typed spec (dataclass) that configures it. Beside them:
`protocol` (the base class every module implements), `tables` (the table dtypes), `stats` (`rms_ratio`) and
`perturb` (`perturb_`, weight noise for benchmarks and tests)."""
