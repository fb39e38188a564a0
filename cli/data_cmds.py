"""`mmtok shard`, `mmtok inspect` and `mmtok demo`."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mmtok.cli.common import (BACKEND, JSON_OUT, MAX_ERROR_RATE, OVERWRITE, QUIET, WORKERS, check_inputs,
                              friendly_errors, not_a_file, report)



def register(app: typer.Typer) -> None:
    app.command(no_args_is_help=True)(shard)
    app.command(no_args_is_help=True)(inspect)
    app.command()(demo)


@friendly_errors
def shard(
    inputs: List[str] = typer.Argument(..., help="Directories (walked recursively), files, manifests "
                                       "(.jsonl/.csv/.parquet) and tar archives / WebDataset shards, in any mix."),
    out: str = typer.Option(..., "--out", "-o", help="Output shard directory, or a URL such as s3://bucket/shards "
                            "(written through a local staging directory: docs/REMOTE.md)."),
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
    image_col: Optional[str] = typer.Option(None, "--image-col", help="Manifest column holding the image path "
                                            "(or bytes, in Parquet). Default: image, else jpg/png/webp."),
    text_col: Optional[str] = typer.Option(None, "--text-col", help="Manifest column holding the text or caption. "
                                           "Default: text, else caption, else transcript."),
    audio_col: Optional[str] = typer.Option(None, "--audio-col", help="Manifest column holding the audio path. Default: audio."),
    video_col: Optional[str] = typer.Option(None, "--video-col", help="Manifest column holding the video path. Default: video."),
    key_col: Optional[str] = typer.Option(None, "--key-col", help="Manifest column that names a row in `source` and "
                                          "quarantine records (default: its row number)."),
    workers: int = WORKERS,
    backend: str = BACKEND,
    max_error_rate: float = MAX_ERROR_RATE,
    overwrite: bool = OVERWRITE,
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
) -> None:
    """Validate raw corpora and write WebDataset shards with a manifest and a quarantine log.

    Manifests: --image-col/--text-col/... map their columns (LAION: --image-col url, but a
    URL is quarantined: fetch it with img2dataset first, then shard img2dataset's output
    folder as it is).

    Rerun the same command after a crash or Ctrl-C: finished shards are kept and the job
    picks up where it stopped. Exit status: 0 ok, 2 bad usage, 3 too many bad inputs, 130
    interrupted (Ctrl-C or SIGTERM).

    Example: mmtok shard images/ captions.jsonl old-shards/ --out shards/ --workers 8
    """
    from mmtok.ingest import Columns, shard as run

    check_inputs(inputs, out)
    columns = Columns(image=image_col, audio=audio_col, video=video_col, text=text_col, key=key_col)
    summary = run(list(inputs), out, max_count=max_count, max_size=_parse_size(max_size), validate=validate,
                  dedup=dedup, max_pixels=max_pixels, max_member_bytes=_parse_size(max_member_bytes, "--max-member-bytes"),
                  columns=columns, workers=workers, backend=backend, max_error_rate=max_error_rate,
                  overwrite=overwrite, progress=not quiet and not as_json)
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
    directory: str = typer.Argument(..., help="Any directory mmtok writes: shards, frames, audio features, codes or "
                                    "tokens (any stage's --out), a tokenizer, a balance-mix plan, a training run or "
                                    "an export; a path or a URL (s3://, gs://, ...)."),
    samples: int = typer.Option(3, "--samples", min=0, help="How many sample keys to show per group."),
    as_json: bool = JSON_OUT,
) -> None:
    """Show what an mmtok directory is and holds. A stage's output (shards, frames, audio
    features, codes, tokens): counts, shards, bytes, quarantine reasons, sample keys and the
    stage's own facts. A tokenizer: its vocabulary layout and VQ. A balance-mix plan: its
    sources, shape and balance report. A training run (`mmtok train --out`, upcycle,
    uni-moe): the model, its progress, the newest checkpoint and the last metrics. An
    export: the model and its parameter count. Reads JSON and headers only (no torch; at a
    URL, no shard or checkpoint is fetched)."""
    import collections

    from mmtok.fs import RemotePath, as_location, remote_errors
    from mmtok.shards import MANIFEST, QUARANTINE, ShardReader, read_jsonl, require_keys

    not_a_file(directory)
    directory = as_location(directory)  # at a URL: JSON files, the index and headers are read there
    if isinstance(directory, Path) and not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist")
    with remote_errors(directory):  # no credentials, no bucket: one line naming the URL
        done = _inspect_other(directory, as_json)
        nothing = not done and isinstance(directory, RemotePath) and not (directory / MANIFEST).exists()
    if done:
        return
    if nothing:  # locally, ShardReader names what is missing
        raise FileNotFoundError(f"{directory}: nothing mmtok writes is there (no {MANIFEST}, plan.json, config.json "
                                "or vocab.json); pass a stage's --out, a tokenizer, a plan, a run or an export")

    reader = ShardReader(directory)
    m = reader.manifest
    require_keys(m["totals"], ("by_group", "by_modality", "duplicates", "quarantined"), f"{directory / MANIFEST} (totals)")
    reasons = collections.Counter()
    qpath = directory / QUARANTINE
    if qpath.exists():
        for rec in read_jsonl(qpath):
            r = str(rec.get("reason", "(no reason recorded)"))
            reasons[r.split(": ", 1)[-1].split(" (")[0][:80]] += 1
    keys: dict[str, list[str]] = {}
    for row in reader.index().select(["key", "group"]).to_pylist():
        if len(keys.setdefault(row["group"], [])) < samples:
            keys[row["group"]].append(row["key"])
    kind, facts = _stage_facts(m, reader.index())
    info = {"directory": str(directory), "kind": kind, "stage": m["stage"], **m["totals"], "facts": facts,
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
    c.print(f"{kind}: " + ", ".join(f"{k} {_show(v)}" for k, v in facts.items() if v is not None), highlight=False)
    for r, n in reasons.most_common(10):
        c.print(f"  {n} x {r}")


def _inspect_other(directory, as_json: bool) -> bool:
    """Inspect a run, a plan, an export or a tokenizer (a path or a URL); False for anything else."""
    from mmtok.shards import MANIFEST
    from mmtok.vocab import VOCAB_FILE

    if (directory / "config.json").exists() and (directory / "checkpoints").is_dir():
        _inspect_run(directory, as_json)
    elif (directory / "plan.json").exists():
        _inspect_plan(directory, as_json)
    elif (directory / "config.json").exists() and (directory / "model.safetensors").exists():
        _inspect_export(directory, as_json)
    elif not (directory / MANIFEST).exists() and ((directory / VOCAB_FILE).exists() or (directory / "vq.json").exists()):
        _inspect_tokenizer(directory, as_json)
    else:
        return False
    return True


# what each stage's output is called, as the README names them
_KINDS = {"shard": "shards", "extract-keyframes": "frames", "extract-audio": "features",
          "tokenize-images": "codes", "tokenize": "tokens"}


def _column_sum(index, name: str):
    """The sum of an index column (None when the stage wrote none, or wrote no numbers)."""
    if name not in index.column_names:
        return None
    values = [v for v in index.column(name).to_pylist() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return round(sum(values), 3) if values else None


def _stage_facts(m: dict, index) -> tuple[str, dict]:
    """(what the directory is, the facts its stage's config and index give). The manifest may
    come from elsewhere: its fields are shown, never trusted as types."""
    stage = m.get("stage")
    cfg = m.get("config") if isinstance(m.get("config"), dict) else {}
    kind = _KINDS.get(stage, str(stage))
    facts: dict = {}
    if stage == "shard":
        facts = {k: cfg.get(k) for k in ("inputs", "validate", "dedup", "max_pixels")}
    elif stage == "extract-keyframes":
        parents = set(index.column("parent").to_pylist()) if "parent" in index.column_names else set()
        facts = {"mode": cfg.get("mode"), "frames_per_video": cfg.get("frames"), "size": cfg.get("size"),
                 "videos": len(parents), "frames": index.num_rows, "inputs": cfg.get("inputs")}
    elif stage == "extract-audio":
        facts = {"features": cfg.get("features"), "n_mels": cfg.get("n_mels"), "max_chunks": cfg.get("max_chunks"),
                 "clips": index.num_rows, "seconds": _column_sum(index, "duration"), "inputs": cfg.get("inputs")}
    elif stage in ("tokenize-images", "tokenize"):
        vocab = cfg.get("vocab") if isinstance(cfg.get("vocab"), dict) else {}
        image_range = vocab.get("image_range")
        fp = cfg.get("tokenizer")
        facts = {"tokenizer": fp[:16] if isinstance(fp, str) else None, "vocab_size": vocab.get("vocab_size"),
                 "image_codes": image_range[1] - image_range[0] if isinstance(image_range, list) and len(image_range) == 2
                 and all(isinstance(x, int) for x in image_range) else None,
                 "codes_per_image": vocab.get("image_tokens_per_image"), "inputs": cfg.get("inputs")}
        if stage == "tokenize-images":
            facts.update({"resolution": cfg.get("resolution"), "images": index.num_rows})
        else:
            facts.update({"documents": index.num_rows, "tokens": _column_sum(index, "n_tokens"),
                          "text_tokens": _column_sum(index, "n_text"), "image_tokens": _column_sum(index, "n_image"),
                          "codes": cfg.get("codes")})
    return kind, facts


def _safetensors_params(path: Path) -> dict:
    """Tensor and parameter counts and dtypes from a safetensors file's JSON header, read
    without loading a tensor (the header is bounded: a stranger's file may lie about it)."""
    from mmtok.shards import ShardError

    with path.open("rb") as f:  # a path or a URL: only the header's bytes are read
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= 100 << 20:
            raise ShardError(f"{path}: not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            params = sum(_prod(v["shape"]) for v in tensors.values())
            dtypes = sorted({str(v["dtype"]) for v in tensors.values()})
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ShardError(f"{path}: unreadable safetensors header ({e})") from None
    return {"tensors": len(tensors), "parameters": params, "dtypes": dtypes, "bytes": path.stat().st_size}


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _inspect_tokenizer(directory: Path, as_json: bool) -> None:
    """A tokenizer directory (`train-bpe`, `train-vq`, `import-tokenizer`): its vocabulary
    layout, text model and VQ, from JSON and headers alone."""
    from mmtok.shards import read_json, read_jsonl
    from mmtok.vocab import VOCAB_FILE, Vocab

    info: dict = {"directory": str(directory), "kind": "tokenizer"}
    if (directory / VOCAB_FILE).exists():
        v = Vocab.load(directory)
        info.update({"format": v.format, "vocab_size": v.vocab_size, "specials": v.n_specials, "text_ids": v.n_text,
                     "text_range": list(v.text_range), "image_codes": v.n_image_codes,
                     "image_range": list(v.image_range), "codes_per_image": v.image_tokens_per_image,
                     "text_model": v.text_model, "text_model_present": (directory / v.text_model).exists()})
    else:
        info["vocab"] = f"no {VOCAB_FILE} yet: run `mmtok train-bpe --out {directory}` to add the text side"
    if (directory / "vq.json").exists():
        vq = read_json(directory / "vq.json")
        info["vq"] = {k: vq.get(k) for k in ("resolution", "downsample", "codebook_size", "channels", "code_dim")}
        if (directory / "vq.safetensors").exists():
            info["vq"]["parameters"] = _safetensors_params(directory / "vq.safetensors")["parameters"]
        log = read_jsonl(directory / "vq_log.jsonl") if (directory / "vq_log.jsonl").exists() else []
        if log:  # how far training got and how well it reconstructs
            info["vq"]["last_log"] = {k: v for k, v in log[-1].items() if isinstance(v, (int, float))}
    else:
        info["vq"] = f"no VQ yet: run `mmtok train-vq --out {directory}` to add image codes"
    if as_json:
        sys.stdout.write(json.dumps(info, indent=1, sort_keys=True) + "\n")
        return
    _key_value_table(f"{directory} (tokenizer)", {k: v for k, v in info.items() if k != "directory"})


def _inspect_export(directory: Path, as_json: bool) -> None:
    """An `mmtok export` directory: the model config, its step and source, the weights' size."""
    from mmtok.shards import ShardError, read_json

    meta = read_json(directory / "config.json")
    if meta.get("format") != "mmtok-model/1" or not isinstance(meta.get("model"), dict):
        raise ShardError(f"{directory / 'config.json'}: not an mmtok export (format {meta.get('format')!r}); "
                         "`mmtok export RUN --out DIR` writes one")
    model = meta["model"]
    info = {"directory": str(directory), "kind": "export", "format": meta["format"], "step": meta.get("step"),
            "source_run": meta.get("source_run"),
            **{k: model.get(k) for k in ("model", "experts", "n_layers", "d_model", "n_heads", "vocab_size",
                                         "max_seq_len", "tokenizer")},
            "weights": _safetensors_params(directory / "model.safetensors")}
    if isinstance(info["tokenizer"], str):
        info["tokenizer"] = info["tokenizer"][:16]
    if as_json:
        sys.stdout.write(json.dumps(info, indent=1, sort_keys=True) + "\n")
        return
    _key_value_table(f"{directory} (export)", {k: v for k, v in info.items() if k != "directory"})


def _plan_sources(meta: dict) -> dict:
    """Per source: its documents (held-out ones included, as document numbers count) and
    weight, and with a holdout how many of those documents the plan leaves out."""
    held = [h["documents"] for h in meta["holdout"]["sources"]] if "holdout" in meta else None
    return {s["name"]: {"documents": s["documents"], "weight": s["weight"],
                        **({"held_out": held[i]} if held is not None else {})} for i, s in enumerate(meta["sources"])}


def _inspect_plan(directory: Path, as_json: bool) -> None:
    """A `balance-mix` plan: its sources, shape and balance report (plan.json alone)."""
    from mmtok.plan import read_plan_meta

    meta = read_plan_meta(directory)
    info = {"directory": str(directory), "kind": "plan", **{k: meta[k] for k in ("ratio", "world_size", "seq_len", "micro_batch", "steps",
                                                                 "microbatches", "seed")},
            "sources": _plan_sources(meta), "report": meta["report"]}
    if as_json:
        sys.stdout.write(json.dumps(info, indent=1, sort_keys=True) + "\n")
        return
    _key_value_table(f"{directory} (balance-mix plan)", {k: v for k, v in info.items() if k != "directory"})


def _key_value_table(title: str, rows: dict) -> None:
    """One row per field; a dict field on one line as `key value, ...`."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False)
    for k, v in rows.items():
        if v not in (None, {}):
            t.add_row(k, _show(v))
    Console().print(t)


def _show(v) -> str:
    """A value on one line: a dict as `key value, ...`, floats to 4 significant digits."""
    if isinstance(v, dict):
        return ", ".join(f"{a} {_show(b)}" for a, b in v.items())
    return f"{v:.4g}" if isinstance(v, float) else str(v)


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
    info = {"directory": str(directory), "kind": "run", "model": model.get("model", "uni-moe"), "experts": model.get("experts"),
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

