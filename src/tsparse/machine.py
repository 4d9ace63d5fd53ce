"""The machine a figure comes from: CPU model, torch's CPU capability (the kernels it dispatches to, which
change a seeded build's bytes from one CPU to another), threads, and the GPU if any."""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, str | int | None]:
    """What results.json records beside a run's numbers."""
    return {"cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def describe(record: dict | None) -> str:
    """One line for a recorded `machine()`, e.g. "AMD EPYC (AVX512, 2 threads)"."""
    if not record:
        return "not recorded"
    gpu = f", {record['gpu']}" if record.get("gpu") else ""
    return f"{record.get('cpu')} ({record.get('cpu_capability')}, {record.get('threads')} threads{gpu})"
