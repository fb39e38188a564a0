"""`--backend ray`: the same stage functions as Ray tasks give the same bytes as the local pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers.media import make_video, png_bytes
from helpers.outputs import quarantine, tree_bytes
from helpers.procs import kill_midway
from mmtok.cli.app import app
from mmtok.runner import Item, Sample, StageError, run_stage
from mmtok.shards import ShardReader

pytestmark = pytest.mark.slow  # a Ray instance takes seconds to start here: about 40 s in all on 2 cores
runner = CliRunner()


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray instance for the module, started the way a user would start their own."""
    import signal

    import ray

    handler = signal.getsignal(signal.SIGTERM)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    signal.signal(signal.SIGTERM, handler)  # Ray's driver handler outlives shutdown


def cli(*args: str):
    return runner.invoke(app, [*args, "--quiet"])


@pytest.fixture
def ray_runs(monkeypatch):
    """How many times the runner took its Ray path: a command that dropped `--backend` on
    its way to `run_stage` would still give the local bytes, and only this would tell."""
    import mmtok.dispatch

    calls = []
    real = mmtok.dispatch._ray_tasks
    monkeypatch.setattr(mmtok.dispatch, "_ray_tasks", lambda *a: calls.append(1) or real(*a))
    return calls


def test_closures_run_as_ray_tasks_and_come_back_in_order(tmp_path: Path, ray_cluster):
    offset = 7  # captured: the function travels to the workers with its closure

    def fn(n: int) -> Sample:
        time.sleep(0.3 if n < 4 else 0)  # the first task finishes last
        return Sample(f"k{n:02d}", "text", {"txt": str(n + offset).encode()}, {"pid": os.getpid()})

    out = tmp_path / "o"
    run_stage("t", [Item(str(i), i) for i in range(24)], fn, out, config={}, workers=2, backend="ray",
              progress=False)
    samples = list(ShardReader(out))
    assert [s.key for s in samples] == [f"k{i:02d}" for i in range(24)]
    assert [int(s.members["txt"]) for s in samples] == [i + 7 for i in range(24)]
    pids = {s.meta["pid"] for s in samples}
    assert os.getpid() not in pids and len(pids) >= 2  # ran in Ray's worker processes


def test_shard_on_ray_equals_local(corpus: Path, tmp_path: Path, ray_cluster, ray_runs):
    (corpus / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    common = ["--max-count", "3", "--workers", "2", "--max-error-rate", "1"]
    assert cli("shard", str(corpus), "--out", str(local), *common).exit_code == 0
    assert not ray_runs
    res = cli("shard", str(corpus), "--out", str(on_ray), *common, "--backend", "ray")
    assert res.exit_code == 0, res.output
    assert ray_runs == [1]
    assert {q["input"].rsplit("/", 1)[-1] for q in quarantine(on_ray)} == {"broken", "latin1"}
    assert len(list(on_ray.glob("*.tar"))) > 3
    assert tree_bytes(on_ray) == tree_bytes(local)  # shards, index, manifest, quarantine log
    assert ray_cluster.is_initialized(), "the runner shut down a Ray instance it did not start"


def test_extract_keyframes_on_ray_equals_local(tmp_path: Path, ray_cluster, ray_runs):
    d = tmp_path / "in"
    d.mkdir()
    make_video(d / "a.mp4", src="testsrc")
    make_video(d / "b.mp4", seconds=2, src="testsrc2")
    (d / "c.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    outs = []
    for backend in ("local", "ray"):
        out = tmp_path / backend
        res = cli("extract-keyframes", str(d), "--out", str(out), "--frames", "3", "--size", "32", "--workers", "2",
                  "--max-error-rate", "1", "--backend", backend)
        assert res.exit_code == 0, res.output
        outs.append(out)
    assert ray_runs == [1]  # the local run did not take the Ray path, the Ray run did
    assert json.loads((outs[1] / "manifest.json").read_text())["totals"]["samples"] == 6
    assert [q["input"].rsplit("/", 1)[-1] for q in quarantine(outs[1])] == ["c.mp4"]
    assert tree_bytes(outs[1]) == tree_bytes(outs[0])


def test_killed_ray_run_resumes(tmp_path: Path, ray_cluster):
    """SIGKILL a `mmtok shard --backend ray` process attached to a running cluster
    (RAY_ADDRESS), rerun it: the same bytes as a local run, and the cluster lives on."""
    d = tmp_path / "in"
    d.mkdir()
    for i in range(160):
        (d / f"i{i:03d}.png").write_bytes(png_bytes(seed=i, size=32 + i % 40, fg=["red", "green"][i % 2]))
    cmd = [sys.executable, "-m", "mmtok.cli.app", "shard", str(d), "--max-count", "5", "--workers", "2", "--quiet"]
    assert cli("shard", str(d), "--out", str(tmp_path / "ref"), "--max-count", "5").exit_code == 0
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    out = tmp_path / "out"
    done_before = kill_midway(cmd + ["--backend", "ray"], out, env)
    res = subprocess.run(cmd + ["--out", str(out), "--backend", "ray", "--json"], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["resumed_shards"] >= done_before > 0
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    assert ray_cluster.cluster_resources().get("CPU") == 2, "the cluster did not survive its client's death"


def test_dead_worker_stops_the_job_with_a_clear_error(tmp_path: Path, ray_cluster):
    def fn(n: int) -> Sample:
        if n == 5:
            os._exit(1)  # the worker process dies, as on a segfault in a decoder or a lost node
        return Sample(f"k{n:02d}", "text", {"txt": b"x"}, {})

    with pytest.raises(StageError, match="a Ray task failed .*rerun the same command to resume"):
        run_stage("t", [Item(str(i), i) for i in range(8)], fn, tmp_path / "o", config={}, workers=2,
                  backend="ray", progress=False)
    assert ray_cluster.is_initialized()


def test_a_ray_session_mmtok_starts_gives_sigterm_back(tmp_path: Path):
    # ray.init installs its own SIGTERM handler (an exit with no message) and shutdown leaves
    # it: a later process pool forked from this process would inherit it (its workers then
    # ignore the pool's SIGTERM).
    # A fresh process, so that no Ray is running yet and mmtok starts its own.
    script = tmp_path / "session.py"
    script.write_text(
        "import contextlib, signal\n"
        "from mmtok.dispatch import ray_session\n"
        "mine = lambda *a: None\n"
        "signal.signal(signal.SIGTERM, mine)\n"
        "with contextlib.ExitStack() as stack:\n"
        "    ray_session(1, stack)\n"
        "    during = signal.getsignal(signal.SIGTERM) is mine\n"
        "print(during, signal.getsignal(signal.SIGTERM) is mine)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    # ours while Ray ran too (SIGTERM ends a Ray stage like Ctrl-C: exit 130), and after it
    assert done.stdout.split()[-2:] == ["True", "True"]


def test_unknown_backend_refused(tmp_path: Path):
    (tmp_path / "a.txt").write_text("hello")
    res = cli("shard", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--backend", "spark")
    assert res.exit_code == 2
    assert "'spark': use one of local, ray" in res.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(StageError, match="unknown backend 'spark'"):
        run_stage("t", [], str, tmp_path / "o", config={}, backend="spark")


def test_missing_ray_is_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    (tmp_path / "a.txt").write_text("hello")
    res = cli("shard", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--backend", "ray")
    assert res.exit_code == 2
    assert "--backend ray needs Ray: pip install 'mmtok[ray]'" in res.output
    with pytest.raises(StageError, match="needs Ray"):
        run_stage("t", [Item("x", 1)], str, tmp_path / "o2", config={}, backend="ray", progress=False)


def test_ffmpeg_reason_does_not_depend_on_thread_timing():
    """ffmpeg's threads log their teardown in a racy order; the quarantine reason (and so the
    log compared above) must not follow it. The two orders below were seen on a bad .flac."""
    from mmtok.media import error_reason

    a = ["[af#0:0 @ 0x5] Task finished with error code: -1094995529 (Invalid data found when processing input)",
         "[af#0:0 @ 0x5] Terminating thread with return code -1094995529 (Invalid data found when processing input)",
         "[aost#0:0/pcm_f32le @ 0x6] Task finished with error code: -22 (Invalid argument)",
         "[aost#0:0/pcm_f32le @ 0x6] Terminating thread with return code -22 (Invalid argument)"]
    b = [a[0], a[2], a[1], a[3]]
    assert error_reason("\n".join(a)) == error_reason("\n".join(b))
    assert "Invalid data found" in error_reason("\n".join(b)) and "Invalid argument" in error_reason("\n".join(b))
