"""The `tokenize-images`, `tokenize` and `detokenize` stages (the Tokenizer itself is in
mmtok/tokenizer.py, re-exported here).

Each stage is a picklable class (mmtok.runner.Stage): `items(start, end)` lists its input
samples, `__call__` prepares one in a worker (decode, preprocess, text ids) and `batch`
encodes a batch of them in this process (the VQ). Input samples are found through each
input directory's index.parquet and read by offset: an image's `image_sha256` column
(written by `mmtok shard` and `extract-keyframes`) is the key its codes are joined by, so
no image is re-hashed, tokenize-images never opens a text shard, and tokenize never reads an
image whose codes it already has. A directory whose index has no such column (made before
it) is streamed tar by tar and its images hashed, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mmtok.actors import spread
from mmtok.codes import BadCodes, Codes
from mmtok.runner import Item, Quarantined, Sample, Summary
from mmtok.fs import absolute, as_location
from mmtok.shards import ShardError, ShardReader, check_key, content_hash, load_manifest, npy_bytes
from mmtok.tars import group_samples, iter_tar
from mmtok.tokenizer import IMAGE_EXTS, StageRecipe, Tokenizer  # noqa: F401 (re-exported: callers import them here)

IMAGE_SHA256 = "image_sha256"  # index column: the image's own content_hash, its codes' join key


# ---------------------------------------------------------------- reading the inputs

def _group(shard_name: str) -> str:
    return shard_name.rsplit("-", 1)[0]


def _keyed(dirs: list, i: int, key: str) -> str:
    return key if len(dirs) == 1 else f"{i}_{key}"


def _paths(dirs: list) -> list[str]:
    return [absolute(d) for d in dirs]


def _input_shards(shard_dirs: list) -> list[tuple[int, str | Path, dict]]:
    """Every input shard in reading order: (its directory's position, the directory, its
    manifest record). A share of the work on several processes is a run of this list.
    Token and code directories are refused: they hold no sample these stages read."""
    out = []
    for i, d in enumerate(shard_dirs):
        manifest = load_manifest(d)
        if manifest["stage"] in ("tokenize", "tokenize-images"):
            raise ShardError(f"{d} is the output of `mmtok {manifest['stage']}`, not of `mmtok shard`: give the "
                             "shard directory it was made from")
        out += [(i, d, rec) for rec in manifest["shards"]]
    return out


@dataclass
class InputSample:
    """One input sample as a stage sees it: its members are read on demand (`read`), by
    offset where the index locates them, else from the tar stream that held it."""

    dir_pos: int  # the position of its directory among the inputs
    directory: str | Path
    shard: str
    key: str
    exts: tuple[str, ...]
    image_sha256: str | None = None  # from the index; None where the index has no column
    _locate: dict = field(default_factory=dict, repr=False)  # ext -> (offset, size) in `shard`
    _reader: ShardReader | None = field(default=None, repr=False)
    _members: dict | None = field(default=None, repr=False)  # the streamed sample's members

    @property
    def name(self) -> str:
        return f"{self.directory}/{self.shard}:{self.key}"

    def read(self, *exts: str) -> dict[str, bytes]:
        """The members named (those the sample has), in one read of the span they cover."""
        if self._members is not None:
            return {e: self._members[e] for e in exts if e in self._members}
        locs = {e: self._locate[e] for e in exts if e in self._locate}
        if not locs:
            return {}
        lo = min(o for o, _ in locs.values())
        hi = max(o + n for o, n in locs.values())
        span = self._reader.read_member(self.shard, lo, hi - lo)
        return {e: span[o - lo:o - lo + n] for e, (o, n) in locs.items()}

    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.exts), None)

    def image(self) -> dict[str, bytes] | None:
        """The image member as `{ext: bytes}` (image_alone's choice), or None."""
        ext = self.image_ext()
        return None if ext is None else self.read(ext)


def _indexed(reader: ShardReader) -> dict[str, list[dict]] | None:
    """The index rows of each shard in write order, or None for an index without the
    image_sha256 column (a directory written before it): that one is streamed."""
    index = reader.index()
    if IMAGE_SHA256 not in index.column_names:
        return None
    rows: dict[str, list[dict]] = {}
    for r in index.select(["key", "shard", "members", IMAGE_SHA256]).to_pylist():
        rows.setdefault(r["shard"], []).append(r)
    for shard_rows in rows.values():
        shard_rows.sort(key=lambda r: min((m["offset"] for m in r["members"]), default=0))
    return rows


def input_samples(shard_dirs: list, reads: Callable[[str], bool], start: int = 0,
                  end: int | None = None) -> Iterator[InputSample]:
    """The samples of the input shards `start:end` (of `_input_shards`) whose group `reads`
    accepts, in input order: by index where it has the image_sha256 column, else streamed."""
    readers: dict[int, tuple[ShardReader, dict | None]] = {}
    for i, d, rec in _input_shards(shard_dirs)[start:end]:
        if not reads(_group(rec["name"])):
            continue
        if i not in readers:
            reader = ShardReader(d)
            readers[i] = (reader, _indexed(reader))
        reader, rows = readers[i]
        if rows is None:
            for item in group_samples(iter_tar(as_location(d) / rec["name"])):
                if len(item) == 2:
                    check_key(item[0], as_location(d) / rec["name"])
                    yield InputSample(i, d, rec["name"], item[0], tuple(item[1]), _members=item[1])
            continue
        for r in rows.get(rec["name"], []):
            locate = {m["ext"]: (m["offset"], m["size"]) for m in r["members"]}
            yield InputSample(i, d, rec["name"], r["key"], tuple(locate), r[IMAGE_SHA256], locate, reader)


def _image_group(group: str) -> bool:
    return group.startswith(("image-", "pair-"))


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _run(stage, shard_dirs: list, out, **kwargs) -> Summary | None:
    """The stage on this process, on torchrun's ranks or on Ray actors (mmtok.actors.spread),
    its shares split by the samples of the input shards it reads."""
    weights = [rec["samples"] if stage.reads(_group(rec["name"])) else 0 for _, _, rec in _input_shards(shard_dirs)]
    return spread(stage, out, weights=weights, **kwargs)


# ---------------------------------------------------------------- tokenize-images

@dataclass
class ImageInput:
    """A tokenize-images item: an image (`{ext: bytes}`) and its hash (None: hash it)."""

    key: str
    image: dict[str, bytes]
    image_sha256: str | None = None


@dataclass
class _Pixels:
    key: str
    image_sha256: str
    pixels: np.ndarray


def image_items(shard_dirs: list[str | Path], start: int = 0, end: int | None = None) -> Iterator[Item]:
    """One item per image or image-caption pair in the directories (in input shards `start:end`)."""
    for s in input_samples(shard_dirs, _image_group, start, end):
        image = s.image()
        if image is not None:
            yield Item(s.name, ImageInput(_keyed(shard_dirs, s.dir_pos, s.key), image, s.image_sha256))


class ImageCodes:
    """The tokenize-images stage: codes of every image, group `codes`, member `npy`."""

    name = "tokenize-images"

    def __init__(self, shard_dirs: list, tok: Tokenizer, batch_size: int = 32):
        self.shard_dirs, self.tok, self.batch_size = list(shard_dirs), tok, batch_size
        self.recipe = StageRecipe(ImageCodes, tok.source, {"shard_dirs": self.shard_dirs, "batch_size": batch_size})
        self.dtype = np.uint16 if tok.vocab.n_image_codes <= 1 << 16 else np.uint32
        self.grid = tok.vq.cfg.grid
        self.config = {"tokenizer": tok.fingerprint(), "resolution": tok.resolution, "inputs": _paths(shard_dirs),
                       "vocab": tok.vocab.to_dict()}

    reads = staticmethod(_image_group)

    def items(self, start: int = 0, end: int | None = None) -> Iterator[Item]:
        return image_items(self.shard_dirs, start, end)

    def total(self) -> int:
        return sum(r["samples"] for _, _, r in _input_shards(self.shard_dirs) if self.reads(_group(r["name"])))

    def __call__(self, item: ImageInput) -> _Pixels | Quarantined:
        try:
            pixels = self.tok.preprocess(next(iter(item.image.values())))
        except Exception as e:  # any decoder failure is a bad input
            return Quarantined("", f"image does not decode ({type(e).__name__}: {e})")
        return _Pixels(item.key, item.image_sha256 or content_hash(item.image), pixels)

    def batch(self, values: list[_Pixels]) -> list[list[Sample]]:
        codes = self.tok.encode_images(np.stack([v.pixels for v in values]), self.batch_size)
        out = []
        for v, c in zip(values, codes):
            payload = npy_bytes(c.astype(self.dtype))
            meta = {"modality": "image_codes", "source": v.key, IMAGE_SHA256: v.image_sha256,
                    "grid": [self.grid, self.grid], "sha256": content_hash({"npy": payload})}
            out.append([Sample(v.key, "codes", {"npy": payload}, meta,
                               {IMAGE_SHA256: v.image_sha256, "source_key": v.key})])
        return out


def tokenize_images(shard_dirs: list[str | Path], tok: Tokenizer, out: str | Path, *, batch_size: int = 32,
                    workers: int = 1, backend: str = "local", actors: int | None = None, max_error_rate: float = 0.05,
                    progress: bool = True, overwrite: bool = False, rank: int = 0,
                    world_size: int = 1) -> Summary | None:
    """Encode every image into its VQ codes: group `codes`, member `npy` (uint16 [tokens_per_image]).
    With `world_size` > 1 (torchrun ranks) each rank encodes its share of the input shards;
    the output is the one-process output, returned by rank 0 (None on the others). With
    `backend="ray"`, `actors` Ray actors do the shares (default: one per GPU of the cluster)."""
    stage = ImageCodes(shard_dirs, tok, batch_size)
    return _run(stage, shard_dirs, out, rank=rank, world_size=world_size, workers=workers, backend=backend,
                actors=actors, max_error_rate=max_error_rate, total=stage.total(), progress=progress,
                overwrite=overwrite)


# ---------------------------------------------------------------- tokenize

@dataclass
class _Image:
    """An image inside a document before encoding: preprocessed pixels, or known codes."""

    pixels: np.ndarray | None = None
    codes: np.ndarray | None = None


@dataclass
class DocInput:
    """A tokenize item: one output document, by the modality it gets in the token shards."""

    modality: str  # "text" | "pair" | "image" | "doc"
    key: str
    dir_pos: int  # its input directory's position (a doc's images are found in that index)
    text: bytes = b""
    image: ImageInput | None = None  # `image.image` is None where its codes are already known
    segments: object = None  # a doc's `segments`, unchecked (the stage checks them)


@dataclass
class _Prepared:
    modality: str
    key: str
    parts: list  # text ids (np.ndarray) and _Image, in document order


def _doc_images(reader: ShardReader) -> dict[str, tuple]:
    """sha256 -> (shard, ext, offset, size, image_sha256 or None) of each image sample's image member."""
    index = reader.index()
    cols = ["sha256", "shard", "members"] + ([IMAGE_SHA256] if IMAGE_SHA256 in index.column_names else [])
    out = {}
    for r in index.select(cols).to_pylist():
        m = next((m for m in r["members"] if m["ext"] in IMAGE_EXTS), None)
        if m is not None and r["sha256"]:
            out.setdefault(r["sha256"], (r["shard"], m["ext"], m["offset"], m["size"], r.get(IMAGE_SHA256)))
    return out


def pair_image_first(seed: int, key: str) -> bool:
    """Image-first for half the pairs, a pure function of (seed, key)."""
    return hashlib.sha256(f"{seed}:{key}".encode()).digest()[0] & 1 == 1


def _tokenized(group: str) -> bool:
    """Whether `tokenize` reads a group (other modalities are left out and counted)."""
    return group in ("text", "doc") or group.startswith(("pair-", "image-"))


def _image_input(s: InputSample, key: str, members: dict[str, bytes]) -> ImageInput | None:
    ext = s.image_ext()
    return None if ext is None else ImageInput(key, {ext: members[ext]} if ext in members else None, s.image_sha256)


def tokenize_items(shard_dirs: list[str | Path], start: int = 0, end: int | None = None,
                   known: Callable[[str], bool] | None = None) -> Iterator[Item]:
    """Text, pairs, docs and stand-alone images (in input shards `start:end`). `known(sha)`:
    whether the codes of an image are known already; such an image's bytes are not read."""
    def wanted(s: InputSample) -> tuple[str, ...]:
        ext = s.image_ext()
        skip = ext is None or (s.image_sha256 is not None and known is not None and known(s.image_sha256))
        return () if skip else (ext,)

    for s in input_samples(shard_dirs, _tokenized, start, end):
        group, key = _group(s.shard), _keyed(shard_dirs, s.dir_pos, s.key)
        if group == "text":
            yield Item(s.name, DocInput("text", key, s.dir_pos, text=s.read("txt").get("txt", b"")))
        elif group.startswith("pair-"):
            m = s.read("txt", *wanted(s))
            yield Item(s.name, DocInput("pair", key, s.dir_pos, text=m.get("txt", b""), image=_image_input(s, key, m)))
        elif group == "doc":
            raw = s.read("json").get("json")
            yield Item(s.name, DocInput("doc", key, s.dir_pos, segments=(json.loads(raw) if raw else {}).get("segments")))
        elif group.startswith("image-"):
            m = s.read("json", *wanted(s))
            if (json.loads(m["json"]) if m.get("json") else {}).get("role") != "doc_image":
                yield Item(s.name, DocInput("image", key, s.dir_pos, image=_image_input(s, key, m)))


class Tokenize:
    """The tokenize stage: token shards, group `tokens`, member `npy` (docs/FORMATS.md)."""

    name = "tokenize"
    reads = staticmethod(_tokenized)

    def __init__(self, shard_dirs: list, tok: Tokenizer, codes_dirs: list, seed: int = 0, batch_size: int = 32):
        self.shard_dirs, self.tok, self.seed, self.batch_size = list(shard_dirs), tok, seed, batch_size
        self.recipe = StageRecipe(Tokenize, tok.source, {"shard_dirs": self.shard_dirs, "codes_dirs": list(codes_dirs),
                                                           "seed": seed, "batch_size": batch_size})
        self.codes = Codes(codes_dirs, tok) if codes_dirs else None
        self.readers = [ShardReader(d) for d in shard_dirs]
        self.doc_images = [_doc_images(r) if any(_group(s["name"]) == "doc" for s in r.manifest["shards"]) else {}
                           for r in self.readers]
        if tok.has_vq:
            _ = tok.vq  # load and check it once, before workers start
        self.config = {"vocab": tok.vocab.to_dict(), "tokenizer": tok.fingerprint(), "seed": seed,
                       "inputs": _paths(shard_dirs),
                       # one directory as a string, as before several were allowed, so earlier outputs resume
                       "codes": _paths(codes_dirs) if len(codes_dirs) > 1 else _paths(codes_dirs)[0] if codes_dirs else None}

    def items(self, start: int = 0, end: int | None = None) -> Iterator[Item]:
        known = None if self.codes is None else self.codes.where.__contains__
        return tokenize_items(self.shard_dirs, start, end, known)

    def total(self) -> int:
        # stand-alone images are items too (a document's images are not: they go with their document)
        total = sum(s["samples"] for r in self.readers for s in r.manifest["shards"]
                    if _group(s["name"]) in ("text", "doc") or _group(s["name"]).startswith("pair-"))
        return total + sum(_standalone_images(r) for r in self.readers)

    def skipped(self) -> dict:
        """Samples per group of the modalities tokenize leaves out."""
        out: dict = {}
        for r in self.readers:
            for s in r.manifest["shards"]:
                if not _tokenized(_group(s["name"])):
                    out[_group(s["name"])] = out.get(_group(s["name"]), 0) + s["samples"]
        return out

    def _text(self, raw: bytes) -> np.ndarray:
        try:
            return self.tok.encode_text(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise _Bad(f"text is not valid UTF-8 (byte {e.start}: {e.reason})") from None

    def _image(self, image: ImageInput | None) -> _Image:
        if image is None:
            raise _Bad("sample has no image member")
        if not self.tok.has_vq:
            raise _Bad(f"{self.tok.source} has no image tokenizer; run `mmtok train-vq` into it first")
        sha = image.image_sha256 or content_hash(image.image)
        known = self.codes.get(sha) if self.codes else None
        if known is not None:
            return _Image(codes=known)
        try:
            return _Image(pixels=self.tok.preprocess(next(iter(image.image.values()))))
        except Exception as e:  # any decoder failure is a bad input
            raise _Bad(f"image does not decode ({type(e).__name__}: {e})") from None

    def _doc_part(self, seg: dict, src: int):
        if "text" in seg:
            return self.tok.encode_text(seg["text"])
        loc = self.doc_images[src].get(seg["image"])
        if loc is None:
            raise _Bad(f"document image {seg['image']} not found in {self.shard_dirs[src]}/index.parquet")
        shard, ext, offset, size, sha = loc
        if sha is not None and self.codes is not None and sha in self.codes.where:
            return self._image(ImageInput("", None, sha))
        return self._image(ImageInput("", {ext: self.readers[src].read_member(shard, offset, size)}, sha))

    def __call__(self, d: DocInput) -> _Prepared | Quarantined:
        try:
            if d.modality == "text":
                parts = [self._text(d.text)]
            elif d.modality == "image":
                parts = [self._image(d.image)]
            elif d.modality == "pair":
                parts = [self._image(d.image), self._text(d.text)]
                if not pair_image_first(self.seed, d.key):
                    parts.reverse()
            else:
                parts = [self._doc_part(seg, d.dir_pos) for seg in _segments(d.segments)]
        except (_Bad, BadCodes) as e:
            return Quarantined("", str(e))
        return _Prepared(d.modality, d.key, parts)

    def batch(self, values: list[_Prepared]) -> list[list[Sample]]:
        tok, v = self.tok, self.tok.vocab
        pending = [p for x in values for p in x.parts if isinstance(p, _Image) and p.codes is None]
        if pending:
            for p, c in zip(pending, tok.encode_images(np.stack([p.pixels for p in pending]), self.batch_size)):
                p.codes = c
        out = []
        for x in values:
            seq = [tok.image_block(p.codes) if isinstance(p, _Image) else p for p in x.parts]
            ids = np.concatenate(seq + [np.asarray([tok.eod], np.uint32)]).astype(np.uint32)
            payload = npy_bytes(ids)
            n_image = int(v.is_image(ids).sum())
            counts = {"n_tokens": len(ids), "n_text": len(ids) - n_image, "n_image": n_image}
            meta = {"modality": x.modality, "source": x.key, **counts,
                    "images": sum(isinstance(p, _Image) for p in x.parts), "sha256": content_hash({"npy": payload})}
            out.append([Sample(x.key, "tokens", {"npy": payload}, meta, {**counts, "source_key": x.key})])
        return out


def tokenize(shard_dirs: list[str | Path], tok: Tokenizer, out: str | Path, *,
             codes_dir: str | Path | list[str | Path] | None = None,
             seed: int = 0, batch_size: int = 32, workers: int = 1, backend: str = "local",
             actors: int | None = None, max_error_rate: float = 0.05, progress: bool = True,
             overwrite: bool = False, rank: int = 0, world_size: int = 1) -> tuple[Summary | None, dict]:
    """Write token shards (docs/FORMATS.md, "Token shards"); returns the summary and the
    count of samples of other modalities that were left out. `codes_dir`: one or several
    `tokenize-images` outputs, read where they are. `rank`, `world_size`, `backend`,
    `actors`: as tokenize_images."""
    codes_dirs = [codes_dir] if isinstance(codes_dir, (str, Path)) else list(codes_dir or [])
    stage = Tokenize(shard_dirs, tok, codes_dirs, seed, batch_size)
    summary = _run(stage, shard_dirs, out, rank=rank, world_size=world_size, workers=workers, backend=backend,
                   actors=actors, max_error_rate=max_error_rate, total=stage.total(), progress=progress,
                   overwrite=overwrite)
    return summary, stage.skipped()


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
