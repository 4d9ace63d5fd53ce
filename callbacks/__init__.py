"""Lightning callbacks of tsparse (importable as `tsparse.callbacks`)."""
from tsparse.callbacks.phase_lr import Phase, PhaseLRCallback, parse_phases
from tsparse.callbacks.throughput import TokenThroughput

__all__ = ["Phase", "PhaseLRCallback", "TokenThroughput", "parse_phases"]
