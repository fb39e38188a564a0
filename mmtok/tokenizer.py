"""The unified tokenizer: a tokenizer directory (BPE + vocabulary + VQ) as a library object.

A document becomes one 1-D uint32 array of unified ids (see mmtok/vocab.py):
text pieces, image blocks `<boi>` + codes + `<eoi>`, and a final `<eod>`. The stages that
apply it to shards are in mmtok/tokenize.py.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmtok.vocab import VOCAB_FILE, Vocab, VocabError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff")


def image_alone(members: dict[str, bytes]) -> dict[str, bytes] | None:
    """A sample's image member as `{ext: bytes}`. Its `content_hash` names the image: the
    `sha256` of a stand-alone image sample, a document's image reference, `image_sha256`."""
    return next(({e: members[e]} for e in IMAGE_EXTS if e in members), None)


@dataclass
class StageRecipe:
    """How to build a tokenizer-backed stage elsewhere (a Ray actor, mmtok.actors): its class,
    the tokenizer directory and its other arguments, paths and numbers only; called with
    the device the tokenizer loads on there."""

    cls: type
    tokdir: str
    kwargs: dict

    def __call__(self, device: str):
        return self.cls(tok=Tokenizer.load(self.tokdir, device), **self.kwargs)


class Tokenizer:
    """A tokenizer directory (or URL, read from a copy in the cache) loaded once: BPE +
    vocabulary (+ the VQ, loaded on first use)."""

    def __init__(self, tokdir: str | Path, device: str | None = None):
        import sentencepiece as spm

        from mmtok.mirror import local_copy

        self.source = str(tokdir)  # what a Ray actor loads again: a URL is pulled there too
        self.dir = local_copy(tokdir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{tokdir}: tokenizer directory not found; make one with `mmtok train-bpe`")
        self.vocab = Vocab.load(self.dir)
        model = self.dir / self.vocab.text_model
        if not model.exists():
            raise VocabError(f"{self.dir}: {VOCAB_FILE} names {self.vocab.text_model}, which is missing")
        self.device = device
        self._vq = None
        v = self.vocab
        self.boi, self.eoi, self.eod = v["<boi>"], v["<eoi>"], v["<eod>"]
        self.sp = self.hf = None
        if v.text_tokenizer:  # an imported tokenizer's own text model (mmtok.chameleon)
            from mmtok.chameleon import HFText

            self.hf = HFText(model, v)
            return
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model))
        except (RuntimeError, OSError) as e:
            raise VocabError(f"{model}: not a SentencePiece model ({e})") from None
        if self.sp.get_piece_size() != self.vocab.n_text:
            raise VocabError(f"{model} has {self.sp.get_piece_size()} pieces but {VOCAB_FILE} reserves "
                             f"{self.vocab.n_text} text ids: the files come from different vocabularies")

    @classmethod
    def load(cls, tokdir: str | Path, device: str | None = None) -> "Tokenizer":
        return cls(tokdir, device)

    @property
    def has_vq(self) -> bool:
        from mmtok.vq import CONFIG, WEIGHTS

        return (self.dir / WEIGHTS).exists() and (self.dir / CONFIG).exists()

    @property
    def vq(self):
        """The VQ model, checked against the vocabulary on first use."""
        if self._vq is None:
            import torch

            from mmtok.vq import load_vq

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            vq = load_vq(self.dir, device)
            if vq.cfg.codebook_size != self.vocab.n_image_codes or vq.cfg.tokens_per_image != self.vocab.image_tokens_per_image:
                raise VocabError(f"{self.dir}: the VQ (codebook {vq.cfg.codebook_size}, {vq.cfg.tokens_per_image} codes "
                                 f"per image) does not match {VOCAB_FILE} ({self.vocab.n_image_codes} image codes, "
                                 f"{self.vocab.image_tokens_per_image} per image): retrain one of them")
            self._vq = vq
        return self._vq

    @property
    def resolution(self) -> int:
        return self.vq.cfg.resolution

    def fingerprint(self) -> str:
        """A hash of what decides the ids (the files, and the image preprocessing's version);
        output directories record it."""
        from mmtok.vq import PREPROCESSING

        h = hashlib.sha256(f"preprocessing {PREPROCESSING}\0".encode())
        for name in (VOCAB_FILE, self.vocab.text_model, "vq.json", "vq.safetensors"):
            p = self.dir / name
            if p.exists():
                h.update(name.encode() + b"\0" + p.read_bytes())
        return h.hexdigest()

    # ------------------------------------------------------------ text

    def encode_text(self, text: str) -> np.ndarray:
        if self.hf is not None:
            return self.hf.encode(text)
        return np.asarray(self.sp.encode(text), dtype=np.uint32) + self.vocab.n_specials

    def decode_text(self, ids) -> str:
        """Text ids back to a string; ids outside the text range are skipped."""
        lo, hi = self.vocab.text_range
        if self.hf is not None:
            return self.hf.decode([i for i in ids if lo <= i < hi])
        return self.sp.decode([int(i) - lo for i in ids if lo <= i < hi])

    # ------------------------------------------------------------ images

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image -> uint8 [3, R, R] (the VQ's own preprocessing: mmtok.vq.load_image, or
        an imported VQ's); raises on bad or huge images."""
        return self.vq.preprocess(data)

    def encode_images(self, images: np.ndarray | list, batch_size: int = 32) -> np.ndarray:
        """Preprocessed images [N, 3, R, R] (or encoded image bytes) -> codes [N, tokens_per_image].
        uint8 pixels from `preprocess` are scaled on the device (the VQ's `scale`: to [-1, 1]
        for mmtok's); float images are taken as already scaled. On CUDA the encoder runs under
        bf16 autocast."""
        import torch

        if isinstance(images, list):
            images = np.stack([self.preprocess(b) if isinstance(b, bytes) else b for b in images])
        dev = next(self.vq.parameters()).device
        out = []
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).to(dev)
            x = self.vq.scale(x) if x.dtype == torch.uint8 else x
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                out.append(self.vq.encode(x).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.vocab.image_tokens_per_image), np.int64)

    def image_block(self, codes: np.ndarray) -> np.ndarray:
        return np.concatenate([[self.boi], np.asarray(codes, np.uint32) + self.vocab.image_range[0], [self.eoi]]).astype(np.uint32)

    def decode_images(self, codes: np.ndarray) -> list:
        """Codes [N, tokens_per_image] -> PIL images."""
        import torch

        from mmtok.vq import to_pil

        dev = next(self.vq.parameters()).device
        with torch.no_grad():
            imgs = self.vq.decode(torch.as_tensor(np.asarray(codes, np.int64), device=dev))
        return [to_pil(im) for im in imgs]

    # ------------------------------------------------------------ interleaved content

    def encode(self, segments: list) -> np.ndarray:
        """[str | encoded image bytes | PIL image, ...] -> one document's ids, ending in <eod>."""
        parts: list = []
        for s in segments:
            if isinstance(s, str):
                parts.append(self.encode_text(s))
            else:
                if not isinstance(s, bytes):  # a PIL image
                    buf = io.BytesIO()
                    s.save(buf, format="PNG")
                    s = buf.getvalue()
                parts.append(self.image_block(self.encode_images([s])[0]))
        return np.concatenate(parts + [np.asarray([self.eod], np.uint32)]).astype(np.uint32)

    def split(self, ids) -> list[tuple[str, np.ndarray]]:
        """Ids -> [("text", text ids) | ("image", codes)], dropping <eod>/<pad>. Raises
        ValueError on a malformed image block."""
        ids = np.asarray(ids, dtype=np.int64)
        v, n = self.vocab, self.vocab.image_tokens_per_image
        out, i, text = [], 0, []
        while i < len(ids):
            t = ids[i]
            if t == self.boi:
                if text:
                    out.append(("text", np.asarray(text)))
                    text = []
                block = ids[i + 1:i + 1 + n]
                if len(block) != n or not v.is_image(block).all() or i + 1 + n >= len(ids) or ids[i + 1 + n] != self.eoi:
                    raise ValueError(f"malformed image block at position {i}: expected <boi> + {n} image codes + <eoi>")
                out.append(("image", block - v.image_range[0]))
                i += n + 2
                continue
            if v.is_image(t) or t == self.eoi:
                raise ValueError(f"image token {int(t)} outside an image block at position {i}")
            text.append(t)
            i += 1
        if text:
            out.append(("text", np.asarray(text)))
        return out

    def decode(self, ids) -> list:
        """Ids -> [str | PIL image] in order."""
        parts = self.split(ids)
        codes = [c for kind, c in parts if kind == "image"]
        images = iter(self.decode_images(np.stack(codes)) if codes else [])
        return [self.decode_text(c) if kind == "text" else next(images) for kind, c in parts]
