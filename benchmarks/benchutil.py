"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path


def best_of(fn, repeat: int) -> float:
    """Fastest of `repeat` runs of fn(): the least disturbed by other load on the machine."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def machine(device=None) -> str:
    """What the figures were measured on, for the results file."""
    text = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if device is not None:
        import torch

        text += f", torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
        if getattr(device, "type", str(device)) == "cuda":
            text += f" ({torch.cuda.get_device_name(device)})"
    return text


def save(out: str | Path, result: dict, lines: list[str]) -> None:
    """Write OUT.json (the figures) and OUT.md (the table), and print the table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**result, "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
