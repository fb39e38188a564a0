"""`mmtok train --model uni-moe --stage align|experts|tune` and `mmtok eval` of a uni-moe
run. `cli/train_cmds.py` declares the options and hands uni-moe runs to these functions;
torch is imported inside them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from mmtok.cli.common import eval_report, fail

STAGES = ("align", "experts", "tune")
SOURCES = ("speech", "audio", "video", "image")


def train_unimoe(*, out: Path, stage: str, tokenizer: Path | None, init: Path | None, sources: dict, texts: list,
                 speech_encoder: Path | None, model_opts: dict, train_opts: dict, batch_size: int, holdout: float,
                 resume: bool, stop_at_step: int | None, as_json: bool) -> None:
    """One stage of a Uni-MoE run; the data options are recorded so that eval finds the held-out pairs."""
    if stage not in STAGES:
        fail(f"--model uni-moe needs --stage align, experts or tune (got {stage!r})")
    if tokenizer is None:
        fail("--model uni-moe needs --tokenizer DIR (the `mmtok train-bpe` directory of the text)")
    if not any(sources.values()):
        fail("give at least one of --speech, --audio (extract-audio output), --video (extract-keyframes output), "
             "--image (`mmtok shard` output with image-caption pairs)")
    from mmtok.tokenize import Tokenizer
    from mmtok.trainer.config import PRESETS, TrainConfig
    from mmtok.trainer.unimoe import UniMoEConfig, whisper_dims
    from mmtok.trainer.unimoe_train import UniMoERun, train_stage

    tok = Tokenizer.load(tokenizer)
    preset = dict(PRESETS[model_opts.pop("preset")])
    model = {**preset, **{k: v for k, v in model_opts.items() if v is not None},
             "vocab_size": tok.vocab.vocab_size, "image_range": tok.vocab.image_range}
    model["modalities"] = tuple(m for m in SOURCES if sources[m])
    if speech_encoder:
        model["speech_encoder"] = str(speech_encoder.resolve())
        model["speech_encoder_dims"] = whisper_dims(model["speech_encoder"])
    data = {"tokenizer": str(tokenizer.resolve()), "batch_size": batch_size, "holdout": holdout,
            "texts": [str(p.resolve()) for p in texts], **{m: [str(p.resolve()) for p in v] for m, v in sources.items()}}
    cfg = UniMoERun(UniMoEConfig(**model), TrainConfig(**{k: v for k, v in train_opts.items() if v is not None}),
                    stage, str(init.resolve()) if init else "", data)
    summary = train_stage(cfg, out, lambda rank, world: make_loader(cfg, tok, "train", rank=rank, world=world),
                          resume=resume, stop_at_step=stop_at_step, live=not as_json)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    else:
        from rich.console import Console

        con = Console(stderr=True)
        con.print(f"[bold]mmtok train --model uni-moe --stage {stage}[/]: {summary['status']} at step "
                  f"{summary['step']}/{summary['steps']} on {summary['world_size']} process(es); "
                  f"started from {summary['init']}")
        con.print(f"trained: {summary['trained']}\nfrozen:  {summary['frozen']}")


def make_loader(cfg, tok, split: str, batch_size: int | None = None, rank: int = 0, world: int = 1):
    """The run's pairs (train or held-out split) as a UniMoELoader (rank `rank` of `world`)."""
    from mmtok.trainer.unimoe_data import UniMoELoader, heldout, join_pairs

    d = cfg.data
    pairs = join_pairs(texts=d["texts"], **{m: d[m] for m in SOURCES})
    keep = [p for p in pairs if heldout(p.key, d["holdout"]) == (split == "heldout")]
    if not keep:
        raise ValueError(f"no {split} pairs in the given data (holdout fraction {d['holdout']}); give more pairs")
    return UniMoELoader(keep, cfg.model, tok, batch_size or d["batch_size"], seed=cfg.train.seed, rank=rank, world=world)


def eval_unimoe(checkpoint: Path, out: Path | None, batch_size: int, as_json: bool) -> None:
    """Text given each modality and per-layer routing, on the run's held-out pairs."""
    from mmtok.tokenize import Tokenizer
    from mmtok.trainer.unimoe_train import UniMoERun, evaluate, write_report

    cfg = UniMoERun.from_dict(json.loads((checkpoint / "config.json").read_text()))
    loader = make_loader(cfg, Tokenizer.load(cfg.data["tokenizer"]), "heldout", batch_size)
    result = evaluate(checkpoint, loader.once())
    out = out or checkpoint / "eval"
    result["files"] = write_report(result, out)
    rows = [(m, str(v["tokens"]), f"{v['loss']:.3f}", f"{v['ppl']:.3f}") for m, v in result["text_given"].items()]
    eval_report(result, out, f"mmtok eval: {checkpoint} (uni-moe, stage {result['stage']})",
                ("text given", "tokens", "loss", "perplexity"), rows, as_json)

