"""The machine a figure comes from: CPU model, torch's CPU capability (the kernels it dispatches to, which
change a seeded build's bytes from one CPU to another), threads, the GPU if any, and whether the CPU
kernels were pinned to one instruction set.

`PINNED_KERNELS` holds ATen's kernels and MKL's code path at AVX2, so that a seeded CPU build does not
depend on the CPU's wider instruction sets (the same bytes with AVX-512 on and off, measured on one CPU:
docs/reliability.md#bytes-across-machines).
torch reads these once, when its first kernel runs, so they are set before the process starts:
the Makefile exports them for `make run`, `make study` and `make pretrain`.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def kernels_pinned() -> bool:
    """Whether this process runs with `PINNED_KERNELS` (case-insensitive values, as torch and MKL read them)."""
    return all(os.environ.get(k, "").lower() == v.lower() for k, v in PINNED_KERNELS.items())


def machine() -> dict[str, str | int | bool | None]:
    """What results.json records beside a run's numbers."""
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "kernels_pinned": kernels_pinned(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def describe(record: dict | None) -> str:
    """One line for a recorded `machine()`, e.g. "AMD EPYC (AVX2, pinned, 2 threads)"."""
    if not record:
        return "not recorded"
    pinned = ", pinned" if record.get("kernels_pinned") else ""
    gpu = f", {record['gpu']}" if record.get("gpu") else ""
    return f"{record.get('cpu')} ({record.get('cpu_capability')}{pinned}, {record.get('threads')} threads{gpu})"
