"""The contract between the one training loop (`trainer.train.run_job`) and what it trains,
in the spirit of torchtitan's TrainSpec, so that the loop never asks which model it runs.

- A `RunKind` says how a run directory of one kind is read back: its config.json into a
  config object, that config into a model. Every reader of runs goes through it
  (`trainer.checkpoint.load_run`).
- A `Job` is one training of a kind: the pieces the loop calls. `train.DecoderJob`
  (dense, moe, moma, mod-moma on a balance-mix plan) and `unimoe_train.UniMoEJob` (one
  Uni-MoE stage) are the jobs.
- Two trainings keep a step of their own and share the loop's pieces instead (process
  group, bf16 rule, `checkpoint.Checkpointer`, `metrics.Metrics`); each module says why.
  The auxiliary-router stage (`aux_routers.py`) trains a frozen model's routers and
  saves the run's checkpoint again at its own step; VQ training (`vq_train.py`) is a GAN
  step of two optimizers into a tokenizer directory. Upcycling derives a run's first
  checkpoint from another run through the same checkpoint manager.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

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


class Job(Protocol):
    """What one training brings to the loop. Each call's place in the loop:
    `check_resume` (rank 0, before anything is written), `make_loader`, `build` (same seed on
    every rank), `config_files` + `files` (written by rank 0), then per micro-batch `forward`;
    `checkpoint_meta` at each save, `flops_per_token` for MFU, `summary` at the end."""

    train: Any  # the TrainConfig the loop reads: steps, schedule, batch, precision, checkpoints
    data: str  # what it trains on, as messages name it (the plan, or "the data")

    def make_loader(self, rank: int, world: int) -> Iterator[dict]:
        """Micro-batches of this rank, with state_dict/load_state_dict (the PlanLoader contract)."""

    def build(self, device: torch.device) -> torch.nn.Module:
        """The model to train, on CPU, starting weights loaded."""

    def config_files(self) -> dict[str, bytes]:
        """config.json (and what else records the settings), as the run directory keeps them."""

    def files(self) -> dict[str, dict]:
        """Further JSON files of the run directory (after `build`; their names before it too)."""

    def check_resume(self, saved: dict, where: str) -> None:
        """Raise TrainError unless the run's saved config.json may continue as this job."""

    def checkpoint_meta(self, world: int) -> dict:
        """train_state.json's fields beside step and world_size."""

    def forward(self, model: torch.nn.Module, batch: dict) -> tuple[dict, list[dict], dict]:
        """Loss terms (`loss`, ...), routing statistics, and (NLL sum, token count) per reported group."""

    def flops_per_token(self) -> float | None:
        """Training FLOPs per token for MFU (None: not reported)."""

    def summary(self) -> dict:
        """What the job adds to the loop's summary."""
