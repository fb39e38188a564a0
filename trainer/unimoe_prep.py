"""A Uni-MoE stage from `mmtok train --model uni-moe` options: its run config (model sizes
from the preset and the tokenizer, the data options recorded for eval), the join of
features and texts into pairs, and the train / held-out split. `cli/unimoe_cmds.py`
prints what these return; torch is imported inside."""

from __future__ import annotations

import json
from pathlib import Path

STAGES = ("align", "experts", "tune")
SOURCES = ("speech", "audio", "video", "image")


def stage_config(*, stage: str | None, tokenizer: Path | None, init: Path | None, sources: dict, texts: list,
                 speech_encoder: Path | None, model_opts: dict, train_opts: dict, batch_size: int, holdout: float):
    """The `UniMoERun` of one stage (ValueError naming the option for bad ones), and its
    tokenizer. `model_opts`/`train_opts` hold None for options not given."""
    if stage not in STAGES:
        raise ValueError(f"--model uni-moe needs --stage align, experts or tune (got {stage!r})")
    if tokenizer is None:
        raise ValueError("--model uni-moe needs --tokenizer DIR (the `mmtok train-bpe` directory of the text)")
    if not any(sources.values()):
        raise ValueError("give at least one of --speech, --audio (extract-audio output), --video (extract-keyframes "
                         "output), --image (`mmtok shard` output with image-caption pairs)")
    from mmtok.tokenize import Tokenizer
    from mmtok.trainer.config import PRESETS, TrainConfig
    from mmtok.trainer.unimoe import UniMoEConfig, whisper_dims
    from mmtok.trainer.unimoe_train import UniMoERun

    opts = dict(model_opts)
    name = opts.pop("preset") or "tiny"
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    tok = Tokenizer.load(tokenizer)
    preset = dict(PRESETS[name])
    model = {**preset, **{k: v for k, v in opts.items() if v is not None},
             "vocab_size": tok.vocab.vocab_size, "image_range": tok.vocab.image_range}
    model["modalities"] = tuple(m for m in SOURCES if sources[m])
    if speech_encoder:
        model["speech_encoder"] = str(speech_encoder.resolve())
        model["speech_encoder_dims"] = whisper_dims(model["speech_encoder"])
    data = {"tokenizer": str(tokenizer.resolve()), "batch_size": batch_size, "holdout": holdout,
            "texts": [str(p.resolve()) for p in texts], **{m: [str(p.resolve()) for p in v] for m, v in sources.items()}}
    cfg = UniMoERun(UniMoEConfig(**model), TrainConfig(**{k: v for k, v in train_opts.items() if v is not None}),
                    stage, str(init.resolve()) if init else "", data)
    return cfg, tok


def train(cfg, tok, out: Path, *, resume: bool, stop_at_step: int | None, live: bool) -> dict:
    """Train one stage (`stage_config`) into `out`; returns the trainer's summary."""
    from mmtok.trainer.unimoe_train import train_stage

    return train_stage(cfg, out, lambda rank, world: make_loader(cfg, tok, "train", rank=rank, world=world),
                       resume=resume, stop_at_step=stop_at_step, live=live)


def make_loader(cfg, tok, split: str, batch_size: int | None = None, rank: int = 0, world: int = 1):
    """The run's pairs (train or held-out split) as a UniMoELoader (rank `rank` of `world`)."""
    from mmtok.trainer.unimoe_data import UniMoELoader, heldout, join_pairs

    d = cfg.data
    pairs = join_pairs(texts=d["texts"], **{m: d[m] for m in SOURCES})
    keep = [p for p in pairs if heldout(p.key, d["holdout"]) == (split == "heldout")]
    if not keep:
        raise ValueError(f"no {split} pairs in the given data (holdout fraction {d['holdout']}); give more pairs")
    return UniMoELoader(keep, cfg.model, tok, batch_size or d["batch_size"], seed=cfg.train.seed, rank=rank, world=world)


def evaluate(checkpoint: Path, out: Path | None, batch_size: int) -> tuple[dict, Path]:
    """Text given each modality and per-layer routing on the run's held-out pairs; the
    result and the report directory it was written to."""
    from mmtok.tokenize import Tokenizer
    from mmtok.trainer.unimoe_train import UniMoERun, evaluate as run_eval, write_report

    cfg = UniMoERun.from_dict(json.loads((checkpoint / "config.json").read_text()))
    loader = make_loader(cfg, Tokenizer.load(cfg.data["tokenizer"]), "heldout", batch_size)
    result = run_eval(checkpoint, loader.once())
    out = out or checkpoint / "eval"
    result["files"] = write_report(result, out)
    return result, out
