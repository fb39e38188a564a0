"""`train-bpe`: a SentencePiece BPE over the text found in shard directories.

The model is a stock SentencePiece model (`bpe.model`) whose ids are shifted by
`n_specials` in the unified vocabulary. Options are chosen so that any UTF-8 text
round-trips exactly: identity normalisation, no whitespace cleanup or dummy prefix, and
byte fallback for characters outside the learned pieces. Digits are split.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import re
import time
from pathlib import Path
from typing import Iterator

from mmtok.fs import read_ranges
from mmtok.shards import ShardReader, atomic_write
from mmtok.vocab import Vocab

# Lines longer than this are cut for training (sentencepiece skips over-long sentences).
MAX_LINE_CHARS = 4096
# Peak trainer memory per byte of sampled text, measured with benchmarks/bench_bpe.py
# (max RSS of the bare trainer on 2-64 MB samples); a conservative round-up.
BYTES_OF_MEMORY_PER_TEXT_BYTE = 16
RANGES_PER_READ = 1024  # members read at once: bounded memory, and few round trips to a bucket
SP_BASE_MEMORY = 160 << 20


def iter_raw_texts(shard_dirs: list[str | Path]) -> Iterator[tuple[str, bytes]]:
    """(sample name, raw text) for each `txt` member (text samples, captions) and each text
    segment of a document. Members are sliced out of the tars by the offsets in
    index.parquet, which is several times faster than parsing every tar header; a shard at
    a URL is read the same way, a batch of ranges at a time."""
    for d in shard_dirs:
        reader = ShardReader(d)
        index = reader.index()
        if "members" not in index.column_names:
            continue  # an empty shard directory
        rows = index.select(["key", "shard", "group", "members"]).to_pylist()
        for shard, group_rows in itertools.groupby(rows, key=lambda r: r["shard"]):
            wanted = []  # (name, a document's json, (start, end))
            for r in group_rows:
                at = {x["ext"]: (x["offset"], x["offset"] + x["size"]) for x in r["members"]}
                doc = r["group"] == "doc" and "json" in at
                if doc or "txt" in at:
                    wanted.append((f"{d}/{shard}:{r['key']}", doc, at["json" if doc else "txt"]))
            for i in range(0, len(wanted), RANGES_PER_READ):
                batch = wanted[i:i + RANGES_PER_READ]
                for (name, doc, _), data in zip(batch, read_ranges(reader.directory / shard, [w[2] for w in batch])):
                    if not doc:
                        yield name, data
                        continue
                    for seg in json.loads(data).get("segments") or []:
                        if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                            yield name, seg["text"].encode("utf-8")


def training_lines(shard_dirs: list[str | Path], stats: dict) -> Iterator[str]:
    """The lines sentencepiece trains on; counts texts, lines, bytes and non-UTF-8 texts in `stats`."""
    for name, raw in iter_raw_texts(shard_dirs):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            stats["not_utf8"] += 1
            stats["not_utf8_examples"].append(name)
            continue
        stats["texts"] += 1
        for line in text.split("\n"):
            # sentencepiece skips over-long sentences: cut them instead
            for i in range(0, len(line), MAX_LINE_CHARS):
                stats["lines"] += 1
                yield line[i:i + MAX_LINE_CHARS]


def sp_options(n_text: int, input_sentence_size: int, threads: int) -> dict:
    """The SentencePiece trainer options (shared with the benchmark's bare baseline)."""
    return dict(
        model_type="bpe",
        vocab_size=n_text,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=MAX_LINE_CHARS * 4,
        num_threads=threads,
        minloglevel=2,  # the trainer's per-merge log lines would bury mmtok's own summary
    )


def memory_estimate(lines: int, nbytes: int, input_sentence_size: int) -> int:
    """Peak trainer memory in bytes for the sampled share of the corpus."""
    sampled = nbytes if lines <= input_sentence_size or not lines else nbytes * input_sentence_size // lines
    return SP_BASE_MEMORY + BYTES_OF_MEMORY_PER_TEXT_BYTE * sampled


def train_bpe(shard_dirs: list[str | Path], out: str | Path, *, vocab_size: int = 65536, image_codes: int = 8192,
              image_tokens_per_image: int = 1024, input_sentence_size: int = 10_000_000, seed: int = 0,
              threads: int | None = None, log=print) -> dict:
    """Train the BPE and write `bpe.model`, `bpe.vocab` and `vocab.json` into `out`."""
    import sentencepiece as spm

    t0 = time.perf_counter()
    out = Path(out)
    vq_config = out / "vq.json"
    if vq_config.exists():  # a VQ trained first decides the image side of the layout
        vq = json.loads(vq_config.read_text())
        if vq.get("kind"):  # an imported tokenizer (mmtok import-tokenizer) keeps its own vocabulary
            raise ValueError(f"{out} holds an imported tokenizer ({vq['kind']}); train into another --out")
        if vq["codebook_size"] != image_codes:
            raise ValueError(f"{out} holds a VQ with {vq['codebook_size']} codes; use --image-codes "
                             f"{vq['codebook_size']} or another --out")
        image_tokens_per_image = (vq["resolution"] // vq["downsample"]) ** 2
    vocab = Vocab.layout(vocab_size, image_codes, image_tokens_per_image)
    out.mkdir(parents=True, exist_ok=True)
    # a first cheap pass (no decoding) for the memory estimate shown before training
    n_lines = n_bytes = 0
    for _, raw in iter_raw_texts(shard_dirs):
        n_lines += raw.count(b"\n") + (not raw.endswith(b"\n"))
        n_bytes += len(raw)
    if not n_bytes:
        raise ValueError(f"no text found in {', '.join(map(str, shard_dirs))}: train-bpe needs text, pair or doc samples")
    est = memory_estimate(n_lines, n_bytes, input_sentence_size)
    log(f"training BPE on {min(n_lines, input_sentence_size):,} of {n_lines:,} lines ({n_bytes / 1e6:.1f} MB); "
        f"estimated peak memory {est / 2**30:.2f} GiB (lower with --input-sentence-size)")
    stats = {"texts": 0, "lines": 0, "not_utf8": 0, "not_utf8_examples": []}
    spm.set_random_generator_seed(seed)
    opts = sp_options(vocab.n_text, input_sentence_size, threads or os.cpu_count() or 1)
    # The model comes back in memory: with a model_prefix, sentencepiece would record that
    # (temporary) path in the model, and every run would get another tokenizer fingerprint.
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=training_lines(shard_dirs, stats), model_writer=model, **opts)
    except RuntimeError as e:
        m = re.search(r"value <= (\d+)", str(e))
        if m:
            most = int(m.group(1)) + vocab.n_specials + image_codes
            raise ValueError(f"the text in {', '.join(map(str, shard_dirs))} supports at most {m.group(1)} text "
                             f"pieces; use --vocab-size {most} or less, or give more text") from None
        raise ValueError(f"sentencepiece could not train: {e}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    atomic_write(out / "bpe.model", model.getvalue())
    atomic_write(out / "bpe.vocab", "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n"
                                            for i in range(sp.get_piece_size())).encode())
    if stats["not_utf8"]:
        log(f"skipped {stats['not_utf8']} texts that are not UTF-8 (e.g. {', '.join(stats['not_utf8_examples'][:3])})")
    vocab.save(out)
    return {"out": str(out), **{k: v for k, v in stats.items() if k != "not_utf8_examples"}, "bytes": n_bytes,
            "sampled_lines": min(stats["lines"], input_sentence_size), "memory_estimate_bytes": est, "vocab": vocab.to_dict(),
            "seconds": round(time.perf_counter() - t0, 3)}
