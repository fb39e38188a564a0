"""Export a run's latest checkpoint to safetensors + config for single-process use (or, with
`fmt="hf"`, to a Hugging Face model directory: trainer/hf_export.py), and load a model back
from either a run directory or an mmtok export directory."""

from __future__ import annotations

import json
from pathlib import Path

from mmtok.shards import atomic_write
from mmtok.trainer.checkpoint import load_run
from mmtok.trainer.config import ModelConfig
from mmtok.trainer.model import Decoder
from mmtok.trainer.train import CONFIG, TrainError

EXPORT_FORMAT = "mmtok-model/1"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer"  # the bundled tokenizer directory of an export


def export(run: str | Path, to: str | Path, fmt: str = "mmtok", tokenizer: str | Path | None = None,
           progress: bool = False, source: str | None = None) -> dict:
    """`fmt` "mmtok": model.safetensors + config.json (+ the tokenizer directory as
    `tokenizer/` when given). "hf": a Hugging Face model directory with the tokenizer
    bundled (trainer/hf_export.py), which needs the tokenizer. `progress`: a spinner on
    stderr naming the step under way (reading and writing the whole model). `source`: the run
    as config.json names it (default: `run` resolved; the URL when `run` is its pulled copy)."""
    import contextlib

    from rich.console import Console
    from safetensors.torch import save_file

    def status(what: str):
        return Console(stderr=True).status(what) if progress else contextlib.nullcontext()

    if fmt not in ("mmtok", "hf"):
        raise TrainError(f"unknown export format {fmt!r}; choose mmtok or hf")
    if fmt == "hf" and tokenizer is None:
        raise TrainError("--format hf bundles the tokenizer: give --tokenizer (the directory the model was trained with)")
    to = Path(to)
    _check_out(to)
    with status(f"reading the newest checkpoint of {run}"):
        model, cfg, step = load_run(run, "decoder")
    tokdir = None if tokenizer is None else _check_tokenizer(Path(tokenizer), cfg.model)
    summary = {"out": str(to), "step": step, "parameters": sum(p.numel() for p in model.state_dict().values())}
    if fmt == "hf":
        from mmtok.trainer.hf_export import export_hf

        return {**summary, **export_hf(model, cfg.model, to, tokdir, step), "tokenizer": str(tokdir)}
    to.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    with status(f"writing {to / WEIGHTS}"):
        save_file(tensors, str(to / WEIGHTS))
    if tokdir is not None:
        import shutil

        shutil.rmtree(to / TOKENIZER, ignore_errors=True)
        shutil.copytree(tokdir, to / TOKENIZER, ignore=shutil.ignore_patterns(".*"))
    meta = {"format": EXPORT_FORMAT, "model": cfg.as_dict()["model"], "step": step, "source_run": source or str(Path(run).resolve())}
    atomic_write(to / "config.json", json.dumps(meta, indent=1, sort_keys=True).encode())
    return {**summary, "format": "mmtok", "tensors": len(tensors), "tokenizer": None if tokdir is None else str(tokdir)}


def _check_out(to: Path) -> None:
    """An export replaces only an earlier export: any other non-empty directory is refused."""
    if not to.is_dir() or not any(to.iterdir()):
        return
    try:
        meta = json.loads((to / "config.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or not (meta.get("format") == EXPORT_FORMAT or "mmtok_step" in meta):
        raise TrainError(f"{to} exists and holds something other than an `mmtok export`; choose another --out")


def _check_tokenizer(tokdir: Path, cfg: ModelConfig) -> Path:
    """The tokenizer directory, refused if it is not the one the model's ids come from."""
    from mmtok.tokenize import Tokenizer

    tok = Tokenizer.load(tokdir)
    if cfg.tokenizer and tok.fingerprint() != cfg.tokenizer:
        raise TrainError(f"--tokenizer {tokdir} is not the tokenizer this model was trained with (fingerprints differ); "
                         "give the directory the plan was tokenized with")
    if tok.vocab.vocab_size != cfg.vocab_size or tuple(tok.vocab.image_range) != tuple(cfg.image_range):
        raise TrainError(f"--tokenizer {tokdir}: vocab_size {tok.vocab.vocab_size} / image range {tok.vocab.image_range}, "
                         f"the model has {cfg.vocab_size} / {tuple(cfg.image_range)}: not its tokenizer")
    return tokdir


def load_exported(directory: str | Path) -> tuple[Decoder, ModelConfig]:
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        meta = json.loads((directory / "config.json").read_text())
    except FileNotFoundError:
        raise TrainError(f"{directory}: no config.json; is it the output of `mmtok export`?") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise TrainError(f"{directory}/config.json: not an mmtok model export (format {meta.get('format')!r})")
    cfg = ModelConfig(**meta["model"])
    model = Decoder(cfg)
    model.load_state_dict(load_file(str(directory / WEIGHTS)))
    return model.eval(), cfg


def load_model(path: str | Path) -> tuple[Decoder, ModelConfig]:
    """A run directory (newest checkpoint) or an export directory."""
    path = Path(path)
    if (path / CONFIG).exists() and (path / WEIGHTS).exists():
        return load_exported(path)
    model, cfg, _ = load_run(path, "decoder")
    return model, cfg.model

