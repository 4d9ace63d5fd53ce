"""Lightning callbacks of tsparse (importable as `tsparse.callbacks`)."""
from tsparse.callbacks.module_stats import ModuleStats
from tsparse.callbacks.preemption import Preemption
from tsparse.callbacks.phase_lr import Phase, PhaseLRCallback, check_phase_lrs, check_schedule_fits, parse_phases
from tsparse.callbacks.throughput import TokenThroughput

__all__ = ["ModuleStats", "Phase", "Preemption", "PhaseLRCallback", "check_phase_lrs", "check_schedule_fits", "TokenThroughput", "parse_phases"]
