"""mmtok: data, tokenization and training stack for early-fusion multimodal MoE models.

The library API, as the README's "Use mmtok from Python" shows it:

- `mmtok.ShardReader(dir)`: the samples of a shard directory (any stage's output);
- `mmtok.Tokenizer.load(tok_dir)`: the unified tokenizer (BPE text ids, VQ image codes; a URL
  is read from a copy in the cache);
- `mmtok.PlanLoader(plan_dir, rank, world_size)`: the micro-batches of a `balance-mix` plan;
- `mmtok.load_run(run_dir)`: a run's newest checkpoint as (model, config, step), on CPU;
- `mmtok.shard`, `mmtok.train_bpe`, `mmtok.tokenize_images`, `mmtok.extract_keyframes`, `mmtok.extract_audio`:
  the data stages as the commands of the same names run them (`mmtok tokenize` is
  `mmtok.tokenize.tokenize`: the module holds the name);
- `mmtok.balance_mix(token_dirs, plan_dir, ...)`: `mmtok balance-mix`, returning the plan;
- `mmtok.train(mmtok.TrainOptions(out=run_dir, plan=plan_dir, ...))`: `mmtok train`.

Each is imported on first use, so `import mmtok` stays fast and never imports torch.
"""

from __future__ import annotations

import importlib

_API = {
    "ShardReader": ("mmtok.shards", "ShardReader"),
    "Tokenizer": ("mmtok.tokenizer", "Tokenizer"),
    "PlanLoader": ("mmtok.loader", "PlanLoader"),
    "load_run": ("mmtok.trainer.checkpoint", "load_run"),
    "shard": ("mmtok.ingest", "shard"),
    "train_bpe": ("mmtok.bpe", "train_bpe"),
    "tokenize_images": ("mmtok.tokenize", "tokenize_images"),
    "extract_keyframes": ("mmtok.video", "extract_keyframes"),
    "extract_audio": ("mmtok.audio", "extract_audio"),
    "balance_mix": ("mmtok.mix", "balance_mix"),
    "TrainOptions": ("mmtok.trainer.launch", "TrainOptions"),
    "train": ("mmtok.trainer.launch", "train"),
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
