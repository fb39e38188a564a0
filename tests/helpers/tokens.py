"""Token-level test data: a small unified vocabulary, documents from segments, and token
shard directories of the exact shape `mmtok tokenize` writes (docs/FORMATS.md), made
through the real stage runner."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np


def make_vocab(image_tokens_per_image: int = 4, n_text: int = 200, n_image: int = 16) -> dict:
    """A small unified vocabulary in the mmtok-vocab/1 layout (one that `Vocab.from_dict` accepts)."""
    from mmtok.vocab import NAMED_SPECIALS, N_SPECIALS

    n_specials = N_SPECIALS
    names = list(NAMED_SPECIALS) + [f"<reserved_{i}>" for i in range(len(NAMED_SPECIALS), n_specials)]
    specials = {n: i for i, n in enumerate(names)}
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
