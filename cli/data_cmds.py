"""`mmtok shard`, `mmtok inspect` and `mmtok demo`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List

import typer

from mmtok.cli.common import (BACKEND, JSON_OUT, MAX_ERROR_RATE, OVERWRITE, QUIET, WORKERS, check_inputs,
                              friendly_errors, report)



def register(app: typer.Typer) -> None:
    app.command(no_args_is_help=True)(shard)
    app.command(no_args_is_help=True)(inspect)
    app.command()(demo)


@friendly_errors
def shard(
    inputs: List[str] = typer.Argument(..., help="Directories (walked recursively), files, manifests "
                                       "(.jsonl/.csv/.parquet) and tar archives / WebDataset shards, in any mix."),
    out: Path = typer.Option(..., "--out", "-o", file_okay=False, help="Output shard directory."),
    max_count: int = typer.Option(10_000, "--max-count", min=1, help="Samples per shard at most."),
    max_size: str = typer.Option("1G", "--max-size", help="Bytes per shard at most (K/M/G suffixes)."),
    validate: bool = typer.Option(True, "--validate/--no-validate",
                                  help="Fully decode every image and audio file and probe every video. "
                                  "--no-validate copies bytes after sniffing their type."),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup", help="Drop exact duplicates (same content hash)."),
    max_pixels: int = typer.Option(89_478_485, "--max-pixels", min=1, help="Images with more pixels are quarantined "
                                   "without being decoded (decompression bombs)."),
    max_member_bytes: str = typer.Option("4G", "--max-member-bytes",
                                         help="Largest input file, archive member or file a manifest row names "
                                         "(K/M/G suffixes); a bigger one is quarantined without being read."),
    workers: int = WORKERS,
    backend: str = BACKEND,
    max_error_rate: float = MAX_ERROR_RATE,
    overwrite: bool = OVERWRITE,
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
) -> None:
    """Validate raw corpora and write WebDataset shards with a manifest and a quarantine log.

    Rerun the same command after a crash or Ctrl-C: finished shards are kept and the job
    picks up where it stopped. Exit status: 0 ok, 2 bad usage, 3 too many bad inputs.

    Example: mmtok shard images/ captions.jsonl old-shards/ --out shards/ --workers 8
    """
    from mmtok.ingest import MAX_MEMBER_BYTES, ShardFn, shard_items
    from mmtok.runner import run_stage

    check_inputs(inputs, out)
    member_limit = _parse_size(max_member_bytes, "--max-member-bytes")
    config = {"inputs": list(inputs), "max_count": max_count, "max_size": _parse_size(max_size),
              "validate": validate, "dedup": dedup, "max_pixels": max_pixels}
    if member_limit != MAX_MEMBER_BYTES:  # left out at its default, so earlier runs' output dirs still resume
        config["max_member_bytes"] = member_limit
    summary = run_stage(
        "shard", shard_items(list(inputs), member_limit), ShardFn(validate, max_pixels, member_limit), out,
        config=config, workers=workers,
        max_count=max_count, max_size=_parse_size(max_size), max_error_rate=max_error_rate, dedup=dedup,
        progress=not quiet and not as_json, overwrite=overwrite, task_size=8, backend=backend,
        threads=True)  # reading, hashing and decoding release the GIL: no bytes through pipes
    report(summary, as_json)


def _parse_size(text: str, option: str = "--max-size") -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    try:
        size = int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, OverflowError):  # not a number, or inf
        size = 0
    if size < 1:
        raise ValueError(f"{option} {text!r}: expected a positive byte count such as 500M or 2G")
    return size


@friendly_errors
def inspect(
    directory: Path = typer.Argument(..., file_okay=False, help="A shard directory written by any mmtok stage, a balance-mix plan, or a training run."),
    samples: int = typer.Option(3, "--samples", min=0, help="How many sample keys to show per group."),
    as_json: bool = JSON_OUT,
) -> None:
    """Show what a shard directory holds: counts, shards, bytes, quarantine reasons, sample keys.
    On a balance-mix plan: its sources, shape and balance report. On a training run (`mmtok
    train --out`, upcycle, uni-moe): the model, its progress, the newest checkpoint and the
    last metrics."""
    import collections

    from mmtok.shards import MANIFEST, QUARANTINE, ShardReader, read_jsonl, require_keys

    if (directory / "config.json").exists() and (directory / "checkpoints").is_dir():
        _inspect_run(directory, as_json)
        return
    if (directory / "plan.json").exists():
        _inspect_plan(directory, as_json)
        return

    reader = ShardReader(directory)
    m = reader.manifest
    require_keys(m["totals"], ("by_group", "by_modality", "duplicates", "quarantined"), f"{directory / MANIFEST} (totals)")
    reasons = collections.Counter()
    qpath = Path(directory) / QUARANTINE
    if qpath.exists():
        for rec in read_jsonl(qpath):
            r = str(rec.get("reason", "(no reason recorded)"))
            reasons[r.split(": ", 1)[-1].split(" (")[0][:80]] += 1
    keys: dict[str, list[str]] = {}
    for row in reader.index().select(["key", "group"]).to_pylist():
        if len(keys.setdefault(row["group"], [])) < samples:
            keys[row["group"]].append(row["key"])
    info = {"directory": str(directory), "stage": m["stage"], **m["totals"],
            "quarantine_reasons": dict(reasons.most_common(10)), "sample_keys": keys}
    if as_json:
        sys.stdout.write(json.dumps(info, indent=1, sort_keys=True) + "\n")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{directory} ({m['stage']})")
    for col in ("group", "samples", "shards", "bytes", "sample keys"):
        t.add_column(col)
    for g, n in m["totals"]["by_group"].items():
        shards = [s for s in m["shards"] if s["group"] == g]
        t.add_row(g, str(n), str(len(shards)), f"{sum(s['bytes'] for s in shards):,}", ", ".join(keys.get(g, [])))
    c = Console()
    c.print(t)
    c.print(f"by modality: {m['totals']['by_modality']}; duplicates dropped: {m['totals']['duplicates']}; "
            f"quarantined: {m['totals']['quarantined']}")
    for r, n in reasons.most_common(10):
        c.print(f"  {n} x {r}")


def _inspect_plan(directory: Path, as_json: bool) -> None:
    """A `balance-mix` plan: its sources, shape and balance report (plan.json alone)."""
    from mmtok.loader import read_plan_meta

    meta = read_plan_meta(directory)
    info = {"directory": str(directory), **{k: meta[k] for k in ("ratio", "world_size", "seq_len", "micro_batch", "steps",
                                                                 "microbatches", "seed")},
            "sources": {s["name"]: {"documents": s["documents"], "weight": s["weight"]} for s in meta["sources"]},
            "report": meta["report"]}
    if as_json:
        sys.stdout.write(json.dumps(info, indent=1, sort_keys=True) + "\n")
        return
    _key_value_table(f"{directory} (balance-mix plan)", {k: v for k, v in info.items() if k != "directory"})


def _key_value_table(title: str, rows: dict) -> None:
    """One row per field; a dict field on one line as `key value, ...`."""
    from rich.console import Console
    from rich.table import Table

    def show(v):
        if isinstance(v, dict):
            return ", ".join(f"{a} {show(b)}" for a, b in v.items())
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    t = Table(title=title, show_header=False)
    for k, v in rows.items():
        if v not in (None, {}):
            t.add_row(k, show(v))
    Console().print(t)


def _inspect_run(directory: Path, as_json: bool) -> None:
    """A training run, from its JSON files alone (no torch): what it is and how far it got."""
    from mmtok.shards import ShardError, read_json, read_jsonl, require_keys

    cfg = read_json(directory / "config.json")
    require_keys(cfg, ("model", "train"), directory / "config.json")
    require_keys(cfg["train"], ("steps",), f"{directory / 'config.json'} (train)")
    latest = directory / "checkpoints" / "latest"
    name = latest.read_text().strip() if latest.exists() else None
    if name is not None and not re.fullmatch(r"step-\d{8,}", name):  # as trainer.train.latest_checkpoint, without torch
        raise ShardError(f"{latest} names {name!r}, not a checkpoint of this run (step-NNNNNNNN); the run was altered")
    ckpt = directory / "checkpoints" / name if name else None
    state = read_json(ckpt / "train_state.json") if ckpt and (ckpt / "train_state.json").exists() else {}
    metrics = directory / "metrics.jsonl"
    records = read_jsonl(metrics) if metrics.exists() else []
    last = records[-1] if records else {}
    model = cfg["model"]
    info = {"directory": str(directory), "model": model.get("model", "uni-moe"), "experts": model.get("experts"),
            "stage": cfg.get("stage"), "n_layers": model.get("n_layers"), "d_model": model.get("d_model"),
            "step": state.get("step"), "steps": cfg["train"]["steps"], "checkpoint": str(ckpt) if ckpt else None,
            "world_size": state.get("world_size"), "global_batch": state.get("global_batch"),
            "last_metrics": {k: v for k, v in sorted(last.items()) if isinstance(v, (int, float))}}
    for name in ("aux_routers", "upcycled_from", "stage"):  # what the aux stage, upcycle and uni-moe add
        p = directory / f"{name}.json"
        if p.exists():
            info[name] = {k: v for k, v in read_json(p).items() if k != "curve"}
    if as_json:
        sys.stdout.write(json.dumps(info, indent=1, sort_keys=True) + "\n")
        return
    _key_value_table(f"{directory} (training run)", {k: v for k, v in info.items() if k != "directory"})


@friendly_errors
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", file_okay=False, help="Where the corpus and every stage's output go."),
    workers: int = typer.Option(2, "--workers", "-w", min=1),
) -> None:
    """Run the whole pipeline end to end on a small corpus that mmtok generates itself."""
    from mmtok.demo import run_demo

    run_demo(out, workers)

