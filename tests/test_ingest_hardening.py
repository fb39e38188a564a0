"""`mmtok shard` on hostile inputs: one bad input never costs its good neighbours or the job.

Each test makes its own bad files; each bad one must come back as a quarantine record
(input, stage, reason) while the good ones beside it are sharded."""

from __future__ import annotations

import csv
import datetime
import decimal
import gzip
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from helpers.media import png_bytes, write_tar
from helpers.outputs import quarantine, read_all
from mmtok.cli.app import app
from mmtok.tars import ShardError, group_samples, iter_tar

runner = CliRunner()


def run_shard(inputs: list, out: Path, *extra: str):
    res = runner.invoke(app, ["shard", *map(str, inputs), "--out", str(out), "--quiet", "--max-error-rate", "1",
                              "--no-dedup", *extra])
    assert res.exit_code == 0, res.output
    return res


def texts(out: Path) -> list[bytes]:
    return sorted(m["txt"] for m in read_all(out).values() if "txt" in m)


def reasons(out: Path) -> dict[str, str]:
    """input (file name part after the last '/') -> reason; every record is from the shard stage."""
    rows = quarantine(out)
    assert all(r["stage"] == "shard" for r in rows)
    return {r["input"].rsplit("/", 1)[-1]: r["reason"] for r in rows}


def tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.GNU_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# ------------------------------------------------------------------ 1. names that are not UTF-8

def test_non_utf8_file_and_member_names(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    raw = os.fsencode(d)
    with open(raw + b"/caf\xe9.txt", "wb") as f:
        f.write(b"latin-1 named caption")
    os.mkdir(raw + b"/dir\xff")
    with open(raw + b"/dir\xff/inside.txt", "wb") as f:
        f.write(b"in a latin-1 named folder")
    (d / "good.txt").write_text("good neighbour")
    bad_member = b"m\xe9.txt".decode("utf-8", "surrogateescape")
    (d / "names.tar").write_bytes(tar_bytes([(bad_member, b"bad name"), ("ok.txt", b"good member")]))
    out = tmp_path / "out"
    run_shard([d], out)
    assert texts(out) == [b"good member", b"good neighbour"]
    r = reasons(out)
    assert "not valid UTF-8" in r["caf\\xe9.txt"]
    assert "not valid UTF-8" in r["dir\\xff"]
    assert "not valid UTF-8" in r["names.tar:m\\xe9.txt"]
    (out / "quarantine.jsonl").read_bytes().decode("utf-8")  # the log itself stays valid UTF-8


# ------------------------------------------------------------------ 2. Parquet column types

def test_parquet_binary_decimal_timestamp_columns(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    table = pa.table({
        "text": pa.array([b"utf-8 bytes in a binary column", b"\xff\xfe not text", b"third row"], pa.binary()),
        "price": pa.array([decimal.Decimal("1.50"), decimal.Decimal("2.25"), None], pa.decimal128(5, 2)),
        "seen": pa.array([datetime.datetime(2024, 5, 1, 12, 30), None, None], pa.timestamp("ms")),
        "day": pa.array([datetime.date(2024, 5, 1), None, None], pa.date32()),
        "blob": pa.array([None, None, b"\x89PNG\xff"], pa.binary()),
    })
    pq.write_table(table, d / "rows.parquet")
    out = tmp_path / "out"
    run_shard([d / "rows.parquet"], out)
    metas = [json.loads(m["json"]) for m in read_all(out).values()]
    assert [m["source_meta"] for m in metas] == [{"price": "1.50", "seen": "2024-05-01T12:30:00", "day": "2024-05-01"}]
    assert texts(out) == [b"utf-8 bytes in a binary column"]
    r = reasons(out)
    assert "'text'" in r["rows.parquet:2"] and "not UTF-8" in r["rows.parquet:2"]
    assert "'blob'" in r["rows.parquet:3"]


# ------------------------------------------------------------------ 3. CSV quirks

def test_csv_with_bom_and_a_field_over_128k(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    long_text = "word " * 40_000  # 200,000 chars: over csv's default field_size_limit of 131,072
    with open(d / "rows.csv", "w", newline="", encoding="utf-8-sig") as f:  # writes a BOM first
        w = csv.DictWriter(f, ["text", "note"])
        w.writeheader()
        w.writerow({"text": "first row", "note": "n"})
        w.writerow({"text": long_text})
        w.writerow({"text": "after the long one"})
    out = tmp_path / "out"
    run_shard([d / "rows.csv"], out)
    assert texts(out) == sorted([b"after the long one", b"first row", long_text.encode()])
    assert quarantine(out) == []


# ------------------------------------------------------------------ 4. truncated tars

@pytest.mark.parametrize("compress", [False, True])
def test_truncated_tar_keeps_complete_members(tmp_path: Path, compress: bool):
    d = tmp_path / "in"
    d.mkdir()
    data = tar_bytes([("s1.txt", b"one"), ("s2.png", png_bytes()), ("s2.txt", b"two"), ("s3.txt", b"x" * 5000)])
    cut = data[: data.index(b"x" * 5000) + 2000]  # inside s3.txt's data
    name = "cut.tar.gz" if compress else "cut.tar"
    (d / name).write_bytes(gzip.compress(cut, mtime=0) if compress else cut)
    (d / "z.txt").write_text("neighbour")
    out = tmp_path / "out"
    run_shard([d], out)
    assert texts(out) == [b"neighbour", b"one", b"two"]
    assert any("png" in m for m in read_all(out).values())
    assert "cut short" in reasons(out)[f"{name}:s3.txt"]


def test_tar_cut_between_members_is_noticed(tmp_path: Path):
    data = tar_bytes([("a.txt", b"aa"), ("b.txt", b"bb")])
    end_of_b = 4 * 512  # two headers and two data blocks; the end-of-archive blocks are gone
    (tmp_path / "cut.tar").write_bytes(data[:end_of_b])
    got = list(group_samples(iter_tar(tmp_path / "cut.tar", strict=False)))
    assert [g for g in got if len(g) == 2] == [("a", {"txt": b"aa"}), ("b", {"txt": b"bb"})]
    (record,) = [g for g in got if len(g) == 3]
    assert record[0] == "" and "end-of-archive" in record[2]
    with pytest.raises(ShardError, match="end-of-archive"):  # a reader of trusted shards still fails loudly
        list(iter_tar(tmp_path / "cut.tar"))
    (tmp_path / "whole.tar").write_bytes(data)
    assert len(list(iter_tar(tmp_path / "whole.tar"))) == 2


# ------------------------------------------------------------------ 5. FIFOs, sockets, devices

def test_special_files_are_skipped_without_opening(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    os.mkfifo(d / "pipe.txt")  # opening a FIFO with no writer blocks forever
    os.mkfifo(d / "pipe.jsonl")
    os.mkfifo(d / "pipe.tar")
    os.mkfifo(tmp_path / "top.txt")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock.txt"))
    (d / "good.txt").write_text("good neighbour")
    (d / "rows.jsonl").write_text(json.dumps({"image": "pipe.txt", "caption": "fifo"}) + "\n"
                                  + json.dumps({"image": "/dev/null", "caption": "device"}) + "\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmtok.cli.app", "shard", str(d), str(tmp_path / "top.txt"), "--out", str(out),
           "-q", "--max-error-rate", "1"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        sock.close()
    assert res.returncode == 0, res.stdout + res.stderr
    assert texts(out) == [b"good neighbour"]
    r = reasons(out)
    assert "FIFO" in r["pipe.txt"] and "FIFO" in r["pipe.jsonl"] and "FIFO" in r["pipe.tar"] and "FIFO" in r["top.txt"]
    assert "socket" in r["sock.txt"]
    assert "FIFO" in r["rows.jsonl:1"] and "character device" in r["rows.jsonl:2"]


def test_device_file_in_a_folder_is_never_opened(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    try:
        # a /dev/null (not /dev/zero: a regression would then fill the memory, not just fail)
        os.mknod(d / "null.txt", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("no permission to make device files here")
    (d / "good.txt").write_text("good neighbour")
    out = tmp_path / "out"
    run_shard([d], out)
    assert texts(out) == [b"good neighbour"]
    assert "character device" in reasons(out)["null.txt"]


# ------------------------------------------------------------------ 6. symlinks

def test_symlinks_leaving_the_tree_are_not_followed(tmp_path: Path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("outside the input tree")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "far.txt").write_text("outside too")
    (d / "real.txt").write_text("inside")
    (d / "escape.txt").symlink_to(tmp_path / "secret.txt")
    (d / "relative.txt").symlink_to("../secret.txt")
    (d / "outdir").symlink_to(tmp_path / "elsewhere")
    (d / "sub" / "alias.txt").symlink_to("../real.txt")  # inside the tree: read
    (d / "loop").symlink_to(".")  # a directory link inside the tree: never descended
    (d / "pic.png").write_bytes(png_bytes())
    (d / "pic.txt").symlink_to("gone.txt")  # dangling: its stem's good image stays
    out = tmp_path / "out"
    run_shard([d], out)
    assert texts(out) == [b"inside", b"inside"]
    assert [m["png"] for m in read_all(out).values() if "png" in m] == [png_bytes()]
    r = reasons(out)
    assert set(r) == {"escape.txt", "relative.txt", "outdir", "pic.txt"}
    assert all("outside the input tree" in r[k] for k in ("escape.txt", "relative.txt", "outdir"))
    assert "cannot read" in r["pic.txt"]


# ------------------------------------------------------------------ 7. repeated member names

def test_duplicate_member_names_in_a_tar(tmp_path: Path):
    write_tar(tmp_path / "dup.tar", [("a.txt", b"first"), ("a.txt", b"second"), ("b.txt", b"bee"), ("a.txt", b"third")])
    out = tmp_path / "out"
    run_shard([tmp_path / "dup.tar"], out)
    assert texts(out) == [b"bee", b"first"]
    rows = quarantine(out)
    assert [r["input"].rsplit("/", 1)[-1] for r in rows] == ["dup.tar:a.txt", "dup.tar:a.txt"]
    assert all("duplicate member name" in r["reason"] for r in rows)


# ------------------------------------------------------------------ 8. one stem, extensions differing in case

def test_case_different_extensions_keep_one(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    upper, lower = png_bytes(fg="green"), png_bytes(fg="red")
    (d / "pair.PNG").write_bytes(upper)
    (d / "pair.png").write_bytes(lower)
    (d / "pair.txt").write_text("the caption")
    out = tmp_path / "out"
    run_shard([d], out)
    (sample,) = read_all(out).values()
    assert sample["png"] == upper and sample["txt"] == b"the caption"  # the name that sorts first wins
    r = reasons(out)
    assert list(r) == ["pair.png"] and "pair.PNG" in r["pair.png"]


# ------------------------------------------------------------------ 9. size limits

def test_max_member_bytes(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "big.txt").write_text("b" * 5000)
    (d / "small.txt").write_text("small file")
    bomb = tar_bytes([("zeros.txt", b"\0" * 1_000_000), ("fine.txt", b"fine member")], mode="w:gz")
    assert len(bomb) < 5000  # a megabyte of zeros compresses to almost nothing
    (d / "bomb.tar.gz").write_bytes(bomb)
    (d / "rows.jsonl").write_text(json.dumps({"image": "big.txt"}) + "\n" + json.dumps({"text": "row text"}) + "\n")
    out = tmp_path / "out"
    run_shard([d], out, "--max-member-bytes", "4K")
    assert texts(out) == [b"fine member", b"row text", b"small file"]
    r = reasons(out)
    assert "over the --max-member-bytes limit of 4,096" in r["big"]
    assert "1,000,000 bytes" in r["bomb.tar.gz:zeros.txt"]
    assert "over the --max-member-bytes" in r["rows.jsonl:1"]
    assert json.loads((out / "manifest.json").read_text())["config"]["max_member_bytes"] == 4096


def test_member_claiming_a_huge_size_is_not_read(tmp_path: Path):
    info = tarfile.TarInfo("huge.txt")
    info.size = 1 << 40  # the header claims a terabyte; nothing follows it
    (tmp_path / "claim.tar").write_bytes(tar_bytes([("a.txt", b"aa")])[:1024] + info.tobuf(tarfile.GNU_FORMAT))
    got = list(iter_tar(tmp_path / "claim.tar", max_member_bytes=1 << 20, strict=False))
    assert got[0] == ("a", "txt", b"aa")
    assert got[1][:2] == ("huge.txt", None) and "over the --max-member-bytes" in got[1][2]
    assert got[2][:2] == ("", None) and "unexpected end of data" in got[2][2]
    assert len(got) == 3


def test_a_file_is_read_whole_and_one_that_grew_only_to_the_limit(tmp_path: Path, monkeypatch):
    """The read asks for the size the file has, and reads on where it grew since its stat,
    never past `limit + 1`."""
    from mmtok.ingest import _read_file
    from mmtok.sniff import Bad

    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    assert _read_file(p, 1 << 30) == p.read_bytes()
    real_fstat = os.fstat

    def shrunk(fd):  # the file as its stat saw it, before it grew to what is on disk now
        st = list(real_fstat(fd))
        st[stat.ST_SIZE] = 100
        return os.stat_result(st)

    monkeypatch.setattr(os, "fstat", shrunk)
    assert _read_file(p, 20_000) == p.read_bytes()
    with pytest.raises(Bad, match="over the --max-member-bytes limit of 5,000"):
        _read_file(p, 5_000)


# ------------------------------------------------------------------ 10. re-sharding mmtok's own output

def test_resharding_an_mmtok_output_directory(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("alpha")
    (d / "b.png").write_bytes(png_bytes())
    (d / "c.txt").write_bytes(b"\xff not utf-8")  # so the first run has a quarantine record
    (d / "rows.jsonl").write_text(json.dumps({"segments": [{"text": "doc"}, {"image": "b.png"}]}) + "\n")
    first, second = tmp_path / "first", tmp_path / "second"
    run_shard([d], first, "--max-count", "1")
    run_shard([first], second)
    assert quarantine(second) == []  # manifest.json, index.parquet, quarantine.jsonl, _stats/ are not inputs
    sha = lambda out: sorted(json.loads(m["json"])["sha256"] for m in read_all(out).values())  # noqa: E731
    assert sha(second) == sha(first)


def test_stage_output_rule():
    from mmtok.shards import is_stage_output

    assert is_stage_output(["_stage.json"])  # a stage's OUT, finished or not
    assert is_stage_output(["manifest.json", "index.parquet", "text-000000.tar"])  # a finished shard set
    assert not is_stage_output(["manifest.json", "index.parquet"])  # no shards: someone else's files
    assert not is_stage_output(["manifest.json", "text-000000.tar", "notes.txt"])


def test_no_validate_never_imports_a_decoder(tmp_path: Path):
    """--no-validate sniffs the magic bytes and copies: PIL (and numpy with it) stay unloaded."""
    (tmp_path / "a.png").write_bytes(png_bytes())
    code = ("import sys\n"
            "from mmtok.ingest import ShardFn\n"
            f"out = ShardFn(validate=False)({{'index': 0, 'kind': 'files', 'paths': [{str(tmp_path / 'a.png')!r}], "
            "'source': 'a'})\n"
            "assert out[0].meta['modality'] == 'image', out\n"
            "assert 'PIL' not in sys.modules and 'numpy' not in sys.modules, 'a decoder was imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_json_nested_past_pythons_stack_is_one_bad_row(tmp_path):
    """A manifest row (or a CSV segments cell) nested deeper than Python's parser can go is
    quarantined; the good rows beside it are kept."""
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "m.jsonl").write_text('{"text": "good row"}\n{"text": ' + deep + "}\n")
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "segments"], ["good csv row", ""], ["", deep]])
    run_shard([tmp_path / "m.jsonl", tmp_path / "m.csv"], tmp_path / "out")
    assert texts(tmp_path / "out") == [b"good csv row", b"good row"]
    got = reasons(tmp_path / "out")
    assert set(got) == {"m.jsonl:2", "m.csv:3"} and "recursion" in got["m.jsonl:2"], got


def test_a_json_log_nested_past_pythons_stack_is_named(tmp_path):
    from mmtok.shards import read_jsonl

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ShardError, match="metrics.jsonl line 2: JSON nested too deeply"):
        read_jsonl(tmp_path / "metrics.jsonl")


def test_a_member_declaring_more_than_the_archive_holds_is_never_allocated(tmp_path):
    """A 10 KB tar whose second header declares 3 GiB: the read stops at the archive's end
    (a record for that member, the first kept) instead of allocating the declared size,
    which under a memory limit was a MemoryError traceback."""
    import resource

    with tarfile.open(tmp_path / "huge.tar", "w") as t:
        info = tarfile.TarInfo("a.txt")
        info.size = 5
        t.addfile(info, io.BytesIO(b"hello"))
        info = tarfile.TarInfo("b.txt")
        info.size = 3 << 30
        t.addfile(info)  # the header alone
    data = (tmp_path / "huge.tar").read_bytes()[:10240]
    (tmp_path / "huge.tar").write_bytes(data)
    limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (2_500_000_000, 2_500_000_000))  # noqa: E731
    p = subprocess.run([sys.executable, "-m", "mmtok.cli.app", "shard", str(tmp_path / "huge.tar"), "--out",
                        str(tmp_path / "out"), "--quiet", "--max-error-rate", "1"], preexec_fn=limit,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert texts(tmp_path / "out") == [b"hello"]
    assert "cut short" in reasons(tmp_path / "out")["huge.tar:b.txt"]


def test_a_tar_member_twin_but_for_case_is_left_out_as_in_a_folder(tmp_path):
    """`pair.png`, `pair.PNG` and `pair.txt` in a tar: the pair is kept (with `pair.PNG`,
    which sorts first, as a folder keeps it) and the twin gets a record, not three samples."""
    (tmp_path / "case.tar").write_bytes(tar_bytes([("pair.png", png_bytes(fg="red")), ("pair.txt", b"a red square"),
                                                   ("pair.PNG", png_bytes(fg="green"))]))
    run_shard([tmp_path / "case.tar"], tmp_path / "out")
    samples = read_all(tmp_path / "out")
    assert [sorted(m) for m in samples.values()] == [["json", "png", "txt"]]
    (sample,) = samples.values()
    assert sample["png"] == png_bytes(fg="green") and sample["txt"] == b"a red square"
    assert "but for case" in reasons(tmp_path / "out")["case.tar:pair.png"]
