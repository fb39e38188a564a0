"""mmtok: data, tokenization and training stack for early-fusion multimodal MoE models.

The library API, as the README's "Use mmtok from Python" shows it:

- `mmtok.ShardReader(dir)`: the samples of a shard directory (any stage's output);
- `mmtok.Tokenizer.load(tok_dir)`: the unified tokenizer (BPE text ids, VQ image codes);
- `mmtok.PlanLoader(plan_dir, rank, world_size)`: the micro-batches of a `balance-mix` plan;
- `mmtok.load_run(run_dir)`: a run's newest checkpoint as (model, config, step), on CPU.

Each is imported on first use, so `import mmtok` stays fast and never imports torch.
"""

from __future__ import annotations

import importlib

_API = {
    "ShardReader": ("mmtok.shards", "ShardReader"),
    "Tokenizer": ("mmtok.tokenize", "Tokenizer"),
    "PlanLoader": ("mmtok.loader", "PlanLoader"),
    "load_run": ("mmtok.trainer.export", "load_from_run"),
}
__all__ = list(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'mmtok' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
