"""The image codes of `tokenize-images` outputs as `tokenize --codes` reads them: found by
the image's `image_sha256` in one or more directories, read where they lie, checked against
the codebook before use."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mmtok.shards import ShardError, ShardReader, load_npy
from mmtok.vocab import VocabError

if TYPE_CHECKING:
    from mmtok.tokenizer import Tokenizer


class BadCodes(Exception):
    """Codes that cannot be used for an image; the sample becomes a quarantine record."""


class Codes:
    """Codes written by `tokenize-images` into one or more directories, found by the image's
    `image_sha256` (read where they lie, never copied; the first directory holding an image wins)."""

    def __init__(self, codes_dirs: list[str | Path], tok: Tokenizer):
        self.readers, self.where = [], {}
        for d in codes_dirs:
            reader = ShardReader(d)
            have = reader.manifest.get("config", {}).get("tokenizer")
            if reader.manifest.get("stage") != "tokenize-images":
                raise ValueError(f"--codes {d}: not a `mmtok tokenize-images` output")
            if have != tok.fingerprint():
                if not tok.has_vq:  # the likelier cause than another tokenizer: name it
                    raise VocabError(f"--codes {d}: {tok.source} has no trained VQ (vq.safetensors + vq.json), so it "
                                     "is not the tokenizer these codes were made with; give that tokenizer")
                raise VocabError(f"--codes {d} was made with a different tokenizer than {tok.source}; "
                                 "rerun tokenize-images with this tokenizer or leave out --codes")
            index = reader.index()
            rows = index.select(["image_sha256", "shard", "members"]).to_pylist() if index.num_rows else []
            for r in rows:
                m = next(m for m in r["members"] if m["ext"] == "npy")
                self.where.setdefault(r["image_sha256"], (reader, r["shard"], m))
            self.readers.append(reader)
        self.n_codes, self.per_image = tok.vocab.n_image_codes, tok.vocab.image_tokens_per_image

    def get(self, image_sha: str) -> np.ndarray | None:
        """The image's codes; raises BadCodes (a quarantine record naming the codes shard) on codes
        that do not fit the codebook: an edited or damaged codes directory, never silently used."""
        hit = self.where.get(image_sha)
        if hit is None:
            return None
        reader, shard, m = hit
        where = f"--codes {reader.directory / shard}"
        try:
            codes = load_npy(reader.read_member(shard, m["offset"], m["size"]))
        except (ValueError, ShardError) as e:
            raise BadCodes(f"{where}: unreadable codes of image {image_sha[:12]} ({e}); rerun tokenize-images") from None
        if codes.shape != (self.per_image,) or codes.dtype.kind not in "iu":
            raise BadCodes(f"{where}: codes of image {image_sha[:12]} are {codes.dtype} {codes.shape}, expected "
                       f"{self.per_image} integer codes; rerun tokenize-images")
        codes = codes.astype(np.int64)
        if len(codes) and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise BadCodes(f"{where}: codes of image {image_sha[:12]} outside the codebook [0, {self.n_codes}) "
                       f"(found {codes.min()}..{codes.max()}); rerun tokenize-images")
        return codes
