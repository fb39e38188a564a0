"""Uni-MoE training data: modality-to-text pairs joined from mmtok's own shards, and a
resumable loader of batches for `mmtok.trainer.unimoe.UniMoE`.

Where each modality comes from (joined with its text by the `parent` key, in the shard
directories the features were extracted from, which their manifest names):

    speech  `extract-audio` output (`whisper.npy`)  + the `audio_pair-*` transcript
    audio   `extract-audio` output (`fbank.npy`)    + the `audio_pair-*` caption
    video   `extract-keyframes` output (frames of one `parent`, by timestamp) + the `video_pair-*` caption
    image   `pair-*` samples of a `mmtok shard` directory (image and caption in one sample)

Features are read by seek when a batch needs them (the index keeps every member's offset),
so a corpus never has to fit in memory. A pair goes to the held-out split when a hash of
its key says so: the split is stable whatever else is in the corpus.

A sequence is `<bos> <open> <pad> x queries <close> text <eod>`; only the text and `<eod>`
are predicted (text given the modality).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from mmtok.trainer.unimoe import MODALITIES, SPAN_SPECIALS, UniMoEConfig

from mmtok.shards import ShardError, ShardReader, load_manifest, load_npy
from mmtok.tokenize import IMAGE_EXTS

STATE_FORMAT = "mmtok-unimoe-loader/1"


@dataclass
class Pair:
    key: str
    modality: str
    text: str
    members: list  # [(reader, shard, offset, size)] of the feature member(s), in order


def heldout(key: str, fraction: float) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8 < fraction


def _locs(reader: ShardReader, want: tuple[str, ...]):
    """key -> (shard, ext, offset, size, row) for the first member of `want` each sample has."""
    cols = reader.index().to_pylist()
    for row in cols:
        ext = next((m for m in row["members"] if m["ext"] in want), None)
        if ext:
            yield row["key"], (row["shard"], ext["ext"], ext["offset"], ext["size"], row)


def _texts(dirs: list) -> dict[str, str]:
    """Every sample key with a `txt` member in `dirs` -> its text."""
    out = {}
    for d in dirs:
        reader = ShardReader(d)
        for key, (shard, _, off, size, _) in _locs(reader, ("txt",)):
            out[key] = reader.read_member(shard, off, size).decode("utf-8", "replace").strip()
    return out


def _source_dirs(features_dir, texts: list) -> list:
    """Where a feature/frame directory's texts are: `texts` when given, else the shard
    directories it was extracted from (its manifest's `inputs`)."""
    if texts:
        return list(texts)
    inputs = load_manifest(features_dir).get("config", {}).get("inputs", [])
    found = [p for p in (Path(i) for i in inputs) if (p / "manifest.json").exists()]
    if not found:
        raise ShardError(f"{features_dir}: cannot find the shard directories it was extracted from ({inputs}); "
                         "give them with --texts")
    return found


def join_pairs(*, texts: list = (), speech: list = (), audio: list = (), video: list = (), image: list = ()) -> list[Pair]:
    """Pairs of every modality given, sorted by (modality, key). A feature or frame sample
    is joined with the `txt` of its `parent` in the shard directories it was extracted
    from (or in `texts`); image pairs are `pair-*` samples (image and caption together)."""
    pairs: list[Pair] = []
    for modality, dirs, member in (("speech", speech, "whisper.npy"), ("audio", audio, "fbank.npy")):
        for d in dirs:
            captions, reader = _texts(_source_dirs(d, texts)), ShardReader(d)
            found = 0
            for key, (shard, _, off, size, row) in _locs(reader, (member,)):
                found += 1
                if row.get("parent") in captions:
                    pairs.append(Pair(key, modality, captions[row["parent"]], [(reader, shard, off, size)]))
            if not found and len(reader.index()):
                raise ShardError(f"{d}: no {member} members; run `mmtok extract-audio` with that feature for {modality}")
    for d in video:
        captions, reader = _texts(_source_dirs(d, texts)), ShardReader(d)
        frames: dict[str, list] = {}
        for key, (shard, _, off, size, row) in _locs(reader, IMAGE_EXTS):
            if row.get("parent"):
                frames.setdefault(row["parent"], []).append((row.get("timestamp") or 0.0, key, (reader, shard, off, size)))
        for parent, fs in frames.items():
            if parent in captions:
                pairs.append(Pair(parent, "video", captions[parent], [f[2] for f in sorted(fs, key=lambda f: f[:2])]))
    for d in image:
        captions, reader = _texts([d]), ShardReader(d)
        for key, (shard, _, off, size, row) in _locs(reader, IMAGE_EXTS):
            if row["group"].startswith("pair-") and key in captions:
                pairs.append(Pair(key, "image", captions[key], [(reader, shard, off, size)]))
    return sorted(pairs, key=lambda p: (MODALITIES.index(p.modality), p.key))


def image_array(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> float32 (3, size, size) in [-1, 1], upright (EXIF), 16-bit greys scaled.
    Refuses decompression bombs and extreme aspect ratios."""
    from PIL import Image

    from mmtok.images import rgb_image

    im = rgb_image(data).resize((size, size), Image.BILINEAR)
    return np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def load_feature(pair: Pair, cfg: UniMoEConfig) -> np.ndarray:
    raw = [reader.read_member(shard, off, size) for reader, shard, off, size in pair.members]
    if pair.modality in ("speech", "audio"):
        x = load_npy(raw[0]).astype(np.float32)
        want = (cfg.n_mels, 3000) if pair.modality == "speech" else (cfg.fbank_bins,)
        if x.shape[-len(want):] != want:
            raise ValueError(f"{pair.members[0][0].directory}/{pair.members[0][1]} {pair.key}: {pair.modality} features of "
                             f"shape {x.shape}, the model expects (..., {', '.join(map(str, want))}); extract them with "
                             "matching --n-mels or set the model's n_mels")
        return x
    try:
        if pair.modality == "image":
            return image_array(raw[0], cfg.image_size)
        idx = np.linspace(0, len(raw) - 1, cfg.frames).round().astype(int)  # exactly cfg.frames frames
        return np.stack([image_array(raw[i], cfg.image_size) for i in idx])
    except ValueError as e:
        raise ValueError(f"{pair.members[0][0].directory} {pair.key}: {pair.modality} image: {e}; "
                         "reshard it with validation (`mmtok shard`, the default) to quarantine such images") from None


def sequence(text_ids: np.ndarray, modality: str, cfg: UniMoEConfig, specials: dict) -> tuple[np.ndarray, np.ndarray]:
    """(ids, targets) of one pair; the placeholder span starts at position 2."""
    open_, close = (specials[s] for s in SPAN_SPECIALS[modality])
    head = [specials["<bos>"], open_] + [specials["<pad>"]] * cfg.queries + [close]
    text = list(text_ids[: cfg.max_seq_len - len(head) - 1]) + [specials["<eod>"]]
    ids = np.asarray(head + text, np.int64)
    targets = np.full(len(ids), -100, np.int64)
    targets[len(head) - 1:-1] = ids[len(head):]
    return ids, targets


def collate(examples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], cfg: UniMoEConfig) -> dict:
    """(modality, feature, ids, targets) examples -> one batch for UniMoE.forward."""
    b, t = len(examples), max(len(e[2]) for e in examples)
    batch = {"input_ids": torch.zeros(b, t, dtype=torch.long), "targets": torch.full((b, t), -100, dtype=torch.long),
             "doc_ids": torch.zeros(b, t, dtype=torch.int32), "positions": torch.zeros(b, t, dtype=torch.int32),
             "span": torch.full((b,), 2, dtype=torch.long),
             "sample_modality": torch.tensor([cfg.modalities.index(e[0]) for e in examples])}
    for i, (_, _, ids, targets) in enumerate(examples):
        n = len(ids)
        batch["input_ids"][i, :n], batch["targets"][i, :n] = torch.from_numpy(ids), torch.from_numpy(targets)
        batch["doc_ids"][i, :n] = 1
        batch["positions"][i, :n] = torch.arange(n, dtype=torch.int32)
    for m in cfg.modalities:
        rows = [i for i, e in enumerate(examples) if e[0] == m]
        batch[f"{m}_rows"] = torch.tensor(rows, dtype=torch.long)
        if not rows:
            continue
        feats = [examples[i][1] for i in rows]
        if m in ("speech", "audio"):  # pad chunks (speech) or frames (audio) to the longest
            longest = max(f.shape[0] for f in feats)
            out = np.zeros((len(feats), longest, *feats[0].shape[1:]), np.float32)
            for j, f in enumerate(feats):
                out[j, :len(f)] = f
            batch[m] = torch.from_numpy(out)
            batch["speech_chunks" if m == "speech" else "audio_frames"] = torch.tensor([len(f) for f in feats])
        else:
            batch[m] = torch.from_numpy(np.stack(feats))
    return batch


class UniMoELoader:
    """Batches of pairs, reshuffled each epoch from `seed`; endless. Each step takes the next
    `batch_size x world` pairs of the order and rank r gets the r-th `batch_size` of them.
    The state is the number of pairs all ranks have taken, the same on every rank, so a
    resumed run (at any world size) continues exactly where the order stopped."""

    def __init__(self, pairs: list[Pair], cfg: UniMoEConfig, tokenizer, batch_size: int, seed: int = 0,
                 modalities: tuple[str, ...] | None = None, rank: int = 0, world: int = 1):
        keep = modalities or cfg.modalities
        self.pairs = [p for p in pairs if p.modality in keep]
        if not self.pairs:
            raise ValueError(f"no pairs of {', '.join(keep)} to train on; give their feature and caption directories")
        self.cfg, self.tok, self.batch_size, self.seed = cfg, tokenizer, batch_size, seed
        self.rank, self.world = rank, world
        specials = tokenizer.vocab.specials
        self.sequences = [sequence(tokenizer.encode_text(p.text), p.modality, cfg, specials) for p in self.pairs]
        self.fingerprint = hashlib.sha256("\n".join(f"{p.modality}/{p.key}" for p in self.pairs).encode()).hexdigest()
        self._next = 0
        self._epoch, self._perm = -1, None

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "pairs": self.fingerprint, "seed": self.seed, "next": self._next}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a Uni-MoE loader state: {state!r:.100}")
        if state["pairs"] != self.fingerprint or state["seed"] != self.seed:
            raise ValueError("the checkpoint's loader read other pairs (or another seed); resume with the same data options")
        self._next = int(state["next"])

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch != epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        return self._perm

    def example(self, i: int) -> tuple:
        p = self.pairs[i]
        return (p.modality, load_feature(p, self.cfg), *self.sequences[i])

    def once(self):
        """Every pair exactly once, in order (for evaluation); the state is not touched."""
        for s in range(0, len(self.pairs), self.batch_size):
            yield collate([self.example(i) for i in range(s, min(s + self.batch_size, len(self.pairs)))], self.cfg)

    def __iter__(self):
        n = len(self.pairs)
        while True:
            first = self._next + self.rank * self.batch_size
            picks = [self._order((first + j) // n)[(first + j) % n] for j in range(self.batch_size)]
            batch = collate([self.example(i) for i in picks], self.cfg)
            self._next += self.batch_size * self.world
            yield batch
