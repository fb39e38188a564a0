"""sha256 of every file the data stages write, for a before/after comparison of a refactor.

Builds a small corpus (texts, stand-alone images, image-caption pairs, an interleaved
document, a corrupt image), then runs through the CLI: `shard`, `train-bpe`, a tiny
random VQ, `tokenize-images` and `tokenize` (with and without `--codes`), each with
one and with two workers (threads and processes where the stage has them). Prints one
line per output file, `sha256  stage-dir/path`, and nothing else on stdout: run it before
and after a change and `diff` the two listings. Not a test: there is no golden list.

Left out of the listing: `_stage.json` (it fingerprints input mtimes, new on every run),
`.mmtok.lock` (a pid). index.parquet and the `_stats` records also get a sha256 of their rows (printed
as `rows:` / `rec:`) with the columns in `--ignore-columns` left out, so that a change
that only adds a column can be checked to keep every other one.

Run: .venv/bin/python benchmarks/data_stage_hashes.py /tmp/h4hashes [--ignore-columns image_sha256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

MMTOK = str(Path(sys.executable).with_name("mmtok"))


def _image(seed: int, fmt: str) -> bytes:
    import io

    from PIL import Image, ImageDraw

    r = random.Random(seed)
    img = Image.new("RGB", (40 + r.randrange(16), 40), tuple(r.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = r.randrange(20), r.randrange(20)
        d.ellipse((x, y, x + r.randrange(6, 20), y + r.randrange(6, 20)), fill=tuple(r.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_corpus(raw: Path) -> None:
    raw.mkdir(parents=True)
    r = random.Random(0)
    words = ["".join(r.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(r.randrange(2, 9))) for _ in range(400)]
    rows = [{"text": " ".join(r.choice(words) for _ in range(r.randrange(5, 40)))} for _ in range(300)]
    for i in range(24):
        ext = ("png", "jpg")[i % 2]
        (raw / f"img{i}.{ext}").write_bytes(_image(i, "PNG" if ext == "png" else "JPEG"))
        if i % 3:
            rows.append({"image": f"img{i}.{ext}", "caption": f"shapes number {i}"})
    (raw / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows.append({"image": "broken.png", "caption": "a broken image"})
    rows.append({"segments": [{"text": "Look: "}, {"image": "img0.png"}, {"text": " and "}, {"image": "img5.jpg"}]})
    (raw / "corpus.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    loose = raw / "loose"
    loose.mkdir()
    for i in range(6):
        (loose / f"solo{i}.png").write_bytes(_image(100 + i, "PNG"))


def make_vq(tok: Path) -> None:
    import torch

    from mmtok.vq import VQConfig, VQModel

    torch.manual_seed(0)
    VQModel(VQConfig(resolution=16, downsample=2, codebook_size=64, channels=8, res_blocks=1)).save(tok)


def mmtok(*args) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([MMTOK, *map(str, args), "--quiet"] if args[0] != "train-bpe" else [MMTOK, *map(str, args)],
                       env=env, capture_output=True, text=True)
    if r.returncode not in (0, 3):
        sys.exit(f"mmtok {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


def index_digest(path: Path, ignore: set[str]) -> str:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    cols = [c for c in t.column_names if c not in ignore]
    return hashlib.sha256(json.dumps({"columns": cols, "rows": t.select(cols).to_pylist()},
                                     sort_keys=True, default=str).encode()).hexdigest()


def _sha(p: Path) -> str:
    with open(p, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def listing(root: Path, ignore: set[str]) -> list[str]:
    lines = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or p.name in ("_stage.json", ".mmtok.lock") or rel.startswith("raw/"):
            continue
        lines.append(f"{_sha(p)}  {rel}")
        if p.name == "index.parquet":
            lines.append(f"rows:{index_digest(p, ignore)}  {rel}")
        elif "/_stats/" in f"/{rel}":  # a stats record carries its shard's index rows too
            st = json.loads(p.read_text())
            st["index"] = [{k: v for k, v in row.items() if k not in ignore} for row in st["index"]]
            lines.append(f"rec:{hashlib.sha256(json.dumps(st, sort_keys=True).encode()).hexdigest()}  {rel}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--ignore-columns", nargs="*", default=[])
    a = ap.parse_args()
    shutil.rmtree(a.root, ignore_errors=True)
    raw = a.root / "raw"
    make_corpus(raw)
    inputs = [raw / "corpus.jsonl", raw / "loose"]
    for w in (1, 2):
        mmtok("shard", *inputs, "--out", a.root / f"shards-w{w}", "--workers", w, "--max-count", 40)
    shards = a.root / "shards-w1"
    tok = a.root / "tok"
    mmtok("train-bpe", shards, "--out", tok, "--vocab-size", 800, "--image-codes", 64, "--resolution", 16,
          "--downsample", 2)
    make_vq(tok)
    for w in (1, 2):
        mmtok("tokenize-images", shards, "--tokenizer", tok, "--out", a.root / f"codes-w{w}", "--workers", w,
              "--batch-size", 5, "--device", "cpu")
        mmtok("tokenize", shards, "--tokenizer", tok, "--out", a.root / f"tokens-w{w}", "--workers", w,
              "--batch-size", 7, "--device", "cpu")
        mmtok("tokenize", shards, "--tokenizer", tok, "--codes", a.root / "codes-w1", "--out",
              a.root / f"tokens-codes-w{w}", "--workers", w, "--device", "cpu")
    print("\n".join(listing(a.root, set(a.ignore_columns))))


if __name__ == "__main__":
    main()
