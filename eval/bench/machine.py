"""One line naming the machine a benchmark ran on, printed with every benchmark's figures."""
from __future__ import annotations

import os
import platform

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (``platform.processor()`` is often just "x86_64" on Linux)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            name = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def describe() -> str:
    """CPU model, usable / total cores, torch threads, GPU name and the torch version, in one line."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return (f"CPU: {cpu_name()} ({usable} of {os.cpu_count()} cores usable, {torch.get_num_threads()} torch "
            f"threads); GPU: {gpu}; torch {torch.__version__}")
