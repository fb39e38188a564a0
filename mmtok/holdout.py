"""What a plan holds out, and what it trains on.

With a held-out fraction, `balance-mix` leaves a document out of the plan when a hash of
its key falls below the fraction (`held_out`): the split depends on nothing else (not the
order, not the other documents), so adding documents never moves one. The held-out
documents are copied unchanged into token shard directories under PLAN/holdout/
(`write_holdout`), which `mmtok eval --data` reads; `plan_overlap` is eval's check that
the data it scores is not what the plan trained on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mmtok.fs import absolute, as_location, join_location, read_parquet
from mmtok.loader import TokenCorpus
from mmtok.plan import HOLDOUT_DIR, read_plan
from mmtok.shards import INDEX


def document_keys(dirs: list[Path]) -> np.ndarray:
    """The sample keys of token shard directories' documents, in TokenCorpus order."""
    return np.concatenate([np.asarray(read_parquet(as_location(d) / INDEX, columns=["key"]).column("key").to_pylist(),
                                      dtype=object) for d in dirs])


def held_out(keys, fraction: float) -> np.ndarray:
    """Which documents a held-out `fraction` takes: those whose key hashes below it."""
    h = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:8], "big") for k in keys]
    return np.array(h, dtype=np.float64) / 2.0**64 < fraction


def _source_names(dirs: list[Path]) -> list[str]:
    """A folder name per source under OUT/holdout/: its own name, numbered where two share one."""
    names = [d.name or "tokens" for d in dirs]
    return [n if names.count(n) == 1 else f"{n}-{i}" for i, n in enumerate(names)]


def holdout_parts(corpus: TokenCorpus, dirs: list, held: np.ndarray, holdout: float, meta: dict) -> list:
    """The held-out documents per source, to write under PLAN/holdout/ (recorded in `meta`)."""
    parts = []
    if holdout:
        names = _source_names(corpus.dirs)
        meta["holdout"] = {"fraction": holdout, "sources": []}
        for s, d in enumerate(corpus.dirs):
            local = np.flatnonzero(held[corpus.source == s])
            meta["holdout"]["sources"].append({"name": str(dirs[s]), "documents": int(len(local)),
                                               "path": f"{HOLDOUT_DIR}/{names[s]}" if len(local) else None})
            if len(local):
                parts.append((d, names[s], local))
    return parts


def write_holdout(src: Path, docs: np.ndarray, out: Path, fraction: float) -> None:
    """Documents `docs` of the token shard directory `src`, copied unchanged (key, token ids,
    metadata, index columns) into a token shard directory `out`."""
    from mmtok.runner import Item, Sample, run_stage
    from mmtok.shards import ShardReader

    reader = ShardReader(src)
    rows = reader.index().take(np.asarray(docs)).to_pylist()

    def copy(row: dict) -> Sample:
        members = {m["ext"]: reader.read_member(row["shard"], m["offset"], m["size"]) for m in row["members"]}
        extra = {k: v for k, v in row.items() if k not in ("key", "shard", "members")}
        return Sample(row["key"], "tokens", {"npy": members["npy"]}, json.loads(members["json"]), extra)

    config = {**reader.manifest.get("config", {}), "inputs": [absolute(src)],
              "holdout": {"fraction": fraction, "of": absolute(src)}}
    # the plan is written again in place each time, and its held-out part with it
    run_stage("tokenize", [Item(f"{src}:{r['key']}", r) for r in rows], copy, out, config=config, progress=False,
              overwrite=True)


def plan_overlap(plan_dir: str | Path, corpus: TokenCorpus, n_docs: int) -> int:
    """How many of `corpus`'s first `n_docs` documents the plan in `plan_dir` trains on: same
    key and counts as a planned document, confirmed by equal token ids (keys alone repeat
    across separately made corpora)."""
    plan, arrays = read_plan(plan_dir)
    trained = TokenCorpus([join_location(plan_dir, s["path"]) for s in plan["sources"]])
    if trained.manifest_sha256 != [s["manifest_sha256"] for s in plan["sources"]]:
        raise ValueError("its sources changed since it was made")
    used = np.unique(np.asarray(arrays["piece_doc"]))
    used = used[used < len(trained.n_tokens)]
    by_id = {(k, int(n), int(i)): int(d) for k, n, i, d in zip(document_keys(trained.dirs)[used], trained.n_tokens[used],
                                                                trained.n_image[used], used)}
    keys = document_keys(corpus.dirs)
    hits = 0
    for d in range(n_docs):
        t = by_id.get((keys[d], int(corpus.n_tokens[d]), int(corpus.n_image[d])))
        hits += t is not None and np.array_equal(corpus.read(d), trained.read(t))
    return hits
