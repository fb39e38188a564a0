"""Input-read time of tokenize-images and tokenize: by index (image_sha256 column, read by
offset, no re-hashing) against the streamed path that shard directories made before the
column take (every tar streamed, every image hashed).

Builds a shard directory with the `shard` stage (texts, image-caption pairs of JPEGs),
copies it with the column dropped from index.parquet, and times iterating each stage's
items (the whole input side, nothing else) on both. `--codes`: tokenize's items when every
image's codes are known (the image bytes are then not read at all).

Run: .venv/bin/python benchmarks/bench_stage_inputs.py [--pairs 2000 --texts 20000 --px 256]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from benchutil import best_of
from mmtok.ingest import ShardFn, shard_items
from mmtok.runner import run_stage
from mmtok.shards import ShardReader
from mmtok.tokenize import IMAGE_SHA256, image_items, tokenize_items


def jpeg(seed: int, px: int) -> bytes:
    from PIL import Image

    r = random.Random(seed)
    img = Image.effect_noise((px, px), 40 + r.random() * 40).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--texts", type=int, default=10000)
    ap.add_argument("--px", type=int, default=256)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    raw = tmp / "raw"
    raw.mkdir()
    rows = [{"text": f"text sample {i} " * 20} for i in range(a.texts)]
    for i in range(a.pairs):
        (raw / f"{i}.jpg").write_bytes(jpeg(i, a.px))
        rows.append({"image": f"{i}.jpg", "caption": f"caption {i}"})
    (raw / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    new = tmp / "new"
    run_stage("shard", shard_items([str(raw / "c.jsonl")]), ShardFn(validate=False), new,
              config={"inputs": [str(raw / "c.jsonl")]}, progress=False, threads=True)
    old = tmp / "old"
    shutil.copytree(new, old)
    pq.write_table(pq.read_table(new / "index.parquet").drop([IMAGE_SHA256]), old / "index.parquet")
    known = set(ShardReader(new).index().column(IMAGE_SHA256).to_pylist()) - {None}

    def hashed(items):  # the join key each path ends with: the stage hashes where the index has none
        from mmtok.shards import content_hash
        for it in items:
            p = it.payload
            img = p if hasattr(p, "image_sha256") else p.image
            if img is not None:
                _ = img.image_sha256 or content_hash(img.image)

    res = {}
    for name, d in (("streamed", old), ("indexed", new)):
        res[f"tokenize-images {name}"] = best_of(lambda: hashed(image_items([d])), 3)
        res[f"tokenize {name}"] = best_of(lambda: hashed(tokenize_items([d])), 3)
    res["tokenize indexed --codes"] = best_of(lambda: hashed(tokenize_items([new], known=known.__contains__)), 3)
    for k, v in res.items():
        print(f"{k:28s} {v * 1000:8.1f} ms")
    print(f"tokenize-images: streamed / indexed = {res['tokenize-images streamed'] / res['tokenize-images indexed']:.2f}x")
    print(f"tokenize:        streamed / indexed = {res['tokenize streamed'] / res['tokenize indexed']:.2f}x, "
          f"with --codes {res['tokenize streamed'] / res['tokenize indexed --codes']:.2f}x")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
