"""Remote paths (mmtok/fs.py) against a real S3 API: moto's stand-alone server on localhost,
reached through s3fs with AWS_ENDPOINT_URL, as a user reaches MinIO or R2."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from mmtok.demo import draw_shape
from mmtok.fs import RemoteError, RemotePath, as_location, is_url
from mmtok.mirror import Mirror, remote_output, stage_files
from mmtok.ingest import ShardFn, shard_items
from mmtok.runner import run_stage
from mmtok.shards import ShardError, ShardReader, list_shards, load_manifest, read_json, read_jsonl

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def bucket(endpoint, monkeypatch, tmp_path):
    """A fresh bucket on the local server; dummy credentials; MMTOK_CACHE in tmp_path."""
    import s3fs

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                 "MMTOK_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # one made before these variables would miss them
    name = f"b{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return name


def _s3():
    import s3fs

    return s3fs.S3FileSystem()


def _corpus(d: Path, n: int = 30) -> Path:
    d.mkdir()
    for i in range(n):
        (d / f"t{i:02d}.txt").write_text(f"text number {i} " * (1 + i % 4))
        if i % 3 == 0:
            b = io.BytesIO()
            draw_shape("circle", ["red", "green"][i % 2], "blue", size=24 + i, seed=i).save(b, "PNG")
            (d / f"i{i:02d}.png").write_bytes(b.getvalue())
        if i % 7 == 0:
            (d / f"bad{i:02d}.txt").write_bytes(b"\xff not utf-8")
    return d


def _shard(corpus: Path, out, **kw):
    items = list(shard_items([str(corpus)]))
    return run_stage("shard", items, ShardFn(), out, config={"inputs": [str(corpus)]}, max_count=4,
                     progress=False, max_error_rate=1, **kw)


def _top_files(d: Path) -> dict[str, bytes]:
    # not the resume records, nor the lock file (it holds the pid of the last writer)
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())
            if p.is_file() and not p.name.startswith("_") and p.name != ".mmtok.lock"}


def _bucket_files(prefix: str) -> dict[str, bytes]:
    fs = _s3()
    fs.invalidate_cache()
    return {p[len(prefix) + 1:]: fs.cat_file(p) for p in fs.find(prefix)}


# ---------------------------------------------------------------- helpers

def test_as_location_tells_urls_from_paths():
    loc = as_location("s3://bkt/shards/")
    assert isinstance(loc, RemotePath) and str(loc) == "s3://bkt/shards"
    assert str(loc / "manifest.json") == "s3://bkt/shards/manifest.json" and loc.name == "shards"
    assert as_location("data/shards") == Path("data/shards")
    assert as_location("file:///tmp/x") == Path("/tmp/x")
    assert as_location(Path("a")) == Path("a") and as_location(loc) is loc
    assert is_url("s3://b/x") and is_url(loc) and not is_url("file:///x") and not is_url("a/b")
    with pytest.raises(RemoteError, match="unknown URL scheme 'zzz'"):
        as_location("zzz://b/x")
    with pytest.raises(TypeError):  # never taken for a local file named like the URL
        open(loc, "rb")


def test_a_str_option_keeps_the_url_where_a_path_option_mangles_it():
    """The typer pitfall: a `Path` option turns s3://b/x into the local path s3:/b/x."""
    import typer
    from typer.testing import CliRunner

    seen = {}
    app = typer.Typer()

    @app.command()
    def main(out: str = typer.Option(...), other: Path = typer.Option(...)):
        seen["out"], seen["other"] = as_location(out), other

    assert CliRunner().invoke(app, ["--out", "s3://b/x", "--other", "s3://b/x"]).exit_code == 0
    assert seen["out"] == RemotePath("s3://b/x")
    assert str(seen["other"]) == "s3:/b/x"


def test_stage_files_names_only_what_a_stage_writes():
    for rel in ("manifest.json", "index.parquet", "quarantine.jsonl", "duplicates.jsonl", "_stage.json",
                "text-000001.tar", "_stats/text-000001.tar.json", "_parts/rank-00000-of-00002/text-000000.tar"):
        assert stage_files(rel), rel
    for rel in ("notes.txt", "sub/text-000001.tar", "_stats/notes.json", "_stats/x/text-000001.tar.json"):
        assert not stage_files(rel), rel


def test_temporaries_and_the_lock_are_never_mirrored():
    from mmtok.mirror import _skipped

    for rel in (".mmtok.lock", ".text-000001.tar.tmp-123", "_stats/.text-000001.tar.json.tmp-9",
                "checkpoints/.step-00000010.tmp/__0_0.distcp", "checkpoints/.step-00000010.old/.metadata"):
        assert _skipped(rel), rel
    for rel in ("checkpoints/step-00000010/.metadata", "checkpoints/latest", "metrics.jsonl"):
        assert not _skipped(rel), rel


def test_push_order_keeps_the_remote_consistent(tmp_path):
    """Job file, then shard records, then shards, then summaries, the manifest last; deletions
    in reverse; temporaries and the lock never leave the machine."""
    import fsspec

    remote = RemotePath(f"memory://m{uuid.uuid4().hex[:8]}")
    mirror = Mirror(remote, tmp_path, stage_files)
    mirror.pull()
    out = mirror.local
    (out / "_stats").mkdir()
    for name in ("manifest.json", "index.parquet", "text-000000.tar", "_stats/text-000000.tar.json",
                 "_stage.json", ".mmtok.lock", ".text-000001.tar.tmp-99", "notes.txt"):
        (out / name).write_bytes(name.encode())
    fs = fsspec.filesystem("memory")
    order, real_open = [], fs.open

    def recording_open(path, mode="rb", **kw):
        if "w" in mode:
            order.append(path.rpartition(remote.path + "/")[2])
        return real_open(path, mode, **kw)

    fs.open = recording_open
    try:
        mirror.push()
        assert order == ["_stage.json", "_stats/text-000000.tar.json", "text-000000.tar", "index.parquet",
                         "manifest.json"]
        order.clear()
        mirror.push()
        assert order == [], "unchanged files were uploaded again"
    finally:
        del fs.open
    deleted, real_rm = [], fs.rm_file
    fs.rm_file = lambda p: (deleted.append(p.rpartition("/")[2]), real_rm(p))
    try:
        for name in ("manifest.json", "text-000000.tar", "_stats/text-000000.tar.json"):
            (out / name).unlink()
        mirror.push()
    finally:
        del fs.rm_file
    assert deleted == ["manifest.json", "text-000000.tar", "text-000000.tar.json"]
    assert sorted(p.rpartition("/")[2] for p in fs.find(remote.path)) == ["_stage.json", "index.parquet"]


def test_latest_never_goes_up_before_the_checkpoint_it_names(tmp_path):
    """A training run saves a checkpoint and moves `latest` while a push is under way: the
    `latest` that goes up names a checkpoint that is up too."""
    import fsspec

    from mmtok.mirror import all_files

    remote = RemotePath(f"memory://m{uuid.uuid4().hex[:8]}")
    mirror = Mirror(remote, tmp_path, all_files)
    mirror.pull()
    ckpts = mirror.local / "checkpoints"

    def save(step: int) -> None:
        (ckpts / f"step-{step}").mkdir(parents=True)
        (ckpts / f"step-{step}" / "weights").write_bytes(b"w" * step)
        (ckpts / ".latest.tmp").write_text(f"step-{step}")
        os.replace(ckpts / ".latest.tmp", ckpts / "latest")

    save(1)
    real, calls = mirror._local_files, []

    def listing():
        found = real()
        calls.append(1)
        if len(calls) == 1:
            save(2)  # the trainer, just after the push looked
        return found

    mirror._local_files = listing
    mirror.push()
    fs = fsspec.filesystem("memory")
    named = fs.cat_file(f"{remote.path}/checkpoints/latest").decode()
    assert fs.exists(f"{remote.path}/checkpoints/{named}/weights"), named


def test_a_local_out_is_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTOK_CACHE", str(tmp_path / "cache"))
    with remote_output(str(tmp_path / "o")) as out:
        assert out == tmp_path / "o"
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------- reading from a bucket

def test_a_shard_dir_in_a_bucket_reads_like_the_local_one(bucket, tmp_path):
    local = tmp_path / "local"
    _shard(_corpus(tmp_path / "in"), local)
    _s3().put(str(local), f"{bucket}/shards", recursive=True)
    url = f"s3://{bucket}/shards"

    assert load_manifest(url) == load_manifest(local)
    assert [p.name for p in list_shards(url)] == [p.name for p in list_shards(local)]
    assert read_jsonl(f"{url}/quarantine.jsonl") == read_jsonl(local / "quarantine.jsonl")
    assert read_json(f"{url}/manifest.json") == read_json(local / "manifest.json")
    remote, here = ShardReader(url), ShardReader(local)
    remote.check()
    assert [(s.key, s.members, s.shard) for s in remote] == [(s.key, s.members, s.shard) for s in here]
    assert remote.index().equals(here.index())
    lookup = remote.lookup()
    assert lookup == here.lookup() and lookup
    for key, (shard, members) in lookup.items():
        for ext, (offset, size) in members.items():
            assert remote.read_member(shard, offset, size) == here.read_member(shard, offset, size)

    first = list_shards(local)[0]
    _s3().pipe_file(f"{bucket}/shards/{first.name}", first.read_bytes()[:-1024])
    with pytest.raises(ShardError, match=f"s3://{bucket}/shards/{first.name}: .* manifest says"):
        ShardReader(url).check()
    with pytest.raises(ShardError, match="no manifest.json"):
        load_manifest(f"s3://{bucket}/nothing-here")


def test_inspect_reads_a_stage_output_at_a_url(bucket, tmp_path):
    """`mmtok inspect URL`: the local directory's report from the bucket's manifest, index and
    quarantine; a URL that holds no stage output is one line."""
    from typer.testing import CliRunner

    from mmtok.cli.app import app

    local = tmp_path / "local"
    _shard(_corpus(tmp_path / "in"), local)
    _put(local, f"{bucket}/shards")
    url = f"s3://{bucket}/shards"
    here, there = (json.loads(_cli("inspect", d, "--json").stdout) for d in (local, url))
    assert there.pop("directory") == url and here.pop("directory") == str(local)
    assert there == here and here["quarantined"] > 0 and here["quarantine_reasons"]
    r = CliRunner().invoke(app, ["inspect", f"s3://{bucket}/nothing-here"])
    message = " ".join(r.output.split())
    assert r.exit_code == 2 and "nothing mmtok writes is there" in message and "credentials" not in message, r.output


# ---------------------------------------------------------------- writing to a bucket

def test_a_stage_writes_into_a_bucket_byte_for_byte(bucket, tmp_path):
    corpus = _corpus(tmp_path / "in")
    _shard(corpus, tmp_path / "ref")
    fs = _s3()
    fs.pipe_file(f"{bucket}/shards/notes.txt", b"the user's")  # beside mmtok's output: never touched
    fs.pipe_file(f"{bucket}/elsewhere.txt", b"the user's too")
    url = f"s3://{bucket}/shards"
    with remote_output(url, every=0.05) as out:
        assert out != tmp_path / "ref" and not is_url(str(out))
        summary = _shard(corpus, out)
    assert summary.shards > 3
    got = _bucket_files(f"{bucket}/shards")
    want = _top_files(tmp_path / "ref")
    assert {k: v for k, v in got.items() if "/" not in k and not k.startswith("_") and k != "notes.txt"} == want
    assert not [k for k in got if ".tmp" in k or "lock" in k], "a temporary or the lock was uploaded"
    assert sorted(k for k in got if k.startswith("_stats/")) == sorted(
        f"_stats/{p.name}" for p in (tmp_path / "ref" / "_stats").iterdir())
    assert got["notes.txt"] == b"the user's"
    assert [s.key for s in ShardReader(url)] == [s.key for s in ShardReader(tmp_path / "ref")]

    # an --overwrite run of another job deletes the old shards mmtok wrote, and nothing else
    with remote_output(url, every=0.05) as out:
        run_stage("shard", list(shard_items([str(corpus)])), ShardFn(), out, config={"inputs": [str(corpus)], "x": 2},
                  max_count=1000, progress=False, max_error_rate=1, overwrite=True)
    got = _bucket_files(f"{bucket}/shards")
    assert sorted(k for k in got if k.endswith(".tar")) == sorted(p.name for p in list_shards(out))
    assert len(list_shards(out)) < summary.shards
    assert got["notes.txt"] == b"the user's"
    assert fs.cat_file(f"{bucket}/elsewhere.txt") == b"the user's too"


def test_an_unreachable_bucket_is_one_line(bucket, tmp_path):
    with pytest.raises(RemoteError, match="s3://no-such-bucket-here/x: .*credentials"):
        with remote_output("s3://no-such-bucket-here/x"):
            pass


_CHILD = """
import sys, time
from mmtok.mirror import remote_output
from mmtok.ingest import ShardFn, shard_items
from mmtok.runner import run_stage
corpus, url = sys.argv[1], sys.argv[2]
fn = ShardFn()

def slow(payload):  # time for the test to see shards arrive and kill the run mid-way
    time.sleep(0.02)
    return fn(payload)

with remote_output(url, every=0.02) as out:
    run_stage("shard", list(shard_items([corpus])), slow, out, config={"inputs": [corpus]}, max_count=4,
              progress=False, max_error_rate=1)
"""


@pytest.mark.slow
def test_a_killed_run_resumes_on_another_machine(bucket, tmp_path):
    """SIGKILL a run writing to the bucket once shards are up there; resume it from an empty
    cache (another machine): the bucket ends byte-identical to a local run, and the shards
    that were up are not redone."""
    corpus = _corpus(tmp_path / "in", n=150)
    _shard(corpus, tmp_path / "ref")
    url, prefix = f"s3://{bucket}/shards", f"{bucket}/shards"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMTOK_CACHE": str(tmp_path / "machine-a")}
    fs = _s3()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(corpus), url], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        fs.invalidate_cache()
        if len([p for p in fs.find(prefix) if p.endswith(".tar")]) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fs.invalidate_cache()
    assert not fs.exists(f"{prefix}/manifest.json"), "the run finished before it could be killed"
    up = len([p for p in fs.find(prefix) if p.endswith(".tar")])
    assert up >= 3

    os.environ["MMTOK_CACHE"] = str(tmp_path / "machine-b")  # the fixture's monkeypatch restores it
    with remote_output(url) as out:
        summary = _shard(corpus, out)
    assert summary.resumed_shards >= up  # shards go up in closing order, each after its record
    got = _bucket_files(prefix)
    assert {k: v for k, v in got.items() if "/" not in k and not k.startswith("_")} == _top_files(tmp_path / "ref")


# ---------------------------------------------------------------- the CLI on a bucket (issue #15)

TINY_MOMA = ["--model", "moma", "--experts", "2t2i", "--lr", "0.01", "--warmup", "2", "--ckpt-every", "2"]
MIX = ["--world-size", "1", "--ratio", "1:1", "--seq-len", "160", "--micro-batch", "2", "--steps", "4",
       "--holdout", "0.2"]


def _cli(*args):
    from typer.testing import CliRunner

    from mmtok.cli.app import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in (r.output or ""), r.output
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The local pipeline the bucket runs must reproduce: raw files, shards, a tiny
    tokenizer, codes, tokens, a plan and a 4-step run, all written by the CLI."""
    from helpers.media import sentences
    from mmtok.bpe import train_bpe
    from mmtok.trainer.vq_train import train_vq
    from mmtok.vq import VQConfig

    root = tmp_path_factory.mktemp("remote_ref")
    raw = _corpus(root / "raw")
    for i, line in enumerate(sentences(200)):
        (raw / f"c{i:03d}.txt").write_text(line)
    _cli("shard", raw, "--out", root / "shards", "--max-count", 40, "--max-error-rate", 1, "--json")
    train_bpe([root / "shards"], root / "tok", vocab_size=600, image_codes=64, log=lambda m: None)
    train_vq([root / "shards"], root / "tok", VQConfig(resolution=16, downsample=2, codebook_size=64, channels=8,
                                                       res_blocks=1), steps=2, batch_size=4, disc_weight=0,
             log=lambda m: None)
    _cli("tokenize-images", root / "shards", "--tokenizer", root / "tok", "--out", root / "codes", "--json")
    _cli("tokenize", root / "shards", "--tokenizer", root / "tok", "--codes", root / "codes", "--out", root / "tokens",
         "--max-error-rate", 1, "--json")
    _cli("balance-mix", root / "tokens", "--out", root / "plan", *MIX, "--json")
    _cli("train", "--plan", root / "plan", "--out", root / "run", *TINY_MOMA, "--steps", 4, "--json")
    return root


def _put(local: Path, url_prefix: str) -> None:
    _s3().put(str(local), url_prefix, recursive=True)


def _same_output(prefix: str, local: Path, swap: dict[Path, str] | None = None) -> None:
    """The bucket's files under `prefix` are the local directory's, byte for byte; in JSON and
    JSONL files each local path of `swap` reads as its URL (a config records its inputs)."""
    got = {k: v for k, v in _bucket_files(prefix).items() if not k.rpartition("/")[2].startswith((".", "_stage"))}
    want = {p.relative_to(local).as_posix(): p.read_bytes() for p in sorted(local.rglob("*"))
            if p.is_file() and not p.name.startswith((".", "_stage"))}
    assert sorted(got) == sorted(want)
    for name, data in want.items():
        for here, there in (swap or {}).items() if name.endswith((".json", ".jsonl")) else ():
            data = data.replace(str(here).encode(), there.encode())
        assert got[name] == data, name


def test_cli_shards_into_a_bucket(ref, bucket, tmp_path):
    raw = ref / "raw"
    url = f"s3://{bucket}/shards"
    r = _cli("shard", raw, "--out", url, "--max-count", 40, "--max-error-rate", 1, "--json")
    assert json.loads(r.stdout)["out"] == url
    _same_output(f"{bucket}/shards", ref / "shards")
    # the table names the URL too; a rerun resumes from the bucket and changes nothing
    r = _cli("shard", raw, "--out", url, "--max-count", 40, "--max-error-rate", 1)
    assert url in " ".join(r.output.split())
    _same_output(f"{bucket}/shards", ref / "shards")


def test_cli_tokenizes_from_a_bucket_into_a_bucket(ref, bucket, tmp_path):
    """Shards, tokenizer, codes and tokens all in the bucket: the local run's bytes; and
    detokenize with the tokenizer in the bucket decodes what the local tokenizer does."""
    _put(ref / "shards", f"{bucket}/shards")
    _put(ref / "tok", f"{bucket}/tok")
    shards, tok, codes, tokens = (f"s3://{bucket}/{n}" for n in ("shards", "tok", "codes", "tokens"))
    r = _cli("tokenize-images", shards, "--tokenizer", tok, "--out", codes, "--json")
    assert json.loads(r.stdout)["out"] == codes
    _same_output(f"{bucket}/codes", ref / "codes", {ref / "shards": shards})
    _cli("tokenize", shards, "--tokenizer", tok, "--codes", codes, "--out", tokens, "--max-error-rate", 1, "--json")
    # the manifest's config names the inputs (and --codes) by URL; everything else is the local bytes
    _same_output(f"{bucket}/tokens", ref / "tokens", {ref / "shards": shards, ref / "codes": codes})
    _cli("detokenize", ref / "tokens", "--tokenizer", ref / "tok", "--out", tmp_path / "here", "--limit", 6)
    _cli("detokenize", ref / "tokens", "--tokenizer", tok, "--out", tmp_path / "there", "--limit", 6)
    here = {p.name: p.read_bytes() for p in (tmp_path / "here").iterdir() if p.suffix in (".txt", ".png")}
    assert here and here == {p.name: p.read_bytes() for p in (tmp_path / "there").iterdir() if p.suffix in (".txt", ".png")}


def test_cli_plans_a_mix_of_a_bucket_into_a_bucket(ref, bucket):
    from mmtok.loader import PlanLoader
    from mmtok.plan import read_plan_meta

    _put(ref / "tokens", f"{bucket}/tokens")
    tokens, plan = f"s3://{bucket}/tokens", f"s3://{bucket}/plan"
    _cli("balance-mix", tokens, "--out", plan, *MIX, "--json")
    # arrays and held-out shards byte for byte; plan.json names the source by URL, and by the
    # same relative path as the local plan, so it resolves to the bucket's tokens
    _same_output(f"{bucket}/plan", ref / "plan", {ref / "tokens": tokens})
    assert [s["path"] for s in read_plan_meta(plan)["sources"]] == ["../tokens"]
    remote, local = PlanLoader(plan), PlanLoader(ref / "plan")
    assert str(remote.corpus.dirs[0]) == tokens
    for a, b in zip(remote, local):
        assert all(_same_ints(a[k], b[k]) for k in a)


def _same_ints(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())  # integer tensors: exact


def test_cli_trains_from_and_into_a_bucket_and_resumes_on_another_machine(ref, bucket, tmp_path):
    """Stopped at step 2 on machine A, resumed from the bucket alone on machine B (an empty
    cache): the losses are the local uninterrupted run's, exactly (as the local resume test)."""
    _put(ref / "tokens", f"{bucket}/tokens")
    _put(ref / "plan", f"{bucket}/plan")
    plan, run = f"s3://{bucket}/plan", f"s3://{bucket}/run"
    r = _cli("train", "--plan", plan, "--out", run, *TINY_MOMA, "--steps", 4, "--stop-at-step", 2, "--json")
    assert json.loads(r.stdout)["checkpoint"].startswith(run + "/checkpoints/")
    assert _s3().cat_file(f"{bucket}/run/checkpoints/latest") == b"step-00000002"
    os.environ["MMTOK_CACHE"] = str(tmp_path / "machine-b")  # the fixture's monkeypatch restores it
    _cli("train", "--out", run, "--resume", *TINY_MOMA, "--steps", 4, "--json")

    def curve(text: str) -> list:
        return [tuple(r[k] for k in ("step", "loss", "grad_norm", "text_loss", "image_loss"))
                for r in map(json.loads, text.splitlines())]

    got = _bucket_files(f"{bucket}/run")
    assert curve(got["metrics.jsonl"].decode()) == curve((ref / "run" / "metrics.jsonl").read_text())
    assert got["checkpoints/latest"] == b"step-00000004"
    assert json.loads(got["config.json"])["plan"] == plan
    assert not [k for k in got if ".tmp" in k or ".old" in k or "lock" in k]


def test_cli_refuses_what_a_bucket_cannot_do_yet(bucket, ref):
    from typer.testing import CliRunner

    from mmtok.cli.app import app

    # your own torchrun would mirror one copy per process: refused (--nproc is the way)
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    r = CliRunner().invoke(app, ["tokenize-images", str(ref / "shards"), "--tokenizer", str(ref / "tok"),
                                 "--out", f"s3://{bucket}/codes"], env=env)
    assert r.exit_code == 2 and "use --nproc" in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(app, ["train", "--plan", str(ref / "plan"), "--out", f"s3://{bucket}/run"], env=env)
    assert r.exit_code == 2 and "rather than your own torchrun" in " ".join(r.output.split()), r.output
    r = CliRunner().invoke(app, ["train-vq", str(ref / "shards"), "--out", f"s3://{bucket}/tok", "--steps", "1"],
                           env=env)
    assert r.exit_code == 2 and "a URL is written by one process" in " ".join(r.output.split()), r.output


def test_cli_extracts_media_from_a_bucket_into_a_bucket(bucket, tmp_path):
    """extract-keyframes and extract-audio read shards at a URL and write to one: the local
    outputs' bytes (configs and quarantine name the URL where the local ones name the path)."""
    from typer.testing import CliRunner

    from helpers.media import make_video, wav_bytes
    from mmtok.cli.app import app

    raw = tmp_path / "raw"
    raw.mkdir()
    make_video(raw / "clip.mp4", seconds=2)
    (raw / "tone.wav").write_bytes(wav_bytes(seconds=1.0))
    _cli("shard", raw, "--out", tmp_path / "shards", "--json")
    _put(tmp_path / "shards", f"{bucket}/shards")
    shards = f"s3://{bucket}/shards"
    for command, opts in (("extract-keyframes", ["--frames", 2, "--size", 32]), ("extract-audio", ["--features", "fbank"])):
        _cli(command, tmp_path / "shards", "--out", tmp_path / command, *opts, "--json")
        r = _cli(command, shards, "--out", f"s3://{bucket}/{command}", *opts, "--json")
        assert json.loads(r.stdout)["out"] == f"s3://{bucket}/{command}"
        assert json.loads((tmp_path / command / "manifest.json").read_text())["totals"]["samples"] > 0
        _same_output(f"{bucket}/{command}", tmp_path / command, {tmp_path / "shards": shards})
    _put(raw, f"{bucket}/raw-media")  # raw files at a URL: shard them first
    r = CliRunner().invoke(app, ["extract-audio", f"s3://{bucket}/raw-media", "--out", str(tmp_path / "never")])
    assert r.exit_code == 2 and "not a shard directory" in " ".join(r.output.split()), r.output


def test_cli_trains_the_tokenizers_from_a_bucket_into_a_bucket(ref, bucket):
    """train-bpe (members read by ranges at the index's offsets) and train-vq read shards at a
    URL and write the tokenizer to one: the local tokenizer's files."""
    from safetensors.torch import load

    _put(ref / "shards", f"{bucket}/shards")
    shards, tok = f"s3://{bucket}/shards", f"s3://{bucket}/tok"
    r = _cli("train-bpe", shards, "--out", tok, "--vocab-size", 600, "--image-codes", 64, "--json")
    assert json.loads(r.stdout)["out"] == tok
    _cli("train-vq", shards, "--out", tok, "--steps", 2, "--batch-size", 4, "--codebook-size", 64, "--resolution", 16,
         "--downsample", 2, "--channels", 8, "--res-blocks", 1, "--disc-weight", 0, "--json")
    got = _bucket_files(f"{bucket}/tok")
    for name in ("bpe.model", "bpe.vocab", "vocab.json", "vq.json"):
        assert got[name] == (ref / "tok" / name).read_bytes(), name
    there, here = load(got["vq.safetensors"]), load((ref / "tok" / "vq.safetensors").read_bytes())
    assert sorted(there) == sorted(here)
    for k in here:  # the same two steps on the same images: only summation order could differ
        assert torch.allclose(there[k], here[k], rtol=1e-5, atol=1e-6), k


@pytest.mark.slow
def test_nproc_processes_write_one_copy_of_a_bucket(ref, bucket):
    """--nproc with a URL --out: this process mirrors the URL while the processes it starts
    write its one local copy: tokenize-images on 2 processes leaves one process's bytes in
    the bucket, and a 2-process run's checkpoints land there, named by URL."""
    from helpers.runs import cli_subprocess

    codes, run = f"s3://{bucket}/codes", f"s3://{bucket}/run"
    r = cli_subprocess(["tokenize-images", ref / "shards", "--tokenizer", ref / "tok", "--out", codes, "--nproc", 2,
                        "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["out"] == codes
    _same_output(f"{bucket}/codes", ref / "codes")
    r = cli_subprocess(["train", "--plan", ref / "plan", "--out", run, *TINY_MOMA, "--steps", 2, "--nproc", 2, "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    assert summary["world_size"] == 2 and summary["checkpoint"] == f"{run}/checkpoints/step-00000002"
    got = _bucket_files(f"{bucket}/run")
    assert got["checkpoints/latest"] == b"step-00000002" and len(got["metrics.jsonl"].splitlines()) == 2


def _raw_tree(root: Path) -> Path:
    """Raw inputs of every layout a walk meets: stem pairs, a JSON-lines and a CSV manifest
    naming files beside them, a Parquet manifest holding its images, a tar, an audio pair
    (ffmpeg reads it), and inputs to quarantine (bad UTF-8, a row naming a missing file)."""
    import csv
    import tarfile

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile as sf

    def png(seed: int) -> bytes:
        b = io.BytesIO()
        draw_shape("square", "red", "white", size=24 + seed, seed=seed).save(b, "PNG")
        return b.getvalue()

    (root / "sub" / "pics").mkdir(parents=True)
    (root / "a.png").write_bytes(png(1))
    (root / "a.txt").write_text("a red square")
    (root / "notes.txt").write_text("plain text: naïve café")
    (root / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (root / "sub" / "pics" / "dog.png").write_bytes(png(2))
    (root / "sub" / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"image": "pics/dog.png", "caption": "a dog, by a relative path"},
        {"segments": [{"text": "before"}, {"image": "pics/dog.png"}, {"text": "after"}]},
        {"image": "pics/missing.png", "caption": "names no file"}]) + "\n")
    with open(root / "sub" / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["text"])
        w.writeheader()
        w.writerow({"text": "a csv row"})
    pq.write_table(pa.table({"jpg": [png(3)], "caption": ["held in the row"]}), root / "sub" / "held.parquet")
    with tarfile.open(root / "old.tar", "w") as t:
        for name, data in (("s1.png", png(4)), ("s1.txt", b"from a tar")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    b = io.BytesIO()
    sf.write(b, (0.3 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 440)).astype("float32"), 16000, format="WAV")
    (root / "speech.wav").write_bytes(b.getvalue())
    (root / "speech.txt").write_text("a tone")
    return root


def test_cli_shards_raw_inputs_from_a_bucket(bucket, tmp_path):
    """Raw files, manifests and tars under a bucket prefix shard to what the same tree
    gives locally: the same samples, payloads and quarantine records, with the URL where
    the local run names its path."""
    raw = _raw_tree(tmp_path / "raw")
    _put(raw, f"{bucket}/raw")
    url = f"s3://{bucket}/raw"
    local = _cli("shard", raw, "--out", tmp_path / "here", "--max-error-rate", 1, "--json")
    remote = _cli("shard", url, "--out", tmp_path / "there", "--max-error-rate", 1, "--json")
    want, got = json.loads(local.stdout), json.loads(remote.stdout)
    assert want["quarantined"] == 2 and got["by_modality"] == want["by_modality"]
    assert {"pair", "text", "doc", "audio_pair"} <= set(want["by_modality"])

    def samples(d):
        return {s.key: s.members for s in ShardReader(d)}

    here, there = samples(tmp_path / "here"), samples(tmp_path / "there")
    assert sorted(there) == sorted(here)
    for key, members in here.items():
        expect = dict(members)
        expect["json"] = members["json"].replace(str(raw).encode(), url.encode())
        assert there[key] == expect, key
    swap = (tmp_path / "here" / "quarantine.jsonl").read_text().replace(str(raw), url)
    assert (tmp_path / "there" / "quarantine.jsonl").read_text() == swap


def test_an_input_url_without_credentials_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mmtok.cli.app import app

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: no instance metadata either
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    for cmd in (["shard", "s3://no-such-bucket-here/raw", "--out", str(tmp_path / "s")],
                ["tokenize-images", "s3://no-such-bucket-here/shards", "--tokenizer", str(tmp_path), "--out",
                 str(tmp_path / "c")]):
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output and "s3://no-such-bucket-here/" in r.output and "credentials" in r.output


def test_cli_reads_a_run_and_a_tokenizer_from_a_bucket(ref, bucket, tmp_path):
    """eval, export and generate take a run (and a tokenizer, and eval its data) at a URL: pulled into the cache,
    scored or exported as the local directory is; eval's default report goes back under the run."""
    _put(ref / "run", f"{bucket}/run")
    _put(ref / "tok", f"{bucket}/tok")
    run, tok = f"s3://{bucket}/run", f"s3://{bucket}/tok"
    here = json.loads(_cli("eval", ref / "run", "--data", ref / "tokens", "--out", tmp_path / "e", "--json").stdout)
    _put(ref / "tokens", f"{bucket}/tokens")  # the held-out tokens in the bucket too, read in place
    there = json.loads(_cli("eval", run, "--data", f"s3://{bucket}/tokens", "--json").stdout)
    assert there["heldout"]["all"]["loss"] == pytest.approx(here["heldout"]["all"]["loss"], rel=1e-6)
    report = json.loads(_s3().cat_file(f"{bucket}/run/eval/eval.json"))
    assert report["heldout"]["all"]["tokens"] == here["heldout"]["all"]["tokens"] > 0
    _cli("export", ref / "run", "--out", tmp_path / "x", "--tokenizer", ref / "tok")
    _cli("export", run, "--out", f"s3://{bucket}/export", "--tokenizer", tok)
    _same_output(f"{bucket}/export", tmp_path / "x", swap={ref / "run": run, ref / "tok": tok})
    # the export in the bucket bundles its tokenizer: generate needs nothing else
    r = _cli("generate", f"s3://{bucket}/export", "--prompt", "text", "--max-tokens", 4, "--temperature", 0,
             "--out", tmp_path / "g", "--json")
    assert json.loads(r.stdout)["new_tokens"] >= 1


def test_inspect_reads_a_run_a_plan_an_export_and_a_tokenizer_at_a_url(ref, bucket, tmp_path):
    """`mmtok inspect URL` of each directory kind that is not a stage's output gives the local
    directory's report (paths inside read as URLs), from its JSON files and headers alone."""
    _cli("export", ref / "run", "--out", tmp_path / "export", "--tokenizer", ref / "tok")
    kinds = {"run": ref / "run", "plan": ref / "plan", "export": tmp_path / "export", "tokenizer": ref / "tok"}
    for kind, local in kinds.items():
        _put(local, f"{bucket}/{kind}")
        url = f"s3://{bucket}/{kind}"
        here = _cli("inspect", local, "--json").stdout.replace(str(local), url)
        there = json.loads(_cli("inspect", url, "--json").stdout)
        assert there == json.loads(here) and there["kind"] == kind, kind
    # a run's files are read, never its checkpoint tensors: the report holds without them
    _s3().rm(f"{bucket}/run/checkpoints", recursive=True)
    _put(ref / "run" / "checkpoints" / "latest", f"{bucket}/run/checkpoints/latest")
    assert json.loads(_cli("inspect", f"s3://{bucket}/run", "--json").stdout)["kind"] == "run"


def test_a_missing_tokenizer_url_is_one_line(ref, bucket):
    from typer.testing import CliRunner

    from mmtok.cli.app import app

    r = CliRunner().invoke(app, ["tokenize", str(ref / "shards"), "--tokenizer", f"s3://{bucket}/no-tok",
                                 "--out", str(ref / "never")])
    assert r.exit_code == 2 and "nothing there" in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output and not (ref / "never").exists()


def test_ranks_reading_one_tokenizer_url_wait_for_each_others_pull(bucket):
    """Every rank (or actor) of a stage loads the tokenizer itself: a second one waits for
    the pull in progress, instead of failing on its lock, and reads the same copy."""
    import threading

    from mmtok.locks import exclusive
    from mmtok.mirror import _input_home, local_copy
    from mmtok.fs import as_location

    url = f"s3://{bucket}/tok"
    _s3().pipe(f"{bucket}/tok/vocab.json", b"{}")
    got = []
    with exclusive(_input_home(as_location(url))):  # another rank's pull in progress
        t = threading.Thread(target=lambda: got.append(local_copy(url)))
        t.start()
        t.join(1.0)
        assert t.is_alive() and not got  # waiting, not refused
    t.join(30)
    assert got and (got[0] / "vocab.json").read_bytes() == b"{}"
    assert local_copy(url) == got[0]


def test_a_pull_never_writes_outside_its_copy(bucket, tmp_path):
    """Object keys may hold `..`: a pulled run's files stay in the cache's copy."""
    from mmtok.mirror import remote_input

    s3 = _s3()
    s3.pipe(f"{bucket}/run/config.json", b"{}")
    import boto3

    boto3.client("s3").put_object(Bucket=bucket, Key="run/../../../../escaped.txt", Body=b"x")
    with remote_input(f"s3://{bucket}/run") as local:
        assert sorted(p.name for p in local.rglob("*") if p.is_file()) == ["config.json"]
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path.parent / "escaped.txt").exists()
