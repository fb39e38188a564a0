"""`mmtok shard`, the stage runner and the shard reader, on small data made here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from helpers.media import make_video, png_bytes, write_tar
from helpers.outputs import quarantine, read_all, tree_bytes
from helpers.procs import kill_midway, signal_midway
from mmtok.cli.app import app
from mmtok.ingest import ShardFn, shard_items
from mmtok.runner import Item, run_stage
from mmtok.shards import ShardReader, content_hash, dumps_meta, list_shards, pair_hashes

runner = CliRunner()


def shard(args: list[str]):
    return runner.invoke(app, ["shard", *args, "--quiet"])


def test_every_input_kind(corpus: Path, tmp_path: Path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["shard", str(corpus), "--out", str(out), "--json", "--no-dedup"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["quarantined"] == 0
    samples = read_all(out)
    metas = {k: json.loads(m["json"]) for k, m in samples.items()}
    by_source = {}
    for k, m in metas.items():
        by_source.setdefault(m["source"].split(str(corpus) + "/")[-1], []).append(m)
    assert by_source["imgs/cat"][0]["modality"] == "pair"
    assert by_source["imgs/dog"][0]["modality"] == "image" and by_source["imgs/dog"][0]["format"] == "jpg"
    assert by_source["imgs/note"][0]["modality"] == "text"
    assert by_source["speech"][0]["modality"] == "audio_pair" and by_source["speech"][0]["sample_rate"] == 16000
    assert by_source["sound"][0]["modality"] == "audio"
    clip = by_source["clip"][0]
    assert clip["modality"] == "video" and (clip["width"], clip["height"]) == (64, 48) and clip["duration"] == pytest.approx(1.0, abs=0.15)
    assert [m["modality"] for m in by_source["rows.jsonl:1"]] == ["text"]
    assert [m["modality"] for m in by_source["rows.jsonl:2"]] == ["pair"]
    doc = [m for m in metas.values() if m["modality"] == "doc"][0]
    assert [list(s) for s in doc["segments"]] == [["text"], ["image"], ["text"]]
    doc_img = [m for m in metas.values() if m.get("role") == "doc_image"][0]
    assert doc["segments"][1]["image"] == doc_img["sha256"]
    assert by_source["rows.csv:3"][0]["modality"] == "pair"
    assert {m["modality"] for m in by_source["rows.parquet:1"] + by_source["rows.parquet:2"]} == {"text", "audio"}
    assert {m["modality"] for m in by_source["old.tar:s1"]} == {"pair"}
    # payloads are the input bytes, untouched
    cat = [k for k, m in metas.items() if m["source"].endswith("imgs/cat")][0]
    assert samples[cat]["png"] == (corpus / "imgs" / "cat.png").read_bytes()
    assert samples[cat]["txt"] == b"a red circle on a blue background"
    # every sample of a group has the same member names (stock readers infer columns from them)
    r = ShardReader(out)
    by_group = {}
    for row in r.index().to_pylist():
        by_group.setdefault(row["group"], set()).add(tuple(sorted(m["ext"] for m in row["members"])))
    assert all(len(v) == 1 for v in by_group.values()), by_group
    # every sample's sha256 is content_hash of its payload members as read back
    for key, members in samples.items():
        if metas[key]["modality"] == "doc":  # no payload: the segments are the content
            assert metas[key]["sha256"] == content_hash({"segments": dumps_meta(metas[key]["segments"])})
        else:
            assert metas[key]["sha256"] == content_hash({e: b for e, b in members.items() if e != "json"}), key


def test_content_hash_keeps_member_boundaries():
    assert content_hash({"a": b"xy", "b": b""}) != content_hash({"a": b"x", "b": b"y"})
    assert content_hash({"ab": b"c"}) != content_hash({"a": b"bc"})
    assert content_hash({"txt": b"1", "png": b"2"}) == content_hash({"png": b"2", "txt": b"1"})  # order-free
    assert content_hash({"txt": b"hi"}) == hashlib.sha256(b"txt\x002\x00hi").hexdigest()  # the documented layout


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["jpg", "png", "webp", "txt", "a", "zz"]), st.binary(max_size=300), min_size=1),
       st.data())
def test_pair_hashes_are_the_two_content_hashes(members, data):
    # whichever member sorts first: jpg before txt hashes the image once, webp after it twice
    ext = data.draw(st.sampled_from(sorted(members)))
    assert pair_hashes(members, ext) == (content_hash(members), content_hash({ext: members[ext]}))


def test_duplicates_dropped_and_counted(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a", "b", "c"):
        (d / f"{name}.png").write_bytes(png_bytes())
    (d / "other.png").write_bytes(png_bytes(fg="green"))
    res = runner.invoke(app, ["shard", str(d), "--out", str(tmp_path / "o"), "--json"])
    s = json.loads(res.stdout)
    assert (s["samples"], s["duplicates"]) == (2, 2)
    dups = [json.loads(l) for l in (tmp_path / "o" / "duplicates.jsonl").read_text().splitlines()]
    assert [Path(x["input"]).name for x in dups] == ["b", "c"]


def test_bad_inputs_quarantined_good_kept(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    good = png_bytes()
    (d / "good.png").write_bytes(good)
    (d / "good2.txt").write_text("fine text")
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notimage.jpg").write_bytes(b"this is plain text pretending to be a jpeg")
    bomb = io.BytesIO()
    Image.new("1", (12000, 12000)).save(bomb, "PNG")
    (d / "bomb.png").write_bytes(bomb.getvalue())
    make_video(tmp_path / "full.mp4", seconds=2)
    full = (tmp_path / "full.mp4").read_bytes()
    (d / "cut.mp4").write_bytes(full[: len(full) // 2])
    (d / "garbage.wav").write_bytes(os.urandom(4000))
    (d / "latin1.txt").write_bytes("crème brûlée".encode("latin-1"))
    (d / "rows.jsonl").write_text('{"text": "ok row"}\n{not json\n{"image": "missing.png", "caption": "x"}\n')
    write_tar(d / "evil.tar", [("../escape.txt", b"x"), ("/etc/abs.txt", b"y"), ("ok.txt", b"kept from tar")])
    write_tar(d / "pickles.tar", [("p1.pyd", b"\x80\x04K\x01."), ("p1.txt", b"caption"), ("p2.txt", b"safe sample")])
    out = tmp_path / "out"
    res = runner.invoke(app, ["shard", str(d), "--out", str(out), "--json", "--max-error-rate", "1"])
    assert res.exit_code == 0, res.output
    reasons = {Path(q["input"].split(":")[0]).name + (":" + q["input"].split(":")[1] if ":" in q["input"] else ""): q["reason"]
               for q in quarantine(out)}
    assert "does not decode" in reasons["truncated"]  # grouped by stem: truncated.png
    assert "empty" in reasons["empty"]
    assert "name says image" in reasons["notimage"]
    assert "decompression bomb" in reasons["bomb"] and "144,000,000 pixels" in reasons["bomb"]
    assert "name says audio" in reasons["garbage"]
    assert "UTF-8" in reasons["latin1"]
    assert "malformed manifest line" in reasons["rows.jsonl:2"]
    assert "missing" in reasons["rows.jsonl:3"]
    assert "unsafe" in reasons["evil.tar:../escape.txt"] and "unsafe" in reasons["evil.tar:/etc/abs.txt"]
    assert "pickle" in reasons["pickles.tar:p1"]
    assert all(q["stage"] == "shard" for q in quarantine(out))
    assert "video does not decode (ffmpeg:" in reasons["cut"]
    texts = sorted(m["txt"] for m in read_all(out).values() if "txt" in m)
    assert texts == [b"fine text", b"kept from tar", b"ok row", b"safe sample"]
    assert any("png" in m and m["png"] == good for m in read_all(out).values())
    assert not (tmp_path / "escape.txt").exists() and not Path("/etc/abs.txt").exists()


def test_error_budget_sets_exit_status(tmp_path: Path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("good")
    (d / "b.txt").write_bytes(b"\xff\xfe bad")
    res = runner.invoke(app, ["shard", str(d), "--out", str(tmp_path / "o"), "--max-error-rate", "0.1"])
    assert res.exit_code == 3
    assert "over --max-error-rate" in res.output
    assert read_all(tmp_path / "o") != {}  # the good sample is still written


def test_clear_error_for_missing_input(tmp_path: Path):
    res = shard([str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_output_dir_of_another_job_refused(tmp_path: Path, corpus: Path):
    assert shard([str(corpus / "imgs"), "--out", str(tmp_path / "o")]).exit_code == 0
    res = shard([str(corpus / "imgs"), "--out", str(tmp_path / "o"), "--max-count", "3"])
    assert res.exit_code == 2 and "different job" in res.output
    assert shard([str(corpus / "imgs"), "--out", str(tmp_path / "o"), "--max-count", "3", "--overwrite"]).exit_code == 0


def test_workers_do_not_change_bytes(corpus: Path, tmp_path: Path):
    a, b = tmp_path / "w1", tmp_path / "w2"
    assert shard([str(corpus), "--out", str(a), "--workers", "1", "--max-count", "3"]).exit_code == 0
    assert shard([str(corpus), "--out", str(b), "--workers", "2", "--max-count", "3"]).exit_code == 0
    assert len(list_shards(a)) > 3
    assert tree_bytes(a) == tree_bytes(b)


def test_the_library_call_is_what_the_command_runs(corpus: Path, tmp_path: Path):
    """`mmtok.shard(...)` (the command's one call) writes the same bytes as `mmtok shard`."""
    import mmtok

    a, b = tmp_path / "cli", tmp_path / "lib"
    assert shard([str(corpus), "--out", str(a), "--max-count", "3"]).exit_code == 0
    summary = mmtok.shard([str(corpus)], b, max_count=3, progress=False)
    assert summary.samples > 3 and summary.out == str(b)
    assert tree_bytes(a) == tree_bytes(b)


class Boom(KeyboardInterrupt):
    pass


def test_resume_after_interrupt_gives_same_bytes(tmp_path: Path):
    """A run stopped mid-way, then rerun, equals an uninterrupted run byte for byte."""
    d = tmp_path / "in"
    d.mkdir()
    for i in range(40):
        (d / f"t{i:02d}.txt").write_text(f"text number {i}" * (1 + i % 3))
        if i % 3 == 0:
            (d / f"i{i:02d}.png").write_bytes(png_bytes(seed=i, fg=["red", "green", "blue"][i % 3], size=24 + i))
        if i % 7 == 0:
            (d / f"bad{i:02d}.txt").write_bytes(b"\xff bad")
    items = list(shard_items([str(d)]))
    fn = ShardFn()
    cfg = {"x": 1}
    ref = tmp_path / "ref"
    run_stage("shard", items, fn, ref, config=cfg, max_count=4, dedup=True, progress=False, max_error_rate=1)

    calls = {"n": 0}

    def dying(payload):
        calls["n"] += 1
        if calls["n"] == 45:
            raise Boom()
        return fn(payload)

    out = tmp_path / "out"
    with pytest.raises(Boom):
        run_stage("shard", items, dying, out, config=cfg, max_count=4, dedup=True, progress=False, max_error_rate=1)
    done_before = len(list((out / "_stats").glob("*.json")))
    assert 0 < done_before < len(list_shards(ref))
    seen = []

    def counting(payload):
        seen.append(payload["index"])
        return fn(payload)

    s = run_stage("shard", items, counting, out, config=cfg, max_count=4, dedup=True, progress=False, max_error_rate=1)
    assert s.resumed_shards == done_before
    assert min(seen) > 0, "finished work was redone from the start"
    assert tree_bytes(out) == tree_bytes(ref)


@pytest.mark.slow
def test_killed_process_resumes(tmp_path: Path):
    """SIGKILL a real `mmtok shard` process, rerun the same command: same bytes as a clean run."""
    d = tmp_path / "in"
    d.mkdir()
    for i in range(300):
        (d / f"i{i:03d}.png").write_bytes(png_bytes(seed=i, size=32 + i % 50, fg=["red", "green"][i % 2]))
    cmd = [sys.executable, "-m", "mmtok.cli.app", "shard", str(d), "--max-count", "10", "--quiet"]
    subprocess.run(cmd + ["--out", str(tmp_path / "ref")], check=True)
    out = tmp_path / "out"
    assert kill_midway(cmd, out) >= 3
    subprocess.run(cmd + ["--out", str(out)], check=True)
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


@pytest.mark.slow
def test_sigterm_ends_a_stage_like_ctrl_c_and_the_rerun_completes_it(tmp_path: Path):
    """SIGTERM (a scheduler's stop) a real `mmtok shard --workers 2`: exit 130 with one line,
    the finished shards kept, and the rerun resumes them into the clean run's bytes."""
    d = tmp_path / "in"
    d.mkdir()
    for i in range(300):
        (d / f"i{i:03d}.png").write_bytes(png_bytes(seed=i, size=32 + i % 50, fg=["red", "green"][i % 2]))
    cmd = [sys.executable, "-m", "mmtok.cli.app", "shard", str(d), "--max-count", "10", "--workers", "2", "--quiet"]
    subprocess.run(cmd + ["--out", str(tmp_path / "ref")], check=True)
    out = tmp_path / "out"
    kept, rc, err = signal_midway(cmd, out, signal.SIGTERM)
    assert rc == 130 and "interrupted; rerun the same command to resume" in err and "Traceback" not in err, err
    res = subprocess.run(cmd + ["--out", str(out), "--json"], capture_output=True, text=True)
    assert res.returncode == 0 and json.loads(res.stdout)["resumed_shards"] >= kept >= 3, res.stderr
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


def test_stock_readers_open_the_shards(corpus: Path, tmp_path: Path):
    out = tmp_path / "o"
    assert shard([str(corpus), "--out", str(out)]).exit_code == 0
    import webdataset as wds

    tars = [str(p) for p in list_shards(out)]
    keys = [s["__key__"] for s in wds.WebDataset(tars, shardshuffle=False)]
    assert sorted(keys) == sorted(read_all(out))
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    from datasets import load_dataset

    for group in ("pair-png", "text", "image-jpg"):
        ds = load_dataset("webdataset", data_files={"train": str(out / f"{group}-*.tar")}, split="train",
                          cache_dir=str(tmp_path / "hf"))
        n = ShardReader(out).manifest["totals"]["by_group"][group]
        assert len(ds) == n
        assert "json" in ds.column_names


def test_reader_split_and_random_access(corpus: Path, tmp_path: Path):
    out = tmp_path / "o"
    assert shard([str(corpus), "--out", str(out), "--max-count", "2"]).exit_code == 0
    r = ShardReader(out)
    r.check()
    everything = {s.key: s.members for s in r}
    parts = [s.key for rank in range(2) for w in range(2) for s in r.iter_samples(rank, 2, w, 2)]
    assert sorted(parts) == sorted(everything)
    for key, (shard_name, members) in r.lookup().items():
        for ext, (off, size) in members.items():
            assert r.read_member(shard_name, off, size) == everything[key][ext]


def test_reader_names_missing_or_truncated_shard(corpus: Path, tmp_path: Path):
    out = tmp_path / "o"
    assert shard([str(corpus), "--out", str(out)]).exit_code == 0
    victim = list_shards(out)[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    from mmtok.shards import ShardError

    with pytest.raises(ShardError, match=victim.name):
        ShardReader(out).check()
    res = runner.invoke(app, ["inspect", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "nowhere does not exist" in res.output


def test_inspect_json(corpus: Path, tmp_path: Path):
    out = tmp_path / "o"
    (corpus / "bad.txt").write_bytes(b"\xff")
    shard([str(corpus), "--out", str(out), "--max-error-rate", "1"])
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    info = json.loads(res.stdout)
    assert info["samples"] == sum(info["by_modality"].values())
    assert info["quarantined"] == 1 and list(info["quarantine_reasons"].values()) == [1]
    assert set(info["sample_keys"]) == set(info["by_group"])


def test_no_validate_copies_bytes(corpus: Path, tmp_path: Path):
    out = tmp_path / "o"
    res = runner.invoke(app, ["shard", str(corpus / "imgs"), "--out", str(out), "--no-validate", "--json"])
    assert res.exit_code == 0
    assert json.loads(res.stdout)["samples"] == 4
    samples = read_all(out).values()
    metas = [json.loads(m["json"]) for m in samples]
    assert {m["modality"] for m in metas} == {"pair", "image", "text"}
    # nothing decoded, nothing re-encoded: the payloads are the input files' bytes
    inputs = {(corpus / "imgs" / f).read_bytes() for f in ("cat.png", "dog.jpg", "tri.png")}
    assert {m.get("png", m.get("jpg")) for m in samples} - {None} == inputs
    assert all("width" not in m for m in metas)


def test_stage_function_exception_becomes_quarantine(tmp_path: Path):
    def fn(x):
        if x == 2:
            raise RuntimeError("kaboom")
        from mmtok.runner import Sample

        return Sample(f"k{x}", "text", {"txt": b"%d" % x}, {"modality": "text"})

    s = run_stage("t", [Item(f"item{i}", i) for i in range(5)], fn, tmp_path / "o", config={}, progress=False,
                  max_error_rate=0.5)
    assert (s.samples, s.quarantined) == (4, 1)
    q = quarantine(tmp_path / "o")[0]
    assert q["input"] == "item2" and "RuntimeError: kaboom" in q["reason"]


def test_help_and_shard_do_not_import_torch(tmp_path: Path):
    """Users feel every second of start-up: commands that need no torch must not load it."""
    (tmp_path / "a.txt").write_text("hello")
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from mmtok.cli.app import app\n"
        "r = CliRunner()\n"
        "assert r.invoke(app, ['--help']).exit_code == 0\n"
        f"assert r.invoke(app, ['shard', {str(tmp_path / 'a.txt')!r}, '--out', {str(tmp_path / 'o')!r}, '-q']).exit_code == 0\n"
        f"assert r.invoke(app, ['inspect', {str(tmp_path / 'o')!r}]).exit_code == 0\n"
        "heavy = sorted(m for m in ('torch', 'webdataset', 'torchvision', 'librosa') if m in sys.modules)\n"
        "print(heavy)\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_shard_writer_streams_a_member_without_copying_it(tmp_path: Path):
    """The writer holds the member it is given, never a copy (nor the shard): writing a
    40 MiB member allocates next to nothing (a copy would be 40 MiB), and the sha256 it
    computes on the way is the file's."""
    import tarfile as tf
    import tracemalloc

    from mmtok.shardwriter import ShardWriter

    data = os.urandom(40 << 20)
    with open(tmp_path / "s.tar", "wb") as f:
        w = ShardWriter(f)
        tracemalloc.start()
        w.add("k", {"bin": data, "json": b"{}"})
        w.close()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    raw = (tmp_path / "s.tar").read_bytes()
    assert w.sha256.hexdigest() == hashlib.sha256(raw).hexdigest() and w.offset == len(raw)
    with tf.open(tmp_path / "s.tar") as t:
        assert t.extractfile("k.bin").read() == data


def test_shard_writer_starts_writeback_as_it_goes(tmp_path: Path, monkeypatch):
    """Writeback is asked for in contiguous stretches from the start, so the fsync before the
    rename waits only for the tail; the bytes are the same as without it."""
    import mmtok.shardwriter as writer

    calls, real = [], writer._start_writeback
    monkeypatch.setattr(writer.ShardWriter, "WRITEBACK", 64 << 10)
    monkeypatch.setattr(writer, "_start_writeback", lambda fd, off, n: calls.append((off, n)))
    members = [{"bin": os.urandom(50_000 + i), "json": b"{}"} for i in range(10)]

    def write(path):
        with open(path, "wb") as f:
            w = writer.ShardWriter(f)
            for i, m in enumerate(members):
                w.add(f"{i:03d}", m)
            w.close()
        return w

    w = write(tmp_path / "a.tar")
    assert len(calls) >= 5 and calls[0][0] == 0
    assert all(a + n == b for (a, n), (b, _) in zip(calls, calls[1:]))
    assert calls[-1][0] + calls[-1][1] <= w.offset
    monkeypatch.setattr(writer.ShardWriter, "WRITEBACK", 1 << 40)
    write(tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with open(tmp_path / "a.tar", "r+b") as f:  # the real call: a hint the kernel takes, or a no-op elsewhere
        real(f.fileno(), 0, 1 << 20)


def test_member_header_is_tarfiles():
    """The writer's own header packing gives tarfile's bytes, long names and huge sizes included."""
    import tarfile as tf

    from mmtok.shardwriter import member_header

    for name in ("000000001.jpg", "a/b.c", "ключ.txt", "\udcff.bin", "x" * 96 + ".txt", "x" * 97 + ".txt", "é" * 50 + ".t"):
        for size in (0, 1, 511, 185_000, 8 ** 11 - 1, 8 ** 11, 1 << 40):
            info = tf.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
            assert member_header(name, size) == info.tobuf(tf.GNU_FORMAT, "utf-8", "surrogateescape"), (name, size)
