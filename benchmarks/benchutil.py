"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import json
import os
import platform
import shutil
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


def save(out: str | Path, result: dict, lines: list[str] | None = None) -> None:
    """Write OUT.json (the figures) and, given a table, OUT.md; print the table (or the figures)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figures = json.dumps({**result, "date": time.strftime("%Y-%m-%d")}, indent=1)
    out.with_suffix(".json").write_text(figures + "\n")
    if lines is None:
        print(figures)
        return
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def load_average() -> float:
    """The one-minute load average: recorded before and after a CPU benchmark, so a reader
    can tell whether other work on the machine shared its cores."""
    return round(os.getloadavg()[0], 2)


def without_pandas(work: Path) -> dict:
    """The environment of a subprocess that cannot import pandas, as after `pip install mmtok`
    (pandas comes only with the test extras: datasets, lm-eval). pyarrow imports pandas, where
    it is installed, the first time it converts Python objects (0.3 s on a 2-core machine);
    mmtok's data commands avoid that (mmtok/indexfile.py), and this shows they do."""
    shadow = work / "no-pandas"
    (shadow / "pandas").mkdir(parents=True, exist_ok=True)
    (shadow / "pandas" / "__init__.py").write_text('raise ImportError("pandas hidden by the benchmark")\n')
    return {**os.environ, "PYTHONPATH": str(shadow)}


def finish_cpu_run(out: str | Path, result: dict, load_before: float, work: Path) -> None:
    """Record the machine and the load around the run, save the figures, remove the scratch tree."""
    result["machine"] = machine()
    result["load_average_before_after"] = [load_before, load_average()]
    save(out, result)
    shutil.rmtree(work)


def device_waits():
    """A context that counts the operations which make the host wait for a GPU: reading a
    value back (`.item()`, `int(t)`) and ops whose output size depends on the data
    (nonzero, boolean-mask indexing, bincount, unique, ...). It counts on the CPU too, so
    the GPU cost of a code path can be checked without a GPU. (`.tolist()` on a CPU tensor
    dispatches nothing and is not seen: on a GPU it follows one of the ops counted.)"""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    data_dependent = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique", "_unique2",
                      "unique_dim", "unique_consecutive", "repeat_interleave"}

    class Waits(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[1]
            if name in data_dependent:
                self.count[name] += 1
            elif name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1]):
                self.count["index(bool mask)"] += 1
            return func(*args, **(kwargs or {}))

        @property
        def total(self) -> int:
            return sum(self.count.values())

    return Waits()


def t_interval(values) -> tuple[float, float, float]:
    """Mean, sample std and the half-width of the 95% t-interval of the mean (0 for one value)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), 0.0, 0.0
    sd = float(x.std(ddof=1))
    return float(x.mean()), sd, float(stats.t.ppf(0.975, len(x) - 1) * sd / np.sqrt(len(x)))
