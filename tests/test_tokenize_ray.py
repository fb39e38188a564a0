"""`tokenize-images` and `tokenize` with `--backend ray`: Ray actors that load the tokenizer
once, each on its share of the input shards, joined into the one-process output byte for byte."""

from __future__ import annotations

import json
import pickle

import pytest
from typer.testing import CliRunner

from helpers.media import TRICKY, draw_image, make_shards
from helpers.outputs import files

import mmtok.actors
from mmtok.actors import Share, actor_plan
from mmtok.cli.app import app
from mmtok.runner import StageError
from mmtok.shards import ShardReader
from mmtok.tokenize import ImageCodes, Tokenizer, Tokenize

runner = CliRunner()


@pytest.fixture
def shards(tmp_path):
    d = make_shards(tmp_path / "in", texts=TRICKY[:4] + [b"bad \xff bytes"],
                    images=[draw_image(200 + i) for i in range(7)],
                    pairs=[(draw_image(300 + i), f"caption {i}") for i in range(12)] + [(b"not an image", "x")],
                    docs=[["A doc ", draw_image(400), " ends."]])
    assert len(ShardReader(d).manifest["shards"]) >= 6  # shares to split
    return d


def cli(*args):
    r = runner.invoke(app, [*map(str, args), "--device", "cpu", "--quiet", "--max-error-rate", "1"])
    assert r.exit_code == 0, r.output
    return r


@pytest.mark.slow  # starts a local Ray instance and two actors that import torch: ~30 s on 2 cores
def test_two_ray_actors_write_the_bytes_of_one_process(tokdir, shards, tmp_path, monkeypatch):  # noqa: F811
    import ray

    plans = []
    real = mmtok.actors.actor_plan
    monkeypatch.setattr(mmtok.actors, "actor_plan", lambda *a: plans.append(real(*a)) or plans[-1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for tag, opts in (("one", []), ("ray", ["--backend", "ray", "--actors", "2"])):
            cli("tokenize-images", shards, "-t", tokdir, "--out", tmp_path / f"codes-{tag}", *opts)
            cli("tokenize", shards, "-t", tokdir, "--out", tmp_path / f"tokens-{tag}", *opts)
            cli("tokenize", shards, "-t", tokdir, "--codes", tmp_path / "codes-one", "--out",  # the same --codes
                tmp_path / f"reused-{tag}", *opts)
        assert [n for n, _, _ in plans] == [2, 2, 2]  # every Ray run took two actors, none ran here
        assert {device for _, _, device in plans} == {"cpu"}
        for name in ("codes", "tokens", "reused"):
            one, on_ray = files(tmp_path / f"{name}-one"), files(tmp_path / f"{name}-ray")
            assert "quarantine.jsonl" in one
            assert on_ray == one, name  # shards, index, manifest, quarantine, stats, job record
            assert not (tmp_path / f"{name}-ray" / "_parts").exists()
        totals = json.loads((tmp_path / "codes-ray" / "manifest.json").read_text())["totals"]
        assert totals["samples"] == 7 + 12 + 1 and totals["quarantined"] == 1
        # a rerun of the finished job starts no actor and changes nothing
        before = files(tmp_path / "codes-ray")
        cli("tokenize-images", shards, "-t", tokdir, "--out", tmp_path / "codes-ray", "--backend", "ray",
            "--actors", "2")
        assert len(plans) == 3 and files(tmp_path / "codes-ray") == before
        # the driver's bar counts the actors' items up to the stage's true total
        r = runner.invoke(app, ["tokenize-images", str(shards), "-t", str(tokdir), "--out", str(tmp_path / "codes-bar"),
                                "--backend", "ray", "--actors", "2", "--device", "cpu", "--max-error-rate", "1"])
        assert r.exit_code == 0, r.output
        assert f"{totals['samples'] + totals['quarantined']}/{totals['samples'] + totals['quarantined']}" in r.output
        assert ray.is_initialized(), "the command shut down a Ray instance it did not start"
    finally:
        ray.shutdown()


def test_what_the_driver_sends_an_actor_is_small(tokdir, shards, tmp_path):  # noqa: F811
    """The recipe (paths, numbers), the config and a share: no model and no image bytes."""
    tok = Tokenizer.load(tokdir, device="cpu")
    for stage in (ImageCodes([shards], tok), Tokenize([shards], tok, [])):
        share = Share(str(tmp_path / "out"), stage.config, [10] * 12, 1, 2, False, 10_000, 1 << 30)
        sent = pickle.dumps((stage.recipe, share))
        assert len(sent) < 8_000 < (tokdir / "vq.safetensors").stat().st_size, len(sent)  # not the VQ
        assert b"\x89PNG" not in sent  # nor an image: the actor reads its share itself
        again = stage.recipe("cpu")  # what the actor builds: the driver's stage
        assert type(again) is type(stage) and again.config == stage.config


class _Cluster:
    def __init__(self, **have):
        self.have = have

    def cluster_resources(self):
        return self.have


def test_actor_plan_places_one_actor_per_gpu_or_cpu_and_refuses_what_cannot_be_placed():
    assert actor_plan(_Cluster(CPU=64, GPU=8), None, 1, None) == (8, {"num_gpus": 1, "num_cpus": 0}, "cuda")
    assert actor_plan(_Cluster(CPU=64, GPU=8), 3, 1, "cuda") == (3, {"num_gpus": 1, "num_cpus": 0}, "cuda")
    assert actor_plan(_Cluster(CPU=64, GPU=8), None, 4, "cpu") == (4, {"num_cpus": 1}, "cpu")
    assert actor_plan(_Cluster(CPU=4), None, 3, None) == (3, {"num_cpus": 1}, "cpu")
    with pytest.raises(StageError, match="--actors 9: the Ray cluster has 8 GPUs"):
        actor_plan(_Cluster(CPU=64, GPU=8), 9, 1, None)
    with pytest.raises(StageError, match="5 actors of one CPU each: the Ray cluster has 4 CPUs"):
        actor_plan(_Cluster(CPU=4), 5, 1, None)
    with pytest.raises(StageError, match="--device cuda: the Ray cluster has no GPUs"):
        actor_plan(_Cluster(CPU=4), 2, 1, "cuda")


@pytest.mark.parametrize("args, message", [
    (["--actors", "2"], "--actors sets the Ray actors of --backend ray; for processes on this machine use --nproc"),
    (["--backend", "ray", "--nproc", "2"], "--nproc runs processes on this machine; with --backend ray use --actors N"),
    (["--backend", "ray", "--out", "s3://bucket/codes"], "a URL is written from one machine"),
])
def test_bad_combinations_are_refused_before_any_work(tokdir, shards, tmp_path, args, message):  # noqa: F811
    out = ["--out", str(tmp_path / "codes")] if "--out" not in args else []
    for command in ("tokenize-images", "tokenize"):
        r = runner.invoke(app, [command, str(shards), "-t", str(tokdir), *out, *args])
        assert r.exit_code == 2, r.output
        assert message in " ".join(r.output.split())
        assert "Traceback" not in r.output
        assert not (tmp_path / "codes").exists()
