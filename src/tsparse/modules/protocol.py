"""The module protocol: what every nn.Module a kind builds implements, with defaults where a kind has nothing."""
from __future__ import annotations

import abc

from torch import Tensor, nn

# `<kind>.init` of the kinds that offer it: `identity` (the protocol's, below) or `default`, PyTorch's own init
# of each layer (the seed's first attempt, which it reports broke the base; the init ablation).
INITS = ("identity", "default")


class SparseModule(nn.Module, abc.ABC):
    """Base class of every module of a kind (`registry.ModuleKind.modules`); the kind contract test
    (tests/test_kinds.py) checks each method for every registered kind.

    Required:
    - `reset_parameters()`: the identity init, so that the model's output equals the base's at step 0
      (output projections, gates or conv weights at zero); also called for a fresh module when a plain
      base is loaded into the model.
    - `saved_bytes(block, grad_input)`: (bytes per token, bytes per step) of the tensors autograd saves for
      this module in a training forward of `block`-token sequences; `grad_input`: whether a gradient flows
      into its input. `tsparse.plan` sums them; the contract test compares them with autograd's count.

    Defaults, for a kind that has nothing of the sort:
    - `rows_per_token()`: (rows of its row-sparse tables one token looks up, whether their gradient is
      coalesced); (0, True): no tables.
    - `table_parameters()`: its tables (all of one row count); none. `shards` is None, or the
      `sharding.RowShards` of those tables under `tables=sharded`, which the forward then looks rows up with.
    - `reset_buffers()`: refill derived buffers after the weights were loaded; none.
    - `stats`: what the last forward recorded while `track_stats` was set, named as in the kind's
      `ModuleKind.stats` (the ModuleStats callback logs them); `usage_summary()` / `reset_usage()`:
      statistics accumulated over a window (PEER's expert usage); none.
    """

    track_stats: bool = False
    shards = None

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, Tensor] = {}

    @abc.abstractmethod
    def reset_parameters(self) -> None:
        """Initialise the module as an identity (see the class docstring)."""

    @abc.abstractmethod
    def saved_bytes(self, block: int, grad_input: bool) -> tuple[int, int]:
        """(bytes per token, bytes per step) autograd saves for this module in a training forward."""

    def rows_per_token(self) -> tuple[int, bool]:
        return 0, True

    def table_parameters(self) -> list[nn.Parameter]:
        return []

    def reset_buffers(self) -> None:
        pass

    def usage_summary(self) -> dict[str, float]:
        return {}

    def reset_usage(self) -> None:
        pass
