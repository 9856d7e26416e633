"""The machine's measured fp32 matmul peak, the denominator of model FLOPs utilisation (MFU).

Measured once per (device, thread count) and cached, as nanoGPT compares against a known peak;
here the peak is measured because CPUs differ too much for a table.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from forgeml.workspace import atomic_write_json


def cache_file() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "forgeml" / "matmul_peak.json"


def matmul_peak_flops(
    device: torch.device | str = "cpu", size: int = 2048, repeats: int = 10, refresh: bool = False
) -> float:
    """Best fp32 matmul FLOP/s seen on `device` (cached after the first measurement).

    `refresh` measures again and keeps the higher figure: a first measurement taken while other work
    shared the cores is too low, which shows as a utilisation above 100 %.
    """
    device = torch.device(device)
    key = f"{device.type}|{platform.machine()}|{platform.processor() or 'cpu'}|threads={torch.get_num_threads()}"
    path = cache_file()
    cached = {}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            cached = {}
    if key in cached and not refresh:
        return float(cached[key])
    # A private generator: drawing from the global one would make a run's result depend on whether the
    # peak was already cached when it started.
    generator = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, generator=generator)
    b = torch.randn(size, size, device=device, generator=generator)
    torch.matmul(a, b)  # warm-up: first calls pay for allocation and thread start-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    peak = max(2.0 * size**3 / best, float(cached.get(key, 0.0)))
    cached[key] = peak
    with contextlib.suppress(OSError):  # a read-only home is no reason to fail a run
        atomic_write_json(path, cached)
    return peak
