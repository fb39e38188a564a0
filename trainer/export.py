"""Export a run's latest checkpoint to safetensors + config for single-process use, and
load a model back from either a run directory or an export directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmtok.shards import atomic_write, read_json
from mmtok.trainer import checkpoint_io
from mmtok.trainer.config import ModelConfig, RunConfig
from mmtok.trainer.model import Decoder
from mmtok.trainer.train import CONFIG, TrainError, intact_checkpoint

EXPORT_FORMAT = "mmtok-model/1"
WEIGHTS = "model.safetensors"


def read_run_config(run: Path) -> RunConfig:
    """A run's saved configuration; a folder that is not a run is refused naming it."""
    if not (run / CONFIG).exists():
        raise TrainError(f"{run}: not a training run (no {CONFIG}); pass the --out directory of `mmtok train`")
    return RunConfig.from_dict(read_json(run / CONFIG), where=str(run / CONFIG))


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Fill `model` from checkpoint `ckpt` in this process, never unpickling (checkpoint_io)."""
    state = {"model": model.state_dict()}
    checkpoint_io.load(state, ckpt, no_dist=True)
    model.load_state_dict(state["model"])


def load_from_run(run: str | Path) -> tuple[Decoder, RunConfig, int]:
    """The model of a run's newest checkpoint, on CPU, in one process (refused if damaged)."""
    run = Path(run)
    cfg = read_run_config(run)
    ckpt = intact_checkpoint(run)
    if ckpt is None:
        raise TrainError(f"{run}: has no checkpoint yet")
    saved = read_json(ckpt / "train_state.json")
    model = Decoder(cfg.model)
    load_weights(model, ckpt)
    return model.eval(), cfg, int(saved["step"])


def export(run: str | Path, to: str | Path) -> dict:
    from safetensors.torch import save_file

    model, cfg, step = load_from_run(run)
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(to / WEIGHTS))
    meta = {"format": EXPORT_FORMAT, "model": cfg.as_dict()["model"], "step": step, "source_run": str(Path(run).resolve())}
    atomic_write(to / "config.json", json.dumps(meta, indent=1, sort_keys=True).encode())
    return {"out": str(to), "step": step, "tensors": len(tensors), "parameters": sum(v.numel() for v in tensors.values())}


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
    model, cfg, _ = load_from_run(path)
    return model, cfg.model

