"""The stage runner never deletes or replaces a file it did not write, never trusts damaged
output or changed inputs on a rerun, holds one lock per --out, streams shards to disk and
reports a full disk in one line."""

from __future__ import annotations

import errno
import io
import json
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers.media import png_bytes
from helpers.outputs import tree_bytes
from mmtok.cli.app import app
from mmtok.locks import LOCK_FILE, LockHeld, exclusive
from mmtok.runner import Item, Sample, StageError, run_stage
from mmtok.shards import ShardReader, list_shards
from mmtok.shardwriter import ShardWriter

runner = CliRunner()


def shard(*args) -> object:
    return runner.invoke(app, ["shard", *[str(a) for a in args], "--quiet"])


def text_corpus(root: Path, n: int = 10) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"t{i:02d}.txt").write_text(f"text number {i} " * (1 + i % 4))
        if i % 3 == 0:
            (root / f"i{i:02d}.png").write_bytes(png_bytes(seed=i, size=20 + i))
    return root


def user_tar() -> bytes:
    b = io.BytesIO()
    with tarfile.open(fileobj=b, mode="w") as t:
        info = tarfile.TarInfo("mine.txt")
        info.size = 4
        t.addfile(info, io.BytesIO(b"mine"))
    return b.getvalue()


USER_FILES = {  # a user's files in --out, a shard-like tar and a temp-like name among them
    "text-000042.tar": user_tar(),
    "notes.json": b'{"mine": true}',
    "photo.png": png_bytes(seed=99),
    "readme.txt": b"my notes",
    ".photo.png.tmp-7": b"not a leftover of mmtok",
}


def put_user_files(out: Path) -> None:
    for name, data in USER_FILES.items():
        (out / name).write_bytes(data)


def assert_user_files_intact(out: Path) -> None:
    for name, data in USER_FILES.items():
        assert (out / name).read_bytes() == data, f"{name} was changed or deleted"


def stage_bytes(out: Path) -> dict[str, bytes]:
    return {n: b for n, b in tree_bytes(out).items() if n not in USER_FILES}


# ---------------------------------------------------------------- 1. only its own files


def test_overwrite_deletes_only_what_the_stage_wrote(tmp_path):
    src = text_corpus(tmp_path / "in")
    out, fresh = tmp_path / "o", tmp_path / "fresh"
    assert shard(src, "--out", out, "--max-count", "3").exit_code == 0
    put_user_files(out)
    r = shard(src, "--out", out, "--max-count", "2", "--overwrite")
    assert r.exit_code == 0, r.output
    assert_user_files_intact(out)
    assert (out / LOCK_FILE).exists()
    assert shard(src, "--out", fresh, "--max-count", "2").exit_code == 0
    assert stage_bytes(out) == stage_bytes(fresh)
    assert "text-000042.tar" not in {s["name"] for s in ShardReader(out).manifest["shards"]}


def test_a_user_file_where_the_stage_would_write_is_refused_not_replaced(tmp_path):
    src = text_corpus(tmp_path / "in")
    out = tmp_path / "o"
    out.mkdir()
    (out / "text-000000.tar").write_bytes(b"mine")
    r = shard(src, "--out", out, "--max-count", "3")
    assert r.exit_code == 2 and "text-000000.tar is in the way" in r.output and "Traceback" not in r.output
    assert (out / "text-000000.tar").read_bytes() == b"mine"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    other = tmp_path / "o2"
    other.mkdir()
    (other / "manifest.json").write_text("my own manifest")
    r = shard(src, "--out", other, "--overwrite")
    assert r.exit_code == 2 and "manifest.json" in r.output
    assert (other / "manifest.json").read_text() == "my own manifest"


def test_detokenize_overwrite_deletes_only_its_documents(tmp_path):
    from helpers.media import make_shards, sentences

    from mmtok.bpe import train_bpe
    from mmtok.detokenize import detokenize
    from mmtok.tokenize import Tokenizer, tokenize

    train_bpe([make_shards(tmp_path / "train", texts=sentences())], tmp_path / "tok", vocab_size=2000, image_codes=16,
              log=lambda m: None)
    shards = make_shards(tmp_path / "shards", texts=sentences()[:6])
    tok = Tokenizer.load(tmp_path / "tok", device="cpu")
    tokenize([shards], tok, tmp_path / "tokens1", seed=1, progress=False)
    tokenize([shards], tok, tmp_path / "tokens2", seed=2, progress=False)
    keys = [s.key for s in ShardReader(tmp_path / "tokens1")]

    out = tmp_path / "out"
    detokenize(tmp_path / "tokens1", tok, out, progress=False)
    put_user_files(out)
    info = detokenize(tmp_path / "tokens2", tok, out, overwrite=True, progress=False)
    assert info["documents"] == len(keys)
    assert_user_files_intact(out)
    assert (out / LOCK_FILE).exists()

    # a document file that detokenize did not write is never taken for a finished one, nor replaced
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / f"{keys[1]}.json").write_text("mine")
    with pytest.raises(StageError, match=f"{keys[1]}.json is in the way"):
        detokenize(tmp_path / "tokens1", tok, fresh, progress=False)
    assert (fresh / f"{keys[1]}.json").read_text() == "mine"
    r = runner.invoke(app, ["detokenize", str(tmp_path / "tokens1"), "--tokenizer", str(tmp_path / "tok"),
                         "--out", str(tmp_path / "tokens1")])
    assert r.exit_code == 2 and "inside input" in r.output


# ---------------------------------------------------------------- 2. --out and the inputs


def test_out_overlapping_an_input_is_refused(tmp_path):
    src = text_corpus(tmp_path / "in")
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src / "sub" / "out"):
        r = shard(src, "--out", out)
        assert r.exit_code == 2 and "inside input" in r.output, r.output
    assert sorted(p.name for p in src.iterdir()) == before
    out = tmp_path / "o"
    out.mkdir()
    (out / "more.txt").write_text("an input inside --out")
    r = shard(src, out / "more.txt", "--out", out)
    assert r.exit_code == 2 and "inside --out" in r.output
    # the library refuses as well, whoever calls it
    with pytest.raises(StageError, match="inside input"):
        run_stage("t", [], str, src / "o", config={"inputs": [str(src)]}, progress=False)
    assert not (src / "o").exists()


def test_an_empty_input_is_a_usage_error(tmp_path, monkeypatch):
    here = tmp_path / "cwd"
    here.mkdir()
    (here / "a.txt").write_text("would be read if '' meant the current directory")
    monkeypatch.chdir(here)
    r = shard("", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "empty" in r.output
    assert not (tmp_path / "o" / "manifest.json").exists()


# ---------------------------------------------------------------- 3. one job per --out


def test_a_locked_out_is_refused_naming_the_holder(tmp_path):
    src = text_corpus(tmp_path / "in")
    out = tmp_path / "o"
    assert shard(src, "--out", out, "--max-count", "3").exit_code == 0
    before = tree_bytes(out)
    with exclusive(out):
        r = shard(src, "--out", out, "--max-count", "2", "--overwrite")  # would delete, were it not refused
        assert r.exit_code == 2 and f"pid {os.getpid()}" in r.output, r.output
        with pytest.raises(LockHeld):
            run_stage("shard", [], str, out, config={}, progress=False)
    assert {n: b for n, b in tree_bytes(out).items() if n != LOCK_FILE} == \
        {n: b for n, b in before.items() if n != LOCK_FILE}
    assert shard(src, "--out", out, "--max-count", "2", "--overwrite").exit_code == 0
    assert (out / LOCK_FILE).exists()


def test_a_refused_out_is_left_as_it_was(tmp_path):
    """A stage that refuses its --out takes its lock file back, and a directory it made."""
    src = text_corpus(tmp_path / "in")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "index.parquet").write_text("not an index")  # a file a stage writes: refused, not replaced
    r = shard(src, "--out", mine)
    assert r.exit_code == 2, r.output
    assert sorted(p.name for p in mine.iterdir()) == ["index.parquet", "notes.txt"]
    with pytest.raises(StageError):  # a job refused in a directory the lock made: the directory goes too
        with exclusive(tmp_path / "new"):
            raise StageError("refused")
    assert not (tmp_path / "new").exists()
    with exclusive(tmp_path / "new"):  # a job that ends well keeps it
        pass
    assert (tmp_path / "new" / LOCK_FILE).exists()


# ---------------------------------------------------------------- 4. reruns check what they trust


def test_inputs_copied_again_are_named_as_such(tmp_path):
    """Same names and bytes, new modification times (a corpus copied in again): refused as a
    change, and the message says that is what it saw."""
    src = text_corpus(tmp_path / "in")
    out = tmp_path / "o"
    assert shard(src, "--out", out).exit_code == 0
    for p in src.rglob("*"):  # what `cp -r` of the same files gives: new modification times
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    r = shard(src, "--out", out)
    assert r.exit_code == 2 and "the same" in r.output and "copied again" in r.output, r.output


def test_changed_inputs_are_refused_on_rerun(tmp_path):
    src = text_corpus(tmp_path / "in")
    out = tmp_path / "o"
    assert shard(src, "--out", out).exit_code == 0
    assert shard(src, "--out", out).exit_code == 0  # unchanged: resumes (nothing to do)

    changes = [
        lambda: (src / "new.txt").write_text("added"),
        lambda: (src / "new.txt").unlink(),  # back to the original listing: accepted again
        lambda: (src / "t01.txt").unlink(),
        lambda: (src / "t02.txt").write_text("modified"),
    ]
    for i, change in enumerate(changes):
        change()
        r = shard(src, "--out", out)
        if i == 1:
            assert r.exit_code == 0, r.output
            continue
        assert r.exit_code == 2 and "changed" in r.output and "--overwrite" in r.output, r.output
    r = shard(src, "--out", out, "--overwrite")
    assert r.exit_code == 0
    fresh = tmp_path / "fresh"
    assert shard(src, "--out", fresh).exit_code == 0
    assert tree_bytes(out) == tree_bytes(fresh)


def _texts(n: int, tag: str = "") -> list[Item]:
    return [Item(f"x{i}", (i, tag)) for i in range(n)]


def _text_sample(payload) -> Sample:
    i, tag = payload
    return Sample(f"k{i:03d}", "text", {"txt": f"sample {i}{tag} ".encode() * (1 + i % 5)}, {"modality": "text"})


def test_a_changed_shard_directory_input_is_refused(tmp_path):
    """A shard-directory input is known by its manifest and shards: the stage that wrote it
    may rerun (same bytes, new mtimes), but other content is a change."""
    up, down = tmp_path / "up", tmp_path / "down"

    def upstream(tag="", overwrite=False):
        run_stage("up", _texts(9, tag), _text_sample, up, config={"tag": tag}, max_count=4, progress=False,
                  overwrite=overwrite)

    def downstream():
        return run_stage("down", [Item(str(s), s) for s in list_shards(up)], lambda p: [], down,
                         config={"inputs": [str(up)]}, progress=False)

    upstream()
    downstream()
    upstream()  # a rerun of the finished upstream job rewrites its manifest with the same bytes
    downstream()
    upstream("changed", overwrite=True)
    with pytest.raises(StageError, match=f"{up} changed"):
        downstream()


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_a_damaged_finished_shard_is_redone(tmp_path, damage):
    src = text_corpus(tmp_path / "in", n=30)
    ref, out = tmp_path / "ref", tmp_path / "o"
    assert shard(src, "--out", ref, "--max-count", "3").exit_code == 0
    assert shard(src, "--out", out, "--max-count", "3").exit_code == 0
    victim = out / "text-000003.tar"
    data = victim.read_bytes()
    if damage == "delete":
        victim.unlink()
    elif damage == "truncate":
        victim.write_bytes(data[:1000])
    else:  # same size, one byte changed
        victim.write_bytes(data[:600] + bytes([data[600] ^ 1]) + data[601:])
    r = shard(src, "--out", out, "--max-count", "3")
    assert r.exit_code == 0, r.output
    assert tree_bytes(out) == tree_bytes(ref)  # every sample back, in the same bytes


# ---------------------------------------------------------------- 5. streaming


def test_the_writer_streams_shards_instead_of_holding_them(tmp_path):
    member = 256 << 10

    def big(i):
        return Sample(f"b{i:04d}", "blob", {"bin": bytes([i % 251]) * member}, {"modality": "blob"})

    n = 160  # one 40 MiB shard
    run_stage("t", [Item("0", 0)], big, tmp_path / "warm", config={}, progress=False)  # imports are not the writer's
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        run_stage("t", [Item(str(i), i) for i in range(n)], big, tmp_path / "o", config={}, max_size=1 << 30,
                  task_size=2, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    (tar,) = list_shards(tmp_path / "o")
    assert tar.stat().st_size > n * member
    # a shard held in memory would be 40 MiB; streaming holds a few members (task + hash queue)
    assert peak < 6 << 20, f"peak Python memory {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("item_mib, threads", [(10, True), (10, False), (300, True)])
def test_the_work_in_flight_is_bounded_by_its_bytes(item_mib, threads):
    """Items that declare their bytes (a folder of videos) are cut into smaller tasks and
    held in flight by bytes, not only by count: 4 x workers tasks of 8 large items each
    would hold gigabytes. Measured as the declared bytes of the tasks the dispatcher has
    taken and not yet given back."""
    from mmtok.dispatch import IN_FLIGHT_BYTES, TASK_BYTES, _ordered_map, _tasks

    size, workers, n = item_mib << 20, 2, 60
    items = [Item(str(i), i, nbytes=size) for i in range(n)]
    held, peak, out = 0, 0, []

    def taken():
        nonlocal held, peak
        for t in _tasks(items, 0, 8):
            held += sum(item.nbytes for _, item in t)
            peak = max(peak, held)
            yield t

    for task in _ordered_map(abs, taken(), workers, threads=threads):
        held -= len(task) * size
        out += [r for _, r in task]
    assert out == [[i] for i in range(n)]  # all of them, in order
    largest_task = max(TASK_BYTES + size, size)
    assert peak <= max(IN_FLIGHT_BYTES + largest_task, (workers + 1) * largest_task), peak >> 20
    assert peak < 4 * workers * 8 * size  # what the count bound alone let in


def test_a_folders_files_declare_their_sizes(tmp_path):
    from mmtok.ingest import shard_items

    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "a.txt").write_text("a caption")
    (tmp_path / "b.txt").write_text("text " * 100)
    (tmp_path / "c.tar").write_bytes(b"")  # an archive: its members declare theirs
    with tarfile.open(tmp_path / "c.tar", "w") as t:
        info = tarfile.TarInfo("x.txt")
        info.size = 7
        t.addfile(info, io.BytesIO(b"seven b"))
    got = {Path(item.name).name: item.nbytes for item in shard_items([str(tmp_path)])}
    assert got == {"c.tar:x": 7, "a": len(png_bytes()) + 9, "b": 500}


# ---------------------------------------------------------------- 6. a full disk


def test_a_full_disk_is_one_line_and_a_rerun_resumes(tmp_path, monkeypatch):
    src = text_corpus(tmp_path / "in", n=30)
    ref, out = tmp_path / "ref", tmp_path / "o"
    assert shard(src, "--out", ref, "--max-count", "3").exit_code == 0

    real, calls = ShardWriter._write, {"n": 0}

    def full_after_a_while(self, data):
        calls["n"] += 1
        if calls["n"] > 60:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, data)

    monkeypatch.setattr(ShardWriter, "_write", full_after_a_while)
    r = shard(src, "--out", out, "--max-count", "3")
    assert r.exit_code == 2 and "Traceback" not in r.output
    message = " ".join(r.output.split())
    assert "no space left on device" in message and "rerun" in message and f"{out}/" in message, message
    assert list(out.glob("*.tar")) and not [p for p in out.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(ShardWriter, "_write", real)
    r = shard(src, "--out", out, "--max-count", "3", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["resumed_shards"] > 0
    assert tree_bytes(out) == tree_bytes(ref)



def test_pool_workers_die_on_sigterm_whatever_handler_the_parent_set():
    # The pool ends its workers with SIGTERM when it closes; a handler inherited through the
    # fork (the trainer's, Ray's driver's) kept a worker alive and the suite hung on it.
    import signal

    from mmtok.dispatch import _ordered_map

    old = signal.signal(signal.SIGTERM, lambda *a: None)
    try:
        tasks = iter([[(i, Item(str(i), i))] for i in range(4)])
        seen = [r for task in _ordered_map(lambda _: signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, tasks,
                                           workers=2) for _, r in task]
    finally:
        signal.signal(signal.SIGTERM, old)
    assert seen == [[True]] * 4


@pytest.mark.timeout(60)
def test_a_finished_pool_ends_its_workers_without_a_signal(monkeypatch):
    """The SIGTERM of a pool's exit can hang it: a worker still starting holds the parent's
    handler and swallows it, while another, killed holding the task queue's lock, leaves it
    waiting for that lock forever (seen in the full suite). A finished map ends its workers
    through the task queue instead, signalling none."""
    import multiprocessing.process

    from mmtok.dispatch import _ordered_map

    signalled = []
    real = multiprocessing.process.BaseProcess.terminate
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "terminate",
                        lambda self: (signalled.append(self.pid), real(self)))
    tasks = iter([[(i, Item(str(i), i))] for i in range(6)])
    assert [r for task in _ordered_map(abs, tasks, workers=2) for _, r in task] == [[i] for i in range(6)]
    assert signalled == []
