"""Reading a training run never runs code from it (issue 12): a payload planted in a real
checkpoint's DCP metadata or data files is refused by every command that reads runs.
Also: `latest` cannot point outside the run, per-file checksums catch damage (--resume
falls back to the newest intact checkpoint), a run killed before its first checkpoint
restarts with the same command, and two trainers on one --out are refused."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from helpers.runs import VOCAB, make_plan
from mmtok.cli.app import app
from mmtok.locks import exclusive
from mmtok.trainer import checkpoint_io
from mmtok.trainer.checkpoint import SkippedCheckpoint, latest_checkpoint

# 1t1i: every reader applies (upcycle and the aux-router stage take MoMa runs)
TRAIN = ["--model", "moma", "--experts", "1t1i", "--lr", "0.01", "--warmup", "2", "--steps", 4, "--ckpt-every", 2, "--json"]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def cli(*args):
    r = invoke(*args)
    assert "Traceback" not in (r.output or ""), r.output
    return r


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A MoMa 1t1i run of 4 steps with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("safety")
    data = make_plan(root, steps=40)
    run = root / "run"
    r = cli("train", "--plan", data["plan"], "--out", run, *TRAIN)
    assert r.exit_code == 0, r.output
    return {"root": root, "run": run, **data}


def copy_run(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    (run / ".mmtok.lock").unlink(missing_ok=True)
    return run


class Payload:
    """Unpickled, it writes the marker file: what a malicious shared run would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def plant(ckpt, marker, where: str) -> None:
    """Put the payload into `ckpt`, then rewrite its checksums as a sender could: only the
    way the checkpoint is read may stop it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    md = pickle.loads((ckpt / ".metadata").read_bytes())  # our own file: the test trusts it
    if where == "metadata":
        md.planner_data["x"] = Payload(marker)
    else:  # a model weight declared as bytes, which stock DCP loads with weights_only=False
        key = next(k for k in md.state_dict_metadata if k.startswith("model."))
        buf = io.BytesIO()
        torch.save(Payload(marker), buf)
        (ckpt / "__9_0.distcp").write_bytes(buf.getvalue())
        md.state_dict_metadata[key] = BytesStorageMetadata()
        md.storage_data[MetadataIndex(key)] = _StorageInfo("__9_0.distcp", 0, len(buf.getvalue()))
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    checkpoint_io.write_checksums(ckpt)


UNIMOE = dict(vocab_size=VOCAB["vocab_size"], image_range=tuple(VOCAB["image_range"]), n_layers=2, d_model=32, n_heads=2,
              ffn_hidden=64, queries=4, connector_layers=1, enc_width=16, enc_heads=2, max_seq_len=64)


def unimoe_run(out):
    """A uni-moe stage's run directory with a real checkpoint (step 0), as `train_stage` writes it."""
    from mmtok.trainer.config import TrainConfig
    from mmtok.trainer.checkpoint import Checkpointer, LoaderState
    from mmtok.trainer.train import build_optimizer
    from mmtok.trainer.unimoe import UniMoE, UniMoEConfig
    from mmtok.trainer.unimoe_train import UniMoERun

    cfg = UniMoERun(UniMoEConfig(**UNIMOE), TrainConfig(), "align")
    model = UniMoE(cfg.model)
    model.set_stage("align")
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.as_dict()))
    Checkpointer(out, 0, 1).save(0, model, build_optimizer(model, cfg.train), LoaderState({}), cfg.checkpoint_meta(1))
    return out


def unimoe_init(run, stage: str):
    """Uni-MoE --init: stage align starts from a dense (here any) run, experts from an align run."""
    from mmtok.trainer.config import TrainConfig
    from mmtok.trainer.unimoe import UniMoE, UniMoEConfig
    from mmtok.trainer.unimoe_train import UniMoERun, init_weights

    cfg = UniMoEConfig(**UNIMOE)
    init_weights(UniMoE(cfg), UniMoERun(cfg, TrainConfig(), stage, str(run)))


ENTRY_POINTS = {
    "train --resume": lambda b, run, tmp: invoke("train", "--plan", b["plan"], "--out", run, *TRAIN, "--steps", 6,
                                                 "--resume"),
    "export": lambda b, run, tmp: invoke("export", run, "--to", tmp / "export"),
    "eval": lambda b, run, tmp: invoke("eval", "--checkpoint", run, "--data", b["text"], "--out", tmp / "eval"),
    "generate": lambda b, run, tmp: invoke("generate", "--checkpoint", run, "--tokenizer", tmp, "--prompt", "a",
                                           "--out", tmp / "gen"),
    "upcycle": lambda b, run, tmp: invoke("upcycle", run, "--experts", "2t2i", "--out", tmp / "up"),
    "aux-routers": lambda b, run, tmp: invoke("train", "--stage", "aux-routers", "--resume", "--plan", b["plan"],
                                              "--out", run, "--steps", 1),
    "uni-moe --init dense": lambda b, run, tmp: unimoe_init(run, "align"),
    "uni-moe --init run": lambda b, run, tmp: unimoe_init(run, "experts"),
}


@pytest.mark.parametrize("where", ["metadata", "data"])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_payload_in_a_checkpoint_is_refused_and_never_runs(base, tmp_path, monkeypatch, entry, where):
    import mmtok.tokenize

    # generate loads its tokenizer first; any will do, since the checkpoint is refused before it is used
    monkeypatch.setattr(mmtok.tokenize.Tokenizer, "load", classmethod(lambda cls, *a, **k: object()))
    run = unimoe_run(tmp_path / "run") if entry == "uni-moe --init run" else copy_run(base, tmp_path)
    marker = tmp_path / "marker"
    plant(latest_checkpoint(run), marker, where)
    try:
        r = ENTRY_POINTS[entry](base, run, tmp_path)
    except Exception as e:  # the library entry points raise what the CLI prints
        r, message = None, f"{type(e).__name__}: {e}"
    assert not marker.exists(), f"{entry} ran the payload"
    if r is None:
        assert message.startswith(("TrainError", "CheckpointError")), message
    else:
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        message = r.output
    expected = ".metadata: refused" if where == "metadata" else "only tensors and plain values are read"
    assert expected in " ".join(message.split()) and latest_checkpoint(run).name in message, message


def test_checkpoints_list_every_file_and_load_with_plain_values(base):
    ckpt = latest_checkpoint(base["run"])
    files = json.loads((ckpt / checkpoint_io.CHECKSUMS).read_text())["files"]
    assert {".metadata", "train_state.json", "rank-0.json"} <= set(files)
    assert set(files) == {p.name for p in ckpt.iterdir()} - {checkpoint_io.CHECKSUMS}
    checkpoint_io.verify(ckpt)
    from mmtok.trainer.checkpoint import load_run

    model, _, step = load_run(base["run"])  # through the restricted reader
    assert step == 4 and sum(p.numel() for p in model.parameters()) > 0


def test_one_load_run_reads_every_kind_of_run_and_refuses_the_wrong_one(base, tmp_path):
    from mmtok.trainer.checkpoint import load_run
    from mmtok.trainer.export import load_model
    from mmtok.trainer.job import TrainError
    from mmtok.trainer.unimoe_train import load_run as load_unimoe_run

    loaded = load_run(base["run"])
    model, cfg, step = loaded  # the public (model, config, step) shape
    assert (type(model).__name__, cfg.model.experts, step, loaded.state["step"]) == ("Decoder", "1t1i", 4, 4)
    assert loaded.checkpoint == latest_checkpoint(base["run"]) and not model.training
    uni = unimoe_run(tmp_path / "uni")
    model, cfg, step = load_run(uni)
    assert (type(model).__name__, model.stage, cfg.stage, step) == ("UniMoE", "align", "align", 0)
    with pytest.raises(TrainError, match="a uni-moe run, not a decoder one; pass the --out directory of `mmtok train`"):
        load_model(uni)
    with pytest.raises(TrainError, match="a decoder run, not a uni-moe one; pass the --out of `mmtok train --model uni-moe`"):
        load_unimoe_run(base["run"])
    # train_state.json keeps its fields and their order; a Uni-MoE stage names no plan
    assert list(loaded.state) == ["step", "world_size", "global_batch", "model", "plan"]
    assert list(json.loads((latest_checkpoint(uni) / "train_state.json").read_text())) == [
        "step", "world_size", "global_batch", "model"]


def test_a_resumed_log_drops_the_records_past_its_checkpoint(tmp_path):
    from mmtok.trainer.checkpoint import truncate_jsonl

    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + "\n")
    truncate_jsonl(log, 2)
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2]
    truncate_jsonl(tmp_path / "absent.jsonl", 2)  # a run that never logged: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


@pytest.mark.parametrize("name", ["../../elsewhere", "/tmp", "step-00000004/../../..", "link"])
def test_latest_cannot_point_outside_the_run(base, tmp_path, name):
    run = copy_run(base, tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.copytree(latest_checkpoint(run), outside)
    if name == "link":  # a step directory that is a link to somewhere else
        shutil.rmtree(run / "checkpoints" / "step-00000004")
        (run / "checkpoints" / "step-00000004").symlink_to(outside)
    else:
        (run / "checkpoints" / "latest").write_text(name)
    for r in (cli("export", run, "--to", tmp_path / "x"),
              cli("train", "--plan", base["plan"], "--out", run, *TRAIN, "--resume")):
        assert r.exit_code == 2 and ("not a checkpoint of this run" in r.output or "is a link" in r.output), r.output
    assert not (tmp_path / "x").exists()


def flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_refused_by_readers_of_one_checkpoint(base, tmp_path):
    run = copy_run(base, tmp_path)
    flip_a_byte(next(latest_checkpoint(run).glob("*.distcp")))
    for r in (cli("export", run, "--to", tmp_path / "x"),
              cli("eval", "--checkpoint", run, "--data", base["text"], "--out", tmp_path / "eval"),
              cli("upcycle", run, "--experts", "2t2i", "--out", tmp_path / "up")):
        assert r.exit_code == 2 and "step-00000004" in r.output and "differs from checksums.json" in r.output, r.output
    assert not (tmp_path / "x").exists() and not (tmp_path / "up").exists()


def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(base, tmp_path):
    run = copy_run(base, tmp_path)
    flip_a_byte(latest_checkpoint(run) / "train_state.json")
    with pytest.warns(SkippedCheckpoint, match="skipping checkpoint step-00000004: .*train_state.json: its size or sha256"):
        r = cli("train", "--plan", base["plan"], "--out", run, *TRAIN, "--resume")
    assert r.exit_code == 0, r.output
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # records past step 2 were dropped and trained again
    checkpoint_io.verify(latest_checkpoint(run))  # step 4 written anew, whole
    base_loss = [json.loads(x)["loss"] for x in (base["run"] / "metrics.jsonl").read_text().splitlines()]
    loss = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert loss == pytest.approx(base_loss, rel=1e-6)  # resuming from step 2 redoes steps 3-4 as they were


def test_rotation_deletes_only_the_checkpoints_it_wrote(base, tmp_path):
    """Older checkpoints go as new ones are saved, but a user's copy beside them
    (`step-00000002-best`, a folder named like a step without train_state.json) is kept."""
    run = copy_run(base, tmp_path)
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step-00000002", ckpts / "step-00000002-best")
    (ckpts / "step-00000001").mkdir()
    (ckpts / "step-00000001" / "notes.txt").write_text("mine")
    r = cli("train", "--plan", base["plan"], "--out", run, *TRAIN[:-5], "--steps", 8, "--ckpt-every", 2, "--json",
            "--resume")
    assert r.exit_code == 0, r.output
    left = sorted(p.name for p in ckpts.iterdir())
    assert left == ["latest", "step-00000001", "step-00000002-best", "step-00000006", "step-00000008"], left
    assert (ckpts / "step-00000001" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("file, edit", [
    ("rank-0.json", lambda d: d.update(rng={"torch": "AAAA"})),
    ("rank-0.json", lambda d: d.update(loader="zzz")),
    ("train_state.json", lambda d: d.update(step="two")),
])
def test_a_hand_edited_checkpoint_state_is_one_line_on_resume(base, tmp_path, file, edit):
    """A sender can rewrite the checksums along with the state they cover: the state's shape
    is checked too, and resuming names the file instead of a traceback."""
    run = copy_run(base, tmp_path)
    ckpt = latest_checkpoint(run)
    state = json.loads((ckpt / file).read_text())
    edit(state)
    (ckpt / file).write_text(json.dumps(state))
    checkpoint_io.write_checksums(ckpt)
    r = cli("train", "--plan", base["plan"], "--out", run, *TRAIN, "--resume")
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert file in r.output and "Traceback" not in r.output, r.output


def test_resume_with_no_intact_checkpoint_is_refused(base, tmp_path):
    run = copy_run(base, tmp_path)
    for ckpt in (run / "checkpoints").glob("step-*"):
        (ckpt / "rank-0.json").unlink()
    with pytest.warns(SkippedCheckpoint):
        r = cli("train", "--plan", base["plan"], "--out", run, *TRAIN, "--resume")
    assert r.exit_code == 2 and "no intact checkpoint" in r.output and "rank-0.json: missing" in r.output, r.output


def test_a_checkpoint_from_before_checksums_is_read_with_a_warning(base, tmp_path):
    run = copy_run(base, tmp_path)
    (latest_checkpoint(run) / checkpoint_io.CHECKSUMS).unlink()
    with pytest.warns(checkpoint_io.UnverifiedCheckpoint, match="no checksums.json"):
        r = cli("export", run, "--to", tmp_path / "x", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["step"] == 4, r.output


def test_a_run_killed_before_its_first_checkpoint_restarts_with_the_same_command(base, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmtok.cli.app", "train", "--plan", str(base["plan"]), "--out", str(run),
           "--lr", "0.01", "--warmup", "2", "--steps", "40", "--ckpt-every", "1000", "--json"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(3):
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if not (run / "checkpoints").exists():
            break
        shutil.rmtree(run)
    assert (run / "config.json").exists() and not (run / "checkpoints").exists(), "could not kill the run in time"
    (run / "checkpoints" / ".step-00000040.tmp").mkdir(parents=True)  # as if killed while saving it
    r = cli(*cmd[3:])  # the same command again
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "finished", r.output
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 41))


def test_a_directory_with_someone_elses_files_is_refused(base, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = cli("train", "--plan", base["plan"], "--out", mine, *TRAIN)
    assert r.exit_code == 2 and "did not write (notes.txt)" in r.output, r.output
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # not even the lock file stays
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"architectures": ["X"]}')  # a config.json that is not a run's
    r = cli("train", "--plan", base["plan"], "--out", hf, *TRAIN)
    assert r.exit_code == 2 and "did not write (config.json)" in r.output, r.output
    assert (hf / "config.json").read_text() == '{"architectures": ["X"]}'
    r = cli("train", "--plan", base["plan"], "--out", base["run"], *TRAIN)  # a run with checkpoints: as before
    assert r.exit_code == 2 and "--resume" in r.output


def test_a_second_trainer_on_the_same_out_is_refused(base, tmp_path):
    run = tmp_path / "run"
    with exclusive(run):  # stands in for a trainer that is running there
        r = cli("train", "--plan", base["plan"], "--out", run, *TRAIN)
        assert r.exit_code == 2 and f"in use by another mmtok process (pid {os.getpid()})" in r.output, r.output
        assert not (run / "config.json").exists()
    r = cli("train", "--plan", base["plan"], "--out", run, *TRAIN)
    assert r.exit_code == 0, r.output


def test_the_trainer_holds_the_lock_while_it_trains(base, tmp_path, monkeypatch):
    """While the loop runs, another job on its --out is refused (checked from inside a step)."""
    from mmtok.locks import LockHeld
    from mmtok.trainer import train as train_mod

    seen = []
    build = train_mod.build_optimizer

    def probe(model, tc):
        try:
            with exclusive(tmp_path / "run"):
                seen.append("free")
        except LockHeld as e:
            seen.append(str(e))
        return build(model, tc)

    monkeypatch.setattr(train_mod, "build_optimizer", probe)
    r = cli("train", "--plan", base["plan"], "--out", tmp_path / "run", *TRAIN)
    assert r.exit_code == 0, r.output
    assert len(seen) == 1 and f"pid {os.getpid()}" in seen[0], seen


@pytest.mark.parametrize("entry", ["upcycle", "aux-routers"])
def test_the_recipes_refuse_a_directory_another_job_holds(base, tmp_path, entry):
    """upcycle writes --out and the aux-router stage rewrites the run: both take the lock first."""
    run = copy_run(base, tmp_path)
    held = tmp_path / "up" if entry == "upcycle" else run
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with exclusive(held):
        r = ENTRY_POINTS[entry](base, run, tmp_path)
        assert r.exit_code == 2 and f"in use by another mmtok process (pid {os.getpid()})" in r.output, r.output
    assert not (tmp_path / "up" / "config.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    assert ENTRY_POINTS[entry](base, run, tmp_path).exit_code == 0


def test_inspect_refuses_a_latest_that_points_outside_the_run(base, tmp_path):
    run = copy_run(base, tmp_path)
    (run / "checkpoints" / "latest").write_text("../../elsewhere")
    r = cli("inspect", run)
    assert r.exit_code == 2 and "not a checkpoint of this run" in r.output, r.output
