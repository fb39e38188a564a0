"""The contract between the one training loop (`trainer.train.run_job`) and what it trains,
in the spirit of torchtitan's TrainSpec: the loop owns the order of things (lock and rank-0
checks, loader, model, optimizers, the checkpoint manager, SIGINT/SIGTERM, the metrics log,
the progress bar), a job owns what differs (what a step computes, what a checkpoint holds).

- A `RunKind` says how a run directory of one kind is read back: its config.json into a
  config object, that config into a model. Every reader of runs goes through it
  (`trainer.checkpoint.load_run`).
- A `Job` is one training. The jobs: `train.LMJob`'s two, `train.DecoderJob` (dense, moe,
  moma, mod-moma on a balance-mix plan) and `unimoe_train.UniMoEJob` (one Uni-MoE stage);
  `aux_routers.AuxRouterJob` (a trained run's auxiliary routers, the rest frozen, saved
  back into its checkpoint); `vq_train.VQJob` (the VQ tokenizer's GAN step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

# The run directory's own files (trainer/train.py documents the layout).
CONFIG, CONFIG_TOML, METRICS = "config.json", "config.toml", "metrics.jsonl"


def json_bytes(content: dict) -> bytes:
    """A run directory's JSON file, as the trainer writes them all."""
    return json.dumps(content, indent=1, sort_keys=True).encode()


class TrainError(ValueError):
    """A problem with the run's inputs (config, plan, checkpoint); nothing was trained."""


@dataclass(frozen=True)
class RunKind:
    name: str  # as refusals name it: "decoder", "uni-moe"
    read_config: Callable[[dict, str], Any]  # config.json's content, where it came from -> the run's config
    build: Callable[[Any], torch.nn.Module]  # that config -> its model on CPU (fresh weights, set for its stage)
    hint: str  # how such a run is made, for a refusal


def kinds() -> dict[str, RunKind]:
    """Every kind of run by name (imported on first use: the kinds' modules import this one)."""
    from mmtok.trainer.train import DECODER
    from mmtok.trainer.unimoe_train import UNIMOE

    return {k.name: k for k in (DECODER, UNIMOE)}


def run_kind(config: dict, where: str) -> RunKind:
    """The kind of run a config.json holds: a Uni-MoE stage names its format, a decoder run none."""
    from mmtok.trainer.unimoe_train import FORMAT

    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is not None and fmt != FORMAT:  # an export's config.json, or something else altogether
        raise TrainError(f"{where}: format {fmt!r} is not a training run's; pass the --out directory of `mmtok train`")
    return kinds()["uni-moe" if fmt == FORMAT else "decoder"]


@dataclass(frozen=True)
class Cadence:
    """The loop's settings for a job without a TrainConfig (which has these fields too)."""

    steps: int
    log_every: int
    ckpt_every: int | None  # None: a checkpoint at the end only


class Job:
    """What one training brings to the loop, in the order the loop calls it (`run_job`):

    1. `claim` on rank 0, the output locked, before anything is written: the checkpoint to
       start from; every rank stops with its refusal.
    2. `first_step`, `make_loader`, then `build` (the model, parallelised; rank 0 writes the
       job's files), `optimizers`, the checkpoint loaded through `checkpoint_state`, `begin`.
    3. Per step `step`; every `log_every` steps `record` (written to `log_file`, shown by
       `describe`); a checkpoint every `ckpt_every` steps, at the end and on SIGINT/SIGTERM,
       named `saves_as(step)`, holding `checkpoint_state` and `checkpoint_meta`.
    4. `summary` after the last save.

    The defaults here are a job that trains its own run directory from step 0 (or its
    checkpoint's step) to `train.steps`."""

    name = "train"  # the progress bar's label
    train: Any  # the settings the loop reads: steps, log_every, ckpt_every
    data = "the data"  # what it trains on, as messages name it
    device: str | None = None  # parallel.init_distributed's choice (None: this rank's GPU, else the CPU)
    log_file: str | None = METRICS  # the metrics log in the output directory (None: none)
    tensorboard = True  # and TensorBoard event files in tb/
    keep = 2  # checkpoints kept

    def claim(self, out, resume: bool, world: int):
        """The checkpoint to start from (None: from scratch); TrainError refuses the output."""
        raise NotImplementedError

    def make_loader(self, rank: int, world: int, ckpt, start: int, end: int) -> Iterator:
        """This rank's batches (with state_dict/load_state_dict), for steps `start`..`end`."""
        raise NotImplementedError

    def build(self, out, rank: int, world: int, device: torch.device) -> torch.nn.Module:
        """The model, starting weights loaded and parallelised (the module a checkpoint holds)."""
        raise NotImplementedError

    def optimizers(self, model: torch.nn.Module) -> tuple:
        raise NotImplementedError

    def checkpoint_state(self, model, optimizers: tuple, loader, step: int) -> tuple:
        """(module, optimizer or tuple of them, loader) as a checkpoint at `step` holds them."""
        return model, optimizers[0], loader

    def begin(self, model, optimizers: tuple) -> None:
        """After the checkpoint is loaded, before the first step."""

    def first_step(self, ckpt) -> int:
        """The step the job counts from, given the checkpoint it starts from (to `train.steps`):
        the checkpoint's own, for a job that continues its run's steps."""
        from mmtok.trainer.checkpoint import checkpoint_step

        return checkpoint_step(ckpt)

    def saves_as(self, step: int) -> int:
        """The step a checkpoint taken after `step` is named by."""
        return step

    def step(self, model, optimizers: tuple, batches: Iterator, step: int) -> bool:
        """One optimizer step from `batches` (collective under torchrun); False when they ran out."""
        raise NotImplementedError

    def record(self, step: int, seconds: float, world: int) -> dict:
        """The metrics of the steps since the last record (`seconds` ago), reduced over ranks."""
        raise NotImplementedError

    def describe(self, rec: dict) -> str:
        """A record as the progress bar shows it."""
        return ""

    def checkpoint_meta(self, world: int) -> dict:
        """train_state.json's fields beside step and world_size."""
        return {}

    def summary(self, out, rank: int, step: int, status: str) -> dict:
        """What the job adds to the loop's summary (rank 0 writes the job's outputs here)."""
        return {}
