"""Unified tokenization: a tokenizer directory as a library object, and the
`tokenize-images`, `tokenize` and `detokenize` stages.

A document becomes one 1-D uint32 array of unified ids (see mmtok/vocab.py):
text pieces, image blocks `<boi>` + codes + `<eoi>`, and a final `<eod>`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from mmtok.locks import exclusive
from mmtok.runner import (Item, Quarantined, Sample, StageError, Summary, check_paths, disk_full_resumes, progress_bar,
                          run_stage, run_stage_ranks)
from mmtok.shards import (MANIFEST, ShardError, ShardReader, ShardSample, atomic_write, content_hash, group_samples,
                          iter_tar, load_manifest, load_npy, npy_bytes)
from mmtok.shards import naming, remove_temps
from mmtok.vocab import VOCAB_FILE, Vocab, VocabError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff")


def image_alone(members: dict[str, bytes]) -> dict[str, bytes] | None:
    """A sample's image member as `{ext: bytes}`. Its `content_hash` names the image: the
    `sha256` of a stand-alone image sample, a document's image reference, `image_sha256`."""
    return next(({e: members[e]} for e in IMAGE_EXTS if e in members), None)


class Tokenizer:
    """A tokenizer directory loaded once: BPE + vocabulary (+ the VQ, loaded on first use)."""

    def __init__(self, tokdir: str | Path, device: str | None = None):
        import sentencepiece as spm

        self.dir = Path(tokdir)
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


# ---------------------------------------------------------------- stages

def _group(shard_name: str) -> str:
    return shard_name.rsplit("-", 1)[0]


def _keyed(dirs: list, i: int, key: str) -> str:
    return key if len(dirs) == 1 else f"{i}_{key}"


def _paths(dirs: list) -> list[str]:
    return [str(Path(d).resolve()) for d in dirs]


def _input_shards(shard_dirs: list) -> list[tuple[int, str | Path, dict]]:
    """Every input shard in reading order: (its directory's position, the directory, its
    manifest record). A share of the work on several processes is a run of this list."""
    return [(i, d, rec) for i, d in enumerate(shard_dirs) for rec in load_manifest(d)["shards"]]


def _samples(shard_dirs: list, start: int = 0, end: int | None = None) -> Iterator[tuple[int, str | Path, ShardSample]]:
    """(directory position, directory, sample) of the input shards `start:end`, in order."""
    for i, d, rec in _input_shards(shard_dirs)[start:end]:
        for item in group_samples(iter_tar(Path(d) / rec["name"])):
            if len(item) == 2:
                yield i, d, ShardSample(item[0], item[1], rec["name"])


def image_items(shard_dirs: list[str | Path], start: int = 0, end: int | None = None) -> Iterator[Item]:
    """One item per image or image-caption pair in the directories (in input shards `start:end`)."""
    for i, d, s in _samples(shard_dirs, start, end):
        image = image_alone(s.members)
        if image is not None:
            yield Item(f"{d}/{s.shard}:{s.key}", (_keyed(shard_dirs, i, s.key), image))


def _run(stage: str, shard_dirs: list, items_of, fn, out, *, reads, rank: int, world_size: int, **kwargs) -> Summary:
    """run_stage over every input shard, or over this rank's share when `world_size` > 1
    (`run_stage_ranks`: rank 0 then joins the shares into the output one process writes).
    `reads(group)`: whether the stage reads that group's samples (the shares' weights)."""
    if world_size == 1:
        return run_stage(stage, items_of(0, None), fn, out, **kwargs)
    weights = [rec["samples"] if reads(_group(rec["name"])) else 0 for _, _, rec in _input_shards(shard_dirs)]
    return run_stage_ranks(stage, items_of, fn, out, weights=weights, rank=rank, world_size=world_size, **kwargs)


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def tokenize_images(shard_dirs: list[str | Path], tok: Tokenizer, out: str | Path, *, batch_size: int = 32,
                    workers: int = 1, backend: str = "local", max_error_rate: float = 0.05, progress: bool = True,
                    overwrite: bool = False, rank: int = 0, world_size: int = 1) -> Summary | None:
    """Encode every image into its VQ codes: group `codes`, member `npy` (uint16 [tokens_per_image]).
    With `world_size` > 1 (torchrun ranks) each rank encodes its share of the input shards;
    the output is the one-process output, returned by rank 0 (None on the others)."""
    res = tok.resolution
    dtype = np.uint16 if tok.vocab.n_image_codes <= 1 << 16 else np.uint32
    grid = tok.vq.cfg.grid

    def load(payload):
        key, image = payload
        try:
            return key, content_hash(image), tok.preprocess(next(iter(image.values())))
        except Exception as e:  # any decoder failure is a bad input
            return Quarantined("", f"image does not decode ({type(e).__name__}: {e})")

    def encode(values):
        codes = tok.encode_images(np.stack([v[2] for v in values]), batch_size)
        out = []
        for (key, image_sha, _), c in zip(values, codes):
            payload = npy_bytes(c.astype(dtype))
            meta = {"modality": "image_codes", "source": key, "image_sha256": image_sha, "grid": [grid, grid],
                    "sha256": content_hash({"npy": payload})}
            out.append([Sample(key, "codes", {"npy": payload}, meta, {"image_sha256": image_sha, "source_key": key})])
        return out

    config = {"tokenizer": tok.fingerprint(), "resolution": res, "inputs": _paths(shard_dirs),
              "vocab": tok.vocab.to_dict()}
    total = sum(r["samples"] for d in shard_dirs for r in load_manifest(d)["shards"] if _group(r["name"]).startswith(("image-", "pair-")))
    return _run("tokenize-images", shard_dirs, lambda a, b: image_items(shard_dirs, a, b), load, out,
                reads=lambda g: g.startswith(("image-", "pair-")), rank=rank, world_size=world_size,
                config=config, workers=workers, backend=backend, batch_fn=encode, batch_size=batch_size,
                max_error_rate=max_error_rate, total=total, progress=progress, overwrite=overwrite)


@dataclass
class _Image:
    """An image inside a document before encoding: preprocessed pixels, or known codes."""

    pixels: np.ndarray | None = None
    codes: np.ndarray | None = None


class _Codes:
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
                raise VocabError(f"--codes {d} was made with a different tokenizer than {tok.dir}; "
                                 "rerun tokenize-images with this tokenizer or leave out --codes")
            index = reader.index()
            rows = index.select(["image_sha256", "shard", "members"]).to_pylist() if index.num_rows else []
            for r in rows:
                m = next(m for m in r["members"] if m["ext"] == "npy")
                self.where.setdefault(r["image_sha256"], (reader, r["shard"], m))
            self.readers.append(reader)
        self.n_codes, self.per_image = tok.vocab.n_image_codes, tok.vocab.image_tokens_per_image

    def get(self, image_sha: str) -> np.ndarray | None:
        """The image's codes; raises _Bad (a quarantine record naming the codes shard) on codes
        that do not fit the codebook: an edited or damaged codes directory, never silently used."""
        hit = self.where.get(image_sha)
        if hit is None:
            return None
        reader, shard, m = hit
        where = f"--codes {reader.directory / shard}"
        try:
            codes = load_npy(reader.read_member(shard, m["offset"], m["size"]))
        except (ValueError, ShardError) as e:
            raise _Bad(f"{where}: unreadable codes of image {image_sha[:12]} ({e}); rerun tokenize-images") from None
        if codes.shape != (self.per_image,) or codes.dtype.kind not in "iu":
            raise _Bad(f"{where}: codes of image {image_sha[:12]} are {codes.dtype} {codes.shape}, expected "
                       f"{self.per_image} integer codes; rerun tokenize-images")
        codes = codes.astype(np.int64)
        if len(codes) and (codes.min() < 0 or codes.max() >= self.n_codes):
            raise _Bad(f"{where}: codes of image {image_sha[:12]} outside the codebook [0, {self.n_codes}) "
                       f"(found {codes.min()}..{codes.max()}); rerun tokenize-images")
        return codes


def _doc_images(reader: ShardReader) -> dict[str, tuple[str, int, int]]:
    """sha256 -> (shard, ext, offset, size) of each image sample's image member."""
    rows = reader.index().select(["sha256", "shard", "members"]).to_pylist()
    out = {}
    for r in rows:
        m = next((m for m in r["members"] if m["ext"] in IMAGE_EXTS), None)
        if m is not None and r["sha256"]:
            out.setdefault(r["sha256"], (r["shard"], m["ext"], m["offset"], m["size"]))
    return out


def pair_image_first(seed: int, key: str) -> bool:
    """Image-first for half the pairs, a pure function of (seed, key)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()[0] & 1 == 1


def _tokenized(group: str) -> bool:
    """Whether `tokenize` reads a group (other modalities are left out and counted)."""
    return group in ("text", "doc") or group.startswith(("pair-", "image-"))


def tokenize_items(shard_dirs: list[str | Path], start: int = 0, end: int | None = None) -> Iterator[Item]:
    """Text, pairs, docs and stand-alone images (in input shards `start:end`)."""
    for i, d, s in _samples(shard_dirs, start, end):
        group, name, key = _group(s.shard), f"{d}/{s.shard}:{s.key}", _keyed(shard_dirs, i, s.key)
        if group == "text":
            yield Item(name, ("text", key, i, s.members.get("txt", b"")))
        elif group.startswith("pair-"):
            yield Item(name, ("pair", key, i, (image_alone(s.members), s.members.get("txt", b""))))
        elif group == "doc":
            yield Item(name, ("doc", key, i, s.meta.get("segments")))
        elif group.startswith("image-") and s.meta.get("role") != "doc_image":
            yield Item(name, ("image", key, i, image_alone(s.members)))


def tokenize(shard_dirs: list[str | Path], tok: Tokenizer, out: str | Path, *,
             codes_dir: str | Path | list[str | Path] | None = None,
             seed: int = 0, batch_size: int = 32, workers: int = 1, backend: str = "local",
             max_error_rate: float = 0.05, progress: bool = True, overwrite: bool = False, rank: int = 0,
             world_size: int = 1) -> tuple[Summary | None, dict]:
    """Write token shards (docs/FORMATS.md, "Token shards"); returns the summary and the
    count of samples of other modalities that were left out. `codes_dir`: one or several
    `tokenize-images` outputs, read where they are. `rank`, `world_size`: as tokenize_images."""
    codes_dirs = [codes_dir] if isinstance(codes_dir, (str, Path)) else list(codes_dir or [])
    codes = _Codes(codes_dirs, tok) if codes_dirs else None
    readers = [ShardReader(d) for d in shard_dirs]
    doc_images = [_doc_images(r) if any(_group(s["name"]) == "doc" for s in r.manifest["shards"]) else {} for r in readers]
    v = tok.vocab
    if tok.has_vq:
        _ = tok.vq  # load and check it once, before workers fork

    def text_of(raw: bytes) -> np.ndarray:
        try:
            return tok.encode_text(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _Bad(f"text is not valid UTF-8 (byte {e.start}: {e.reason})") from None

    def image_of(image: dict[str, bytes] | None) -> _Image:
        if image is None:
            raise _Bad("sample has no image member")
        if not tok.has_vq:
            raise _Bad(f"{tok.dir} has no image tokenizer; run `mmtok train-vq` into it first")
        known = codes.get(content_hash(image)) if codes else None
        if known is not None:
            return _Image(codes=known)
        try:
            return _Image(pixels=tok.preprocess(next(iter(image.values()))))
        except Exception as e:  # any decoder failure is a bad input
            raise _Bad(f"image does not decode ({type(e).__name__}: {e})") from None

    def prepare(payload):
        kind, key, src, body = payload
        try:
            if kind == "text":
                parts = [text_of(body)]
            elif kind == "image":
                parts = [image_of(body)]
            elif kind == "pair":
                parts = [image_of(body[0]), text_of(body[1])]
                if not pair_image_first(seed, key):
                    parts.reverse()
            else:
                parts = [_doc_part(seg, src) for seg in _segments(body)]
        except _Bad as e:
            return Quarantined("", str(e))
        return kind, key, parts

    def _doc_part(seg: dict, src: int):
        if "text" in seg:
            return tok.encode_text(seg["text"])
        loc = doc_images[src].get(seg["image"])
        if loc is None:
            raise _Bad(f"document image {seg['image']} not found in {shard_dirs[src]}/index.parquet")
        shard, ext, offset, size = loc
        return image_of({ext: readers[src].read_member(shard, offset, size)})

    def assemble(values):
        pending = [p for _, _, parts in values for p in parts if isinstance(p, _Image) and p.codes is None]
        if pending:
            for p, c in zip(pending, tok.encode_images(np.stack([p.pixels for p in pending]), batch_size)):
                p.codes = c
        out = []
        for kind, key, parts in values:
            seq = [tok.image_block(p.codes) if isinstance(p, _Image) else p for p in parts]
            ids = np.concatenate(seq + [np.asarray([tok.eod], np.uint32)]).astype(np.uint32)
            payload = npy_bytes(ids)
            n_image = int(v.is_image(ids).sum())
            counts = {"n_tokens": len(ids), "n_text": len(ids) - n_image, "n_image": n_image}
            meta = {"modality": kind, "source": key, **counts, "images": sum(isinstance(p, _Image) for p in parts),
                    "sha256": content_hash({"npy": payload})}
            out.append([Sample(key, "tokens", {"npy": payload}, meta, {**counts, "source_key": key})])
        return out

    skipped: dict = {}
    for r in readers:
        for s in r.manifest["shards"]:
            if not _tokenized(_group(s["name"])):
                skipped[_group(s["name"])] = skipped.get(_group(s["name"]), 0) + s["samples"]
    config = {"vocab": v.to_dict(), "tokenizer": tok.fingerprint(), "seed": seed, "inputs": _paths(shard_dirs),
              # one directory as a string, as before several were allowed, so earlier outputs resume
              "codes": _paths(codes_dirs) if len(codes_dirs) > 1 else _paths(codes_dirs)[0] if codes_dirs else None}
    # stand-alone images are items too (a document's images are not: they go with their document)
    total = sum(s["samples"] for r in readers for s in r.manifest["shards"]
                if _group(s["name"]) in ("text", "doc") or _group(s["name"]).startswith("pair-"))
    total += sum(_standalone_images(r) for r in readers)
    summary = _run("tokenize", shard_dirs, lambda a, b: tokenize_items(shard_dirs, a, b), prepare, out,
                   reads=_tokenized, rank=rank, world_size=world_size, config=config, workers=workers,
                   backend=backend, batch_fn=assemble, batch_size=batch_size, max_error_rate=max_error_rate,
                   total=total, progress=progress, overwrite=overwrite)
    return summary, skipped


def _standalone_images(reader: ShardReader) -> int:
    """Image samples of a shard directory that are not a document's images. Only a directory
    with documents can hold those; their metadata (the `json` member, read by seek) says so."""
    shards = reader.manifest["shards"]
    n = sum(s["samples"] for s in shards if _group(s["name"]).startswith("image-"))
    if n and any(_group(s["name"]) == "doc" for s in shards):
        for r in reader.index().select(["shard", "group", "members"]).to_pylist():
            m = next((m for m in r["members"] if m["ext"] == "json"), None)
            if r["group"].startswith("image-") and m is not None:
                try:
                    meta = json.loads(reader.read_member(r["shard"], m["offset"], m["size"]))
                except (OSError, ValueError, ShardError):  # unreadable: the stage cannot read it either
                    meta = {"role": "doc_image"}
                n -= isinstance(meta, dict) and meta.get("role") == "doc_image"
    return n


class _Bad(Exception):
    """A bad input sample; becomes a quarantine record."""


def _segments(segments) -> list[dict]:
    if not isinstance(segments, list) or not all(isinstance(s, dict) and ("text" in s or "image" in s) for s in segments):
        raise _Bad("document json has no valid `segments` list of {text} / {image} entries")
    return segments


DETOKENIZE_FILE = "detokenize.json"
DETOKENIZE_LOG = "detokenize-files.jsonl"  # each document's file names, logged before they are written
_DOC_FILE = re.compile(r"^[^./][^/]*\.(json|txt|png)$")


def _written(out: Path) -> set[str]:
    """The files detokenize's log says it wrote in `out`: only these are ever replaced or
    deleted. A line cut short by a crash, or a name that is not a document file, is ignored."""
    path, names = out / DETOKENIZE_LOG, set()
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                names.update(n for n in json.loads(line)["files"] if isinstance(n, str) and _DOC_FILE.match(n))
            except (ValueError, KeyError, TypeError):
                continue
    return names


def _detokenize_job(out: Path, job: dict, overwrite: bool) -> set[str]:
    """Refuse an --out that holds a detokenize output of other tokens or another tokenizer
    (unless `overwrite`, which deletes the files that job logged, nothing else); record this
    job there. Returns the names of the files this job wrote before."""
    path, have = out / DETOKENIZE_FILE, None
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            have = {}
        differs = [k for k in ("tokens_manifest_sha256", "tokenizer") if have.get(k) != job[k]]
        if differs:
            if not overwrite:
                what = " and ".join({"tokens_manifest_sha256": f"other tokens ({have.get('tokens')})",
                                     "tokenizer": "another tokenizer"}[k] for k in differs)
                raise StageError(f"{out} holds a detokenize output made from {what}; "
                                 "use a new --out directory, or --overwrite to redo it")
            for name in _written(out):  # the other job's documents
                (out / name).unlink(missing_ok=True)
            (out / DETOKENIZE_LOG).unlink(missing_ok=True)
    written = _written(out)
    remove_temps(out, lambda n: n in written or n == DETOKENIZE_FILE)  # leftovers of a killed run
    if have != job:
        atomic_write(path, json.dumps(job, sort_keys=True, indent=1).encode())
    return written


def detokenize(token_dir: str | Path, tok: Tokenizer, out: str | Path, *, limit: int | None = None,
               overwrite: bool = False, progress: bool = True) -> dict:
    """Token shards -> per document `<key>-<n>.png` (its images, through the VQ decoder),
    `<key>.txt` (its text) and, last, `<key>.json` (segments). A document's file names are
    logged (DETOKENIZE_LOG) before its files are written, each atomically, `<key>.json`
    last: a logged `<key>.json` marks a finished document, which a rerun into the same
    `out` skips (`overwrite` redoes them). A file in the way that the log does not name is
    someone else's: the run stops rather than replace it."""
    check_paths([token_dir], out)
    reader = ShardReader(token_dir)
    have = reader.manifest.get("config", {}).get("vocab")
    if reader.manifest.get("stage") != "tokenize" or have is None:
        raise ValueError(f"{token_dir}: not a `mmtok tokenize` output")
    if have != tok.vocab.to_dict():
        raise VocabError(f"{token_dir} was tokenized with a different vocabulary than {tok.dir}")
    out = Path(out)
    job = {"format": "mmtok-detokenize/1", "tokens": str(Path(token_dir).resolve()),
           "tokens_manifest_sha256": hashlib.sha256((Path(token_dir) / MANIFEST).read_bytes()).hexdigest(),
           "tokenizer": tok.fingerprint()}
    with disk_full_resumes(out), exclusive(out):
        return _detokenize_docs(reader, tok, out, _detokenize_job(out, job, overwrite), limit, overwrite, progress)


def _detokenize_docs(reader: ShardReader, tok: Tokenizer, out: Path, written: set[str], limit: int | None,
                     overwrite: bool, progress: bool) -> dict:
    total = sum(s["samples"] for s in reader.manifest["shards"])
    total = total if limit is None else min(total, limit)
    docs = images = skipped = 0
    with progress_bar("detokenize", total, 0, progress) as bar, open(out / DETOKENIZE_LOG, "a") as log:
        for s in reader:
            if docs + skipped >= total:
                break
            if not overwrite and f"{s.key}.json" in written and (out / f"{s.key}.json").exists():
                skipped += 1
                bar.advance()
                continue
            segments, pngs = [], {}
            for part in tok.decode(load_npy(s.members["npy"])):
                if isinstance(part, str):
                    segments.append({"text": part})
                else:
                    name = f"{s.key}-{len(pngs)}.png"
                    buf = io.BytesIO()
                    part.save(buf, format="PNG")
                    pngs[name] = buf.getvalue()
                    segments.append({"image": name})
            names = [*pngs, f"{s.key}.txt", f"{s.key}.json"]
            theirs = [n for n in names if n not in written and (out / n).exists()]
            if theirs:
                raise StageError(f"{out / theirs[0]} is in the way: detokenize did not write it and will not "
                                 "replace it; move it elsewhere, or use a new --out")
            if not written.issuperset(names):
                with naming(out / DETOKENIZE_LOG):
                    log.write(json.dumps({"files": names}) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
                written.update(names)
            for name, data in pngs.items():
                atomic_write(out / name, data)
            # bytes, not text mode, so "\r\n" and other control characters come back exactly
            atomic_write(out / f"{s.key}.txt", "".join(p.get("text", "") for p in segments).encode("utf-8"))
            atomic_write(out / f"{s.key}.json",
                         json.dumps({"segments": segments}, ensure_ascii=False, indent=1).encode("utf-8"))
            docs, images = docs + 1, images + len(pngs)
            bar.advance()
    return {"out": str(out), "documents": docs, "images": images, "skipped": skipped}
