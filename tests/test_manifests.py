"""Manifests as the field writes them: LAION metadata, img2dataset's output folder (its
webdataset and parquet formats) and column mapping (`--image-col`, `--text-col`, ...)."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from mmtok.cli.app import app
from mmtok.demo import draw_shape
from mmtok.shards import ShardReader

runner = CliRunner()


def jpeg(seed: int) -> bytes:
    b = io.BytesIO()
    draw_shape("circle", "red", "blue", size=40, seed=seed).save(b, "JPEG")
    return b.getvalue()


def shard(*args) -> object:
    return runner.invoke(app, ["shard", *map(str, args), "--quiet", "--json"])


def quarantine(out: Path) -> list[dict]:
    p = out / "quarantine.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def metas(out: Path) -> list[dict]:
    return [s.meta for s in ShardReader(out)]


def laion(path: Path) -> Path:
    pq.write_table(pa.Table.from_pylist([
        {"url": "https://example.com/a.jpg", "caption": "a cat", "key": "000000001", "similarity": 0.31},
        {"url": "http://example.com/b.png", "caption": "a dog", "key": "000000002", "similarity": 0.29},
        {"url": "s3://bucket/c.webp", "caption": "a bird", "key": "000000003", "similarity": 0.35},
    ]), path)
    return path


def img2dataset_folder(root: Path) -> Path:
    """img2dataset's webdataset output: 00000.tar (key.jpg, key.txt, key.json per fetched
    row), 00000.parquet (every row tried, with its status) and 00000_stats.json."""
    root.mkdir()
    rows = [
        {"key": "000000000", "url": "https://x.org/0.jpg", "caption": "first", "status": "success",
         "error_message": None, "width": 40, "height": 40},
        {"key": "000000001", "url": "https://x.org/1.jpg", "caption": "second", "status": "failed_to_download",
         "error_message": "HTTP Error 404: Not Found", "width": None, "height": None},
        {"key": "000000002", "url": "https://x.org/2.jpg", "caption": "third", "status": "success",
         "error_message": None, "width": 40, "height": 40},
    ]
    with tarfile.open(root / "00000.tar", "w") as t:
        for r in rows:
            if r["status"] != "success":
                continue
            for ext, data in (("jpg", jpeg(int(r["key"]))), ("txt", r["caption"].encode()),
                              ("json", json.dumps(r, indent=4).encode())):
                info = tarfile.TarInfo(f"{r['key']}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"count": 3, "successes": 2, "failed_to_download": 1,
                                                       "status_dict": {"success": 2, "HTTP Error 404": 1}}))
    return root


def test_laion_metadata_rows_are_urls_to_fetch_first(tmp_path):
    src = laion(tmp_path / "laion.parquet")
    for name, opts in (("mapped", ["--image-col", "url", "--text-col", "caption", "--key-col", "key"]),
                       ("defaults", [])):  # caption + url: LAION's layout, never read as captions alone
        out = tmp_path / name
        r = shard(src, "--out", out, "--max-error-rate", "1", *opts)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["samples"] == 0
        q = quarantine(out)
        assert len(q) == 3 and all("URL: fetch it first (img2dataset)" in x["reason"] for x in q)
        assert "s3://bucket/c.webp" in q[2]["reason"]
    assert [x["input"] for x in quarantine(tmp_path / "mapped")] == [f"{src}:00000000{i}" for i in (1, 2, 3)]
    assert [x["input"] for x in quarantine(tmp_path / "defaults")] == [f"{src}:{i}" for i in (1, 2, 3)]


def test_img2dataset_output_folder_read_as_it_is(tmp_path):
    src = img2dataset_folder(tmp_path / "i2d")
    out = tmp_path / "out"
    r = shard(src, "--out", out)  # default --max-error-rate: the failed download is no bad input
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["by_modality"] == {"pair": 2} and summary["error_rate"] == 0.0
    got = {m["source_meta"]["key"]: m for m in metas(out)}
    assert set(got) == {"000000000", "000000002"}
    assert got["000000002"]["source_meta"]["url"] == "https://x.org/2.jpg"
    pairs = {s.meta["source_meta"]["key"]: s.members for s in ShardReader(out)}
    assert pairs["000000000"]["jpg"] == jpeg(0) and pairs["000000000"]["txt"] == b"first"
    q = quarantine(out)  # the stats file is not an input; the failed row is recorded, not counted
    assert len(q) == 1 and q[0]["counts"] is False and q[0]["input"] == f"{src / '00000.parquet'}:000000001"
    assert "failed_to_download" in q[0]["reason"] and "404" in q[0]["reason"]


def test_img2dataset_parquet_format_images_in_the_table(tmp_path):
    root = tmp_path / "i2d"
    root.mkdir()
    pq.write_table(pa.Table.from_pylist([
        {"key": "000000000", "jpg": jpeg(0), "txt": "first", "url": "https://x.org/0.jpg", "caption": "first",
         "status": "success", "error_message": None},
        {"key": "000000001", "jpg": None, "txt": None, "url": "https://x.org/1.jpg", "caption": "second",
         "status": "failed_to_resize", "error_message": "image too small"},
    ], schema=pa.schema([("key", pa.string()), ("jpg", pa.binary()), ("txt", pa.string()), ("url", pa.string()),
                         ("caption", pa.string()), ("status", pa.string()), ("error_message", pa.string())])),
        root / "00000.parquet")
    (root / "00000_stats.json").write_text("{}")
    out = tmp_path / "out"
    r = shard(root, "--out", out, "--key-col", "key")
    assert r.exit_code == 0, r.output
    [s] = list(ShardReader(out))
    assert s.meta["modality"] == "pair" and s.members["jpg"] == jpeg(0) and s.members["txt"] == b"first"
    assert s.meta["source"] == f"{root / '00000.parquet'}:000000000" and s.meta["source_meta"]["url"] == "https://x.org/0.jpg"
    q = quarantine(out)
    assert len(q) == 1 and q[0]["counts"] is False and "failed_to_resize" in q[0]["reason"]


def test_columns_mapped_and_unknown_columns_refused(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.jpg").write_bytes(jpeg(1))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "title", "id"])
        w.writeheader()
        w.writerow({"path": "pics/a.jpg", "title": "a circle", "id": "x1"})
    out = tmp_path / "out"
    r = shard(tmp_path / "m.csv", "--out", out, "--image-col", "path", "--text-col", "title", "--key-col", "id")
    assert r.exit_code == 0, r.output
    [m] = metas(out)
    assert m["modality"] == "pair" and m["source"] == f"{tmp_path / 'm.csv'}:x1" and m["source_meta"] == {"id": "x1"}
    assert json.loads((out / "manifest.json").read_text())["config"]["columns"] == {"image": "path", "text": "title",
                                                                                   "key": "id"}

    # no option: the columns name no field: refused with the column list, nothing written
    r = shard(tmp_path / "m.csv", "--out", tmp_path / "o2")
    assert r.exit_code == 2 and "path, title, id" in r.output and "--image-col" in r.output, r.output
    assert not (tmp_path / "o2").exists()
    (tmp_path / "rows.jsonl").write_text(json.dumps({"body": "words", "lang": "en"}) + "\n")
    r = shard(tmp_path / "rows.jsonl", "--out", tmp_path / "o3")
    assert r.exit_code == 2 and "body, lang" in r.output and "Traceback" not in r.output
    # an option naming a column the manifest lacks
    r = shard(tmp_path / "m.csv", "--out", tmp_path / "o4", "--text-col", "caption")
    assert r.exit_code == 2 and "--text-col caption is not a column" in r.output
    # found inside a folder: refused when reached, exit 2 all the same
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist([{"body": "words"}]), tmp_path / "d" / "x.parquet")
    r = shard(tmp_path / "d", "--out", tmp_path / "o5")
    assert r.exit_code == 2 and "columns: body" in r.output
