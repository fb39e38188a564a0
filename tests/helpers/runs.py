"""What the trainer, MoMa and first-hour tests share: a small token corpus and plan, the CLI
runner, tiny models and random batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from helpers.tokens import make_doc, make_token_shards, make_vocab
from mmtok.cli.app import app
from mmtok.mix import plan_mix, write_plan
from mmtok.trainer.config import ModelConfig

VOCAB = make_vocab(image_tokens_per_image=8, n_text=200, n_image=64)
MOMA = ["--model", "moma", "--experts", "2t2i", "--lr", "0.01", "--warmup", "2"]  # a tiny MoMa that learns in a few steps
MMTOK = [sys.executable, "-m", "mmtok.cli.app"]


def make_plan(root: Path, steps: int = 60, world_size: int = 1, micro_batch: int = 4, seed: int = 0) -> dict:
    """Text documents and image-caption pairs (both orders), and a 1:2 text:image plan."""
    rng = np.random.default_rng(seed)
    text = [make_doc(rng, VOCAB, [int(rng.integers(10, 40))]) for _ in range(30)]
    pairs = [make_doc(rng, VOCAB, ["img", 10] if i % 2 else [10, "img"]) for i in range(40)]
    dirs = [make_token_shards(root, text, VOCAB, "text"), make_token_shards(root, pairs, VOCAB, "pairs")]
    write_plan(plan_mix(dirs, out=root / "plan", ratio=(1, 2), world_size=world_size, seq_len=64,
                        micro_batch=micro_batch, steps=steps), root / "plan")
    return {"root": root, "plan": root / "plan", "text": dirs[0], "pairs": dirs[1], "dirs": dirs,
            "text_docs": text, "pair_docs": pairs}


def cli(*args):
    """The command in this process; a traceback in its output fails the test."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in (result.output or ""), result.output
    return result


def cli_subprocess(args, **kw) -> subprocess.CompletedProcess:
    """The command in a child process (torchrun for `--nproc`), one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(MMTOK + [str(a) for a in args], capture_output=True, text=True, env=env, **kw)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def curve(run: Path, keys=("loss", "grad_norm", "text_loss", "image_loss")) -> list[tuple]:
    """A run's logged (step, *keys) per step."""
    return [tuple(r[k] for k in ("step",) + keys) for r in metrics(run)]


def tiny(model: str, experts: str = "2t2i", **kw) -> ModelConfig:
    return ModelConfig(model=model, experts=experts, vocab_size=VOCAB["vocab_size"], image_range=tuple(VOCAB["image_range"]),
                       max_seq_len=64, **kw)


def random_batch(seed: int, b: int = 2, t: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ids mixing text and image codes, per-row positions, one document per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB["text_range"][0], VOCAB["vocab_size"], (b, t), generator=g)
    return ids, torch.arange(t, dtype=torch.int32).repeat(b, 1), torch.ones(b, t, dtype=torch.int32)
