"""Token corpora and the resumable per-rank loader that reads a `balance-mix` plan.

`TokenCorpus` is one or more token shard directories seen as one table of documents
(global document id = row in the sources' index.parquet files, sources in order). The
planner reads only its counts; the loader reads token spans by seek.

`PlanLoader` yields, for one rank, one micro-batch per plan step. A plan is a list of
micro-batches in a global order that does not depend on the world size: rank r at step s
of a run that started at micro-batch g0 with world size W reads micro-batch
g0 + s*W + r. The loader's state is just the global index of the next step's first
micro-batch, so resuming (with worker processes, or at another world size) continues the
same order with nothing skipped or repeated.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

# the plan format lives in mmtok.plan; read_plan_meta stays importable from here for older callers
from mmtok.fs import RemotePath, as_location, join_location, read_parquet, read_range
from mmtok.plan import check_plan_arrays, read_plan
from mmtok.shards import INDEX, MANIFEST, ShardError, ShardReader, check_index, load_manifest, load_npy
from mmtok.vocab import Vocab, VocabError

STATE_FORMAT = "mmtok-planloader/1"
IGNORE_INDEX = -100


class TokenCorpus:
    """Documents of token shard directories (stage `tokenize`), addressed by global id."""

    def __init__(self, dirs: list[str | Path | RemotePath]):
        self.dirs = [as_location(d) for d in dirs]
        if not self.dirs:
            raise ValueError("no token shard directories given")
        self.vocab: Vocab | None = None
        # the full fingerprint of the tokenizer (BPE model and VQ included, Tokenizer.fingerprint);
        # None where no source records one (shards from before it was recorded)
        self.tokenizer, first_fp = None, None
        self.manifest_sha256, self._manifests, counts, n_image = [], [], [], []
        for d in self.dirs:
            manifest = load_manifest(d)
            self._manifests.append(manifest)  # the shards an index may name (`_load_locations`)
            config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
            vocab = config.get("vocab")
            if not isinstance(vocab, dict) or "image_range" not in vocab:
                raise ShardError(f"{d}: its manifest has no vocab; is it the output of `mmtok tokenize`?")
            try:
                vocab = Vocab.from_dict(vocab, f"{d / MANIFEST} (config.vocab)")
            except VocabError as e:
                raise ShardError(f"{e}; tokenize the source again with `mmtok tokenize`") from None
            if self.vocab is None:
                self.vocab = vocab
            elif vocab != self.vocab:
                raise ShardError(f"{d}: tokenized with another vocabulary than {self.dirs[0]}; tokenize all sources with one TOKDIR")
            fp = config.get("tokenizer")
            if fp and self.tokenizer is None:
                self.tokenizer, first_fp = fp, d
            elif fp and fp != self.tokenizer:
                raise ShardError(f"{d}: tokenized with another tokenizer than {first_fp} (same vocabulary, but another "
                                 "BPE model or VQ); tokenize all sources with one TOKDIR")
            self.manifest_sha256.append(hashlib.sha256((d / MANIFEST).read_bytes()).hexdigest())
            try:
                t = read_parquet(d / INDEX, columns=["n_tokens", "n_image"])
                counts.append(t.column("n_tokens").to_numpy().astype(np.int64))
                n_image.append(t.column("n_image").to_numpy().astype(np.int64))
            except (OSError, KeyError, ValueError) as e:
                hint = "" if manifest["stage"] == "tokenize" else \
                    f"; {d} is the output of `mmtok {manifest['stage']}`: give a `mmtok tokenize` output"
                raise ShardError(f"{d / INDEX}: unreadable or lacks n_tokens/n_image columns ({e}){hint}") from None
        self.n_docs = np.array([len(c) for c in counts], dtype=np.int64)
        self.first_doc = np.concatenate([[0], np.cumsum(self.n_docs)])
        self.n_tokens = np.concatenate(counts)
        self.n_image = np.concatenate(n_image)
        self.source = np.repeat(np.arange(len(self.dirs), dtype=np.int32), self.n_docs)
        self._locations = None
        self._files: dict[int, int] = {}
        self._pid = None

    def check(self) -> None:
        """Fail now, naming the shard, if a shard is missing or truncated."""
        for d in self.dirs:
            ShardReader(d).check()

    def _load_locations(self) -> None:
        import pyarrow.compute as pc

        shard_paths, shard_id, offset, size = [], [], [], []
        for d, manifest in zip(self.dirs, self._manifests):
            t = read_parquet(d / INDEX, columns=["shard", "members"])
            check_index(t, manifest, d / INDEX)
            enc = pc.dictionary_encode(t.column("shard")).combine_chunks()
            shard_id.append(enc.indices.to_numpy().astype(np.int32) + len(shard_paths))
            shard_paths += [d / s for s in enc.dictionary.to_pylist()]
            members = t.column("members").combine_chunks()
            flat = members.flatten()
            is_npy = pc.equal(flat.field("ext"), "npy").to_numpy(zero_copy_only=False)
            if is_npy.sum() != len(t):
                raise ShardError(f"{d / INDEX}: every document needs exactly one npy member")
            offset.append(flat.field("offset").to_numpy()[is_npy].astype(np.int64))
            size.append(flat.field("size").to_numpy()[is_npy].astype(np.int64))
        self._locations = (shard_paths, np.concatenate(shard_id), np.concatenate(offset), np.concatenate(size))

    def read(self, doc: int) -> np.ndarray:
        """The token ids of one document (uint32), read by seek."""
        if self._locations is None:
            self._load_locations()
        if self._pid != os.getpid():  # file handles never cross a fork (loader workers)
            self._files, self._pid = {}, os.getpid()
        paths, shard_id, offset, size = self._locations
        sid = int(shard_id[doc])
        data = self._read(paths[sid], sid, int(offset[doc]), int(size[doc]))
        try:
            if len(data) != size[doc]:
                raise ValueError("truncated")
            tokens = load_npy(data)
            if tokens.ndim != 1 or tokens.dtype.kind != "u" or len(tokens) != self.n_tokens[doc]:
                raise ValueError(f"expected {self.n_tokens[doc]} uint32 ids, found {tokens.dtype} {tokens.shape}")
        except ValueError as e:
            raise ShardError(f"{paths[sid]}: document {doc - self.first_doc[self.source[doc]]} has a corrupt npy member ({e})") from None
        return tokens

    def _read(self, path: Path | RemotePath, sid: int, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of a shard: a pread on a file kept open, or one range
        request at a URL."""
        if isinstance(path, RemotePath):
            try:
                return read_range(path, offset, size)
            except OSError as e:
                raise ShardError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        fd = self._files.get(sid)
        if fd is None:
            try:
                fd = self._files[sid] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise ShardError(f"{path}: cannot open ({e.strerror})") from None
        return os.pread(fd, size, offset)

    def close(self) -> None:
        """Close the shard files this process opened (a forked child's copies are not its own)."""
        if getattr(self, "_pid", None) == os.getpid():  # (also when __init__ stopped early)
            for fd in self._files.values():
                os.close(fd)
        self._files = {}

    __del__ = close  # a process that builds many corpora (evaluate, a harness) keeps no descriptors

    def __getstate__(self):
        return {**self.__dict__, "_files": {}, "_pid": None}


class _MicroBatches:
    """Map-style dataset: item i is the batch of global micro-batch indices[i]."""

    def __init__(self, plan: dict, arrays: dict, corpus: TokenCorpus, indices: range):
        self.arrays, self.corpus, self.indices = arrays, corpus, indices
        self.n_microbatches = plan["microbatches"]
        self.seq_len, self.micro_batch = plan["seq_len"], plan["micro_batch"]
        self.vocab = plan["vocab"]
        self.pad_id = plan["vocab"].specials.get("<pad>", 0)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        import torch

        m = self.indices[i] % self.n_microbatches
        a = self.arrays
        p0, p1 = int(a["mb_ptr"][m]), int(a["mb_ptr"][m + 1])
        shape = (self.micro_batch, self.seq_len)
        ids = np.full(shape, self.pad_id, dtype=np.int64)
        targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        doc_ids = np.zeros(shape, dtype=np.int32)
        positions = np.zeros(shape, dtype=np.int32)
        cursor = [0] * self.micro_batch
        segment = [0] * self.micro_batch
        for p in range(p0, p1):
            doc, start, n, s = (int(a[k][p]) for k in ("piece_doc", "piece_start", "piece_len", "piece_seq"))
            tokens = self.corpus.read(doc)
            c = cursor[s]
            ids[s, c:c + n] = tokens[start:start + n]
            # the next token of the document is the target, also past a split; none after its end
            nxt = tokens[start + 1:start + n + 1]
            targets[s, c:c + len(nxt)] = nxt
            segment[s] += 1
            doc_ids[s, c:c + n] = segment[s]
            positions[s, c:c + n] = np.arange(n, dtype=np.int32)
            cursor[s] = c + n
        modality = self.vocab.is_image(ids).astype(np.uint8)
        return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(targets),
                "modality": torch.from_numpy(modality), "doc_ids": torch.from_numpy(doc_ids),
                "positions": torch.from_numpy(positions)}


class PlanLoader:
    """Batches for one rank of a plan: dicts of tensors shaped [micro_batch, seq_len].

    `input_ids`, `targets` (int64; -100 for padding and after a document's last token),
    `modality` (uint8, 1 for image codes), `doc_ids` (int32 segment id from 1, 0 for
    padding) and `positions` (int32, position inside the segment). `num_workers` > 0 reads
    in torch DataLoader worker processes; the state counts only batches already yielded.
    With `loop`, the plan starts again after its last micro-batch (the position keeps
    counting, so micro-batch m of the plan is read at positions m, m + N, m + 2N, ...).
    """

    def __init__(self, plan_dir: str | Path, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 prefetch_factor: int = 2, loop: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.plan_dir = as_location(plan_dir)
        self.plan, self.arrays = read_plan(self.plan_dir)
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch_factor, self.loop = num_workers, prefetch_factor, loop
        self.vocab = self.plan["vocab"]
        self.seq_len, self.micro_batch = self.plan["seq_len"], self.plan["micro_batch"]
        self.n_microbatches = self.plan["microbatches"]
        self.corpus = TokenCorpus([join_location(self.plan_dir, s["path"]) for s in self.plan["sources"]])
        for s, sha, d in zip(self.plan["sources"], self.corpus.manifest_sha256, self.corpus.dirs):
            if sha != s["manifest_sha256"]:
                raise ShardError(f"{d}: its manifest changed since the plan was made; run `mmtok balance-mix` again")
        self.corpus.check()
        check_plan_arrays(self.plan, self.arrays, self.corpus.n_tokens, self.plan_dir)
        self._next = 0  # global index of the next step's first micro-batch

    def __len__(self) -> int:
        """Steps left (every rank gets the same number)."""
        return max(0, (self.n_microbatches - self._next) // self.world_size)

    def describe(self, world: int, grad_accum: int, start: int, end: int) -> str:
        """One line: how the plan's ranks and steps map to this run's processes, gradient
        accumulation and steps (any world size reads the plan's micro-batches in order)."""
        W, steps, n = self.plan["world_size"], self.plan["steps"], self.n_microbatches
        need = (end - start) * world * grad_accum
        line = (f"plan {self.plan_dir}: {W} rank(s) x {steps} steps = {n} micro-batches of {self.micro_batch} x "
                f"{self.seq_len} tokens; this run: {world} process(es) x grad-accum {grad_accum} x steps {start}..{end} "
                f"= {need} micro-batches from position {self._next}")
        left = n - self._next
        if self.loop and need > left:
            line += f", going through the plan again (--loop-plan) {(self._next + need) / n:.2f} times in all"
        elif need < left:
            line += f" ({left - need} left unread at the end)"
        if world * grad_accum != W:
            hint = (f"; pass --grad-accum {W // world} to match it" if W % world == 0 else
                    f"; no --grad-accum matches it on {world} process(es)")
            line += (f". Each step here averages {world * grad_accum} micro-batch(es), each step of the plan "
                     f"holds {W} (one per rank){hint}")
        return line

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "order": self.plan["order_sha256"], "next_microbatch": self._next}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a PlanLoader state: {state!r:.100}")
        if state["order"] != self.plan["order_sha256"]:
            raise ValueError(f"{self.plan_dir}: the loader state belongs to another plan order "
                             "(other sources, ratio, seq_len, micro_batch or seed)")
        self._next = int(state["next_microbatch"])

    def __iter__(self):
        # looping: a range far past the plan (positions are taken modulo its length); a range,
        # not an endless iterator, so that DataLoader workers can split it
        stop = self._next + self.world_size * 2**40 if self.loop else self.n_microbatches - self.world_size + 1
        indices = range(self._next + self.rank, stop + self.rank, self.world_size)
        data = _MicroBatches(self.plan, self.arrays, self.corpus, indices)
        if self.num_workers > 0:
            import torch.utils.data

            batches = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=self.num_workers,
                                                  prefetch_factor=self.prefetch_factor, persistent_workers=False)
        else:
            batches = (data[i] for i in range(len(data)))
        for batch in batches:
            self._next += self.world_size
            yield batch
