"""Shared test helpers. `make_token_shards` writes a token shard directory of the exact
shape `mmtok tokenize` writes (docs/FORMATS.md), through the real stage runner."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest


def make_vocab(image_tokens_per_image: int = 4, n_text: int = 200, n_image: int = 16) -> dict:
    """A small unified vocabulary in the mmtok-vocab/1 layout."""
    n_specials = 16
    specials = {"<pad>": 0, "<eod>": 1, "<boi>": 2, "<eoi>": 3, "<bos>": 4}
    return {"format": "mmtok-vocab/1", "vocab_size": n_specials + n_text + n_image, "specials": specials,
            "n_specials": n_specials, "text_range": [n_specials, n_specials + n_text],
            "image_range": [n_specials + n_text, n_specials + n_text + n_image],
            "image_tokens_per_image": image_tokens_per_image, "sp_model": "bpe.model"}


def make_doc(rng: np.random.Generator, vocab: dict, segments: list) -> np.ndarray:
    """A document from segments: an int n is n random text tokens, "img" an image block;
    `<eod>` is appended."""
    s = vocab["specials"]
    parts = []
    for seg in segments:
        if seg == "img":
            codes = rng.integers(*vocab["image_range"], size=vocab["image_tokens_per_image"])
            parts.append(np.concatenate([[s["<boi>"]], codes, [s["<eoi>"]]]))
        else:
            parts.append(rng.integers(*vocab["text_range"], size=seg))
    parts.append([s["<eod>"]])
    return np.concatenate(parts).astype(np.uint32)


def make_token_shards(tmp_path: Path, docs: list[np.ndarray], vocab: dict, name: str = "tokens",
                      max_count: int = 7) -> Path:
    """Write `docs` (1-D uint32 unified ids, each ending with <eod>) as a token shard
    directory `tmp_path/name`, a few documents per shard. Returns the directory."""
    from mmtok.runner import Item, Sample, run_stage
    from mmtok.shards import npy_bytes

    lo, hi = vocab["image_range"]
    boi = vocab["specials"]["<boi>"]

    def tokenize(doc: np.ndarray) -> Sample:
        tokens = np.asarray(doc, dtype=np.uint32)
        n_image = int(((tokens >= lo) & (tokens < hi)).sum())
        images = int((tokens == boi).sum())
        sha = hashlib.sha256(tokens.tobytes()).hexdigest()
        counts = {"n_tokens": len(tokens), "n_text": len(tokens) - n_image, "n_image": n_image}
        key = f"d{sha[:16]}"
        meta = {"modality": "pair" if images else "text", "source": key, **counts, "images": images, "sha256": sha}
        return Sample(key, "tokens", {"npy": npy_bytes(tokens)}, meta, {**counts, "source_key": key})

    out = Path(tmp_path) / name
    items = [Item(f"doc{i}", d) for i, d in enumerate(docs)]
    run_stage("tokenize", items, tokenize, out, config={"vocab": vocab, "name": name}, max_count=max_count,
              progress=False)
    return out


def kill_midway(cmd: list[str], out, env=None) -> int:
    """Start `cmd + ["--out", out]` and SIGKILL it once 3 shards are finished but before the
    manifest is written (retried if a run was too fast to catch); returns the finished shards."""
    import shutil
    import signal
    import subprocess
    import time

    stats = Path(out) / "_stats"
    for _ in range(5):
        p = subprocess.Popen(cmd + ["--out", str(out)], env=env, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and len(list(stats.glob("*.json")) if stats.exists() else []) < 3:
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if not (Path(out) / "manifest.json").exists():
            break
        shutil.rmtree(out)
    assert not (Path(out) / "manifest.json").exists(), "could not kill the run mid-way"
    return len(list(stats.glob("*.json")))


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster on one thread than on two shared cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
