"""Tokenizing on several processes (`--nproc`, torchrun ranks): each rank takes its share of
the input shards and rank 0 joins the shares into exactly the output of one process. Also
several `--codes` directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from typer.testing import CliRunner

from helpers.media import TRICKY, draw_image, make_shards
from helpers.outputs import files

from mmtok.cli.app import app
from mmtok.shards import ShardReader
from mmtok.tokenize import Tokenizer, tokenize, tokenize_images


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}


RANKS_SCRIPT = textwrap.dedent('''
    import sys
    import time
    from mmtok.ranks import run_stage_ranks
    from mmtok.runner import Item, Quarantined, Sample, run_stage
    from mmtok.tokenize import world

    # 5 input "shards" of unequal size; two output groups; every 7th item is bad
    shards = [list(range(a, b)) for a, b in ((0, 9), (9, 10), (10, 31), (31, 40), (40, 47))]

    def items_of(start, end):
        for x in (x for shard in shards[start:end] for x in shard):
            yield Item(f"in:{x}", x)

    def fn(x):
        time.sleep(0.01)  # the shares' work: ~0.2 s per rank, which the joined summary counts
        if x % 7 == 3:
            return Quarantined("", f"item {x} is bad")
        return Sample(f"k{x:04d}", "odd" if x % 2 else "even", {"txt": str(x).encode() * (x % 5 + 1)},
                      {"modality": "text", "source": f"in:{x}", "sha256": str(x)}, {"n": x})

    rank, world_size = world()
    opts = dict(config={"inputs": [], "test": 1}, max_count=3, progress=False, max_error_rate=0.5, total=47)
    if world_size == 1:
        run_stage("t", items_of(0, None), fn, sys.argv[1], **opts)
    else:
        s = run_stage_ranks("t", items_of, fn, sys.argv[1], weights=[len(s) for s in shards], rank=rank,
                            world_size=world_size, **opts)
        assert (s is None) == (rank != 0)
        assert rank != 0 or s.seconds >= 0.2, s.seconds  # the whole job's time, not the join's alone
''')


def torchrun(nproc: int, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           *map(str, args)], env=env(), capture_output=True, text=True, timeout=300)


def test_ranks_join_into_the_bytes_of_one_process(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(RANKS_SCRIPT)
    one = subprocess.run([sys.executable, str(script), tmp_path / "one"], env=env(), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    r = torchrun(2, script, tmp_path / "two")
    assert r.returncode == 0, r.stderr
    a, b = files(tmp_path / "one"), files(tmp_path / "two")
    assert len([n for n in a if n.endswith(".tar")]) > 4  # several shards per group: boundaries matter
    assert a == b  # shards, index, manifest, quarantine, stats records, job record: byte for byte
    assert not (tmp_path / "two" / "_parts").exists()
    r = torchrun(2, script, tmp_path / "two")  # a rerun of the finished job: nothing redone, nothing changed
    assert r.returncode == 0, r.stderr
    assert files(tmp_path / "two") == b


def mmtok(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmtok.cli.app", *map(str, args)], env=env(), capture_output=True,
                          text=True, timeout=600)


def test_tokenize_images_and_tokenize_on_two_processes(tokdir, tmp_path):
    shards = make_shards(tmp_path / "in", texts=TRICKY[:5] + [b"bad \xff bytes"],
                         images=[draw_image(200 + i) for i in range(9)],
                         pairs=[(draw_image(300 + i), f"caption {i}") for i in range(16)] + [(b"not an image", "x")],
                         docs=[["A doc ", draw_image(400), " ends."]])
    assert len(ShardReader(shards).manifest["shards"]) >= 6  # shares to split
    common = ["--tokenizer", tokdir, "--device", "cpu", "--quiet", "--max-error-rate", "1"]
    for n in (1, 2):
        r = mmtok("tokenize-images", shards, "--out", tmp_path / f"codes{n}", "--nproc", n, *common, "--json")
        assert r.returncode == 0, r.stderr
        r = mmtok("tokenize", shards, "--out", tmp_path / f"tokens{n}", "--nproc", n, *common)
        assert r.returncode == 0, r.stderr
    for name in ("codes", "tokens"):
        one, two = files(tmp_path / f"{name}1"), files(tmp_path / f"{name}2")
        assert one == two, name  # the same shards, index, manifest and quarantine, byte for byte
        assert "quarantine.jsonl" in one
    summary = json.loads((tmp_path / "codes2" / "manifest.json").read_text())["totals"]
    assert summary["samples"] == 9 + 16 + 1 and summary["quarantined"] == 1


def test_several_codes_directories_are_read_in_place(tokdir, tmp_path):
    tok = Tokenizer.load(tokdir, device="cpu")
    a = make_shards(tmp_path / "a", pairs=[(draw_image(500 + i), f"a {i}") for i in range(5)])
    b = make_shards(tmp_path / "b", pairs=[(draw_image(600 + i), f"b {i}") for i in range(5)])
    opts = dict(progress=False)
    tokenize_images([a], tok, tmp_path / "codes_a", **opts)
    tokenize_images([b], tok, tmp_path / "codes_b", **opts)
    tokenize([a, b], tok, tmp_path / "plain", **opts)

    encoded = []  # with both code directories, no image is encoded again
    real = tok.encode_images
    tok.encode_images = lambda images, *a, **k: encoded.append(len(images)) or real(images, *a, **k)
    try:
        tokenize([a, b], tok, tmp_path / "reused", codes_dir=[tmp_path / "codes_a", tmp_path / "codes_b"], **opts)
    finally:
        tok.encode_images = real
    assert encoded == []
    shards = lambda d: json.loads((tmp_path / d / "manifest.json").read_text())["shards"]  # noqa: E731
    assert shards("plain") == shards("reused")  # the same tokens as encoding them here
    config = json.loads((tmp_path / "reused" / "manifest.json").read_text())["config"]
    assert config["codes"] == [str((tmp_path / "codes_a").resolve()), str((tmp_path / "codes_b").resolve())]
    # the command: --codes repeated, the same bytes as the library call
    r = CliRunner().invoke(app, ["tokenize", str(a), str(b), "-t", str(tokdir), "--device", "cpu", "--quiet",
                                 "--codes", str(tmp_path / "codes_a"), "--codes", str(tmp_path / "codes_b"),
                                 "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert files(tmp_path / "cli") == files(tmp_path / "reused")
