"""`mmtok train` / `export` / `eval` end to end on a real balance-mix plan: exact resume,
FSDP (2 processes, gloo) against a single-process reference, export, evaluation and
clear errors on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers.tokens import make_doc, make_token_shards, make_vocab
from helpers.runs import MMTOK, MOMA, VOCAB, cli, cli_subprocess, curve, metrics
from mmtok.trainer.config import TrainConfig
from mmtok.trainer.train import lr_at

@pytest.fixture(scope="module")
def runs(train_plan):
    """A: 6 steps straight. B: stopped after step 3, exported, then resumed to 6."""
    a, b = train_plan["root"] / "A", train_plan["root"] / "B"
    assert cli("train", "--plan", train_plan["plan"], "--out", a, *MOMA, "--steps", 6, "--ckpt-every", 2, "--json").exit_code == 0
    r = cli("train", "--plan", train_plan["plan"], "--out", b, *MOMA, "--steps", 6, "--ckpt-every", 2, "--stop-at-step", 3, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "stopped"
    assert cli("export", b, "--to", train_plan["root"] / "B3").exit_code == 0
    first = curve(b)
    r = cli("train", "--plan", train_plan["plan"], "--out", b, *MOMA, "--steps", 6, "--ckpt-every", 2, "--resume", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["step"] == 6
    return {"A": a, "B": b, "B_first": first, "B3": train_plan["root"] / "B3"}


def test_schedule_warms_up_then_decays_to_the_floor():
    tc = TrainConfig(steps=20, warmup=4, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, tc) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(x >= y for x, y in zip(lrs[3:], lrs[4:])) and abs(lr_at(20, tc) - 0.1) < 1e-12


def test_a_stopped_and_resumed_run_matches_an_uninterrupted_one_bit_for_bit(runs):
    assert runs["B_first"] == curve(runs["A"])[:3]
    assert curve(runs["B"]) == curve(runs["A"])  # losses, gradient norms: identical, not close
    assert [r["step"] for r in metrics(runs["B"])] == list(range(1, 7))
    ckpts = runs["B"] / "checkpoints"
    assert (ckpts / "latest").read_text() == "step-00000006"
    assert not list(ckpts.glob(".*tmp*"))  # no half-written checkpoint left
    saved = json.loads((runs["B"] / "config.json").read_text())
    assert saved["model"]["experts"] == "2t2i" and saved["model"]["vocab_size"] == VOCAB["vocab_size"]


def test_metrics_have_losses_by_modality_and_expert_load(runs):
    rec = metrics(runs["A"])[-1]
    for key in ("loss", "text_loss", "image_loss", "z_loss", "tokens_per_s", "memory_gb", "grad_norm", "lr"):
        assert np.isfinite(rec[key]), key
    assert rec["text_tokens"] > 0 and rec["image_tokens"] > 0
    assert set(rec["expert_load"]) == {"text", "image"}
    assert all(abs(sum(v) - 1) < 1e-6 and len(v) == 2 for v in rec["expert_load"].values())
    assert list((runs["A"] / "tb").glob("events.out.tfevents.*"))


def test_throughput_counts_every_step_of_a_log_interval(train_plan):
    """`tokens` (and so tokens/s) covers all steps since the previous record, not the last one."""
    from mmtok.loader import PlanLoader

    run = train_plan["root"] / "interval"
    assert cli("train", "--plan", train_plan["plan"], "--out", run, *MOMA, "--steps", 4, "--log-every", 2).exit_code == 0
    real = [int((b["doc_ids"] > 0).sum()) for _, b in zip(range(4), PlanLoader(train_plan["plan"], 0, 1))]
    assert [r["tokens"] for r in metrics(run)] == [real[0] + real[1], real[2] + real[3]]


def test_export_holds_the_weights_training_continued_from(runs, train_plan):
    """The exported step-3 model scores the 4th micro-batch exactly as training logged it."""
    from mmtok.loader import PlanLoader
    from mmtok.trainer.checkpoint import load_run
    from mmtok.trainer.export import load_model
    from mmtok.trainer.model import loss_terms

    model, cfg = load_model(runs["B3"])
    loader = PlanLoader(train_plan["plan"], 0, 1)
    batch = list(loader)[3]
    with torch.no_grad():
        logits, stats = model(batch["input_ids"], batch["positions"], batch["doc_ids"])
        loss = loss_terms(cfg, logits, batch["targets"], stats)["loss"]
    assert abs(float(loss) - metrics(runs["A"])[3]["loss"]) < 1e-5
    from_run, _, step = load_run(runs["A"])
    assert step == 6
    a6 = runs["A"].parent / "A6"
    assert cli("export", runs["A"], "--to", a6).exit_code == 0
    m6, _ = load_model(a6)
    with torch.no_grad():
        torch.testing.assert_close(m6(batch["input_ids"], batch["positions"], batch["doc_ids"])[0],
                                   from_run(batch["input_ids"], batch["positions"], batch["doc_ids"])[0], rtol=0, atol=0)
    assert json.loads((a6 / "config.json").read_text())["model"]["model"] == "moma"


def expected_counts(train_plan) -> dict:
    lo, hi = VOCAB["image_range"]
    all_docs = train_plan["text_docs"] + train_plan["pair_docs"]
    nxt = [d[1:] for d in all_docs]
    image = sum(int(((x >= lo) & (x < hi)).sum()) for x in nxt)
    first = [d for d in train_plan["pair_docs"] if d[0] == VOCAB["specials"]["<boi>"]]
    return {"all": sum(len(x) for x in nxt), "image": image, "i2t": 10 * len(first),
            "t2i": 8 * (len(train_plan["pair_docs"]) - len(first))}


def test_eval_reports_perplexities_and_expert_load(runs, train_plan, tmp_path):
    out = tmp_path / "report"
    r = cli("eval", "--checkpoint", runs["A"], "--data", train_plan["text"], "--data", train_plan["pairs"], "--pairs", train_plan["pairs"],
            "--out", out, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    want = expected_counts(train_plan)
    h = res["heldout"]
    assert h["all"]["tokens"] == want["all"] and h["image"]["tokens"] == want["image"]
    assert h["text"]["tokens"] == want["all"] - want["image"]
    assert res["pairs"]["image_to_text"]["tokens"] == want["i2t"] and res["pairs"]["text_to_image"]["tokens"] == want["t2i"]
    for m in (h["all"], h["text"], h["image"], res["pairs"]["image_to_text"], res["pairs"]["text_to_image"]):
        assert 1 < m["ppl"] < 2 * VOCAB["vocab_size"] and abs(np.log(m["ppl"]) - m["loss"]) < 1e-9
    # token-weighted text and image losses make up the overall loss
    mix = (h["text"]["loss"] * h["text"]["tokens"] + h["image"]["loss"] * h["image"]["tokens"]) / h["all"]["tokens"]
    assert abs(mix - h["all"]["loss"]) < 1e-9
    assert set(h["expert_load"]) == {"text", "image"}
    for name in ("eval.json", "eval.md", "training_curves.png", "expert_load.png"):
        assert (out / name).stat().st_size > 0
    # an export evaluates to the same numbers
    assert cli("export", runs["A"], "--to", tmp_path / "exported").exit_code == 0
    r2 = cli("eval", "--checkpoint", tmp_path / "exported", "--data", train_plan["text"], "--data", train_plan["pairs"], "--json")
    assert abs(json.loads(r2.stdout)["heldout"]["all"]["loss"] - h["all"]["loss"]) < 1e-9


def test_bad_inputs_fail_before_training_with_a_clear_message(runs, train_plan, tmp_path):
    cases = [
        (["--model", "sparse"], "unknown model"),
        (["--model", "moma", "--experts", "4x4"], "NtMi"),
        (["--model", "moe", "--experts", "8", "--routing", "top3"], "unknown routing"),
        (MOMA + ["--steps", "1000"], "micro-batches per rank left"),
        (["--preset", "7b"], "unknown preset"),
    ]
    for args, message in cases:
        r = cli("train", "--plan", train_plan["plan"], "--out", tmp_path / "x", *args)
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert not (tmp_path / "x" / "config.json").exists()
    r = cli("train", "--plan", train_plan["plan"], "--out", runs["A"], "--model", "dense", "--steps", "8", "--resume")
    assert r.exit_code == 2 and "another model" in r.output and "model: checkpoint 'moma' vs now 'dense'" in r.output
    r = cli("train", "--plan", train_plan["plan"], "--out", runs["A"], *MOMA, "--steps", "6")
    assert r.exit_code == 2 and "--resume" in r.output
    toml = tmp_path / "run.toml"
    toml.write_text("[model]\nvocab_size = 65536\n")
    r = cli("train", "--plan", train_plan["plan"], "--out", tmp_path / "y", "--config", toml)
    assert r.exit_code == 2 and "vocab_size" in r.output
    r = cli("train", "--plan", tmp_path, "--out", tmp_path / "z")
    assert r.exit_code == 2 and "balance-mix" in r.output
    other = make_vocab(image_tokens_per_image=8, n_text=100, n_image=64)
    d = make_token_shards(tmp_path, [make_doc(np.random.default_rng(1), other, [5])], other, "other")
    r = cli("eval", "--checkpoint", runs["A"], "--data", d)
    assert r.exit_code == 2 and "vocab_size" in r.output
    r = cli("eval", "--checkpoint", tmp_path, "--data", d)
    assert r.exit_code == 2 and "not a training run" in r.output


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_process_and_resumes_exactly(train_plan):
    """2 ranks x 1 micro-batch == 1 process x grad_accum 2 over the same micro-batches;
    a 2-process run stopped and resumed equals the uninterrupted 2-process run exactly."""
    root = train_plan["root"]
    common = ["--plan", train_plan["plan"], *MOMA, "--steps", 4, "--ckpt-every", 2, "--json"]
    r = cli_subprocess(["train", "--out", root / "F", "--nproc", 2, *common])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["world_size"] == 2
    assert cli("train", "--out", root / "R", "--grad-accum", 2, *common).exit_code == 0
    fsdp, ref = curve(root / "F"), curve(root / "R")
    assert [x[0] for x in fsdp] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.array(fsdp), np.array(ref), rtol=2e-5)  # loss and gradient norm per step
    for run in ("F", "R"):
        assert cli("export", root / run, "--to", root / f"{run}-export").exit_code == 0
    from safetensors.torch import load_file

    f, g = load_file(str(root / "F-export" / "model.safetensors")), load_file(str(root / "R-export" / "model.safetensors"))
    assert f.keys() == g.keys()
    for k in f:
        torch.testing.assert_close(f[k], g[k], rtol=1e-4, atol=1e-5)

    r = cli_subprocess(["train", "--out", root / "S", "--nproc", 2, *common, "--stop-at-step", 1])
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli_subprocess(["train", "--out", root / "S", "--nproc", 2, *common, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert curve(root / "S") == fsdp


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_exact(train_plan, tmp_path):
    common = ["--plan", train_plan["plan"], *MOMA, "--steps", 20, "--ckpt-every", 100, "--json"]
    run = tmp_path / "T"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(MMTOK + ["train", "--out", str(run)] + [str(a) for a in common], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    sigterm_after_two_records(p, run)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "interrupted" in err, err[-2000:]
    step = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    assert step == metrics(run)[-1]["step"] and 2 <= step < 20
    assert cli("train", "--out", run, "--resume", *common).exit_code == 0
    assert cli("train", "--out", tmp_path / "U", *common).exit_code == 0
    assert curve(run) == curve(tmp_path / "U")


def sigterm_after_two_records(p: subprocess.Popen, run) -> None:
    """SIGTERM the training process `p` once its run has logged two steps."""
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2:
            p.send_signal(signal.SIGTERM)
            return
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_to_an_nproc_launcher_reaches_its_workers(train_plan, tmp_path):
    """A scheduler stops the `--nproc 2` command it started: the launcher passes the SIGTERM
    to torchrun, whose workers checkpoint after the step in flight and exit."""
    run = tmp_path / "T"
    args = ["train", "--out", str(run), "--plan", str(train_plan["plan"]), *map(str, MOMA), "--steps", "40",
            "--ckpt-every", "1000", "--nproc", "2", "--json"]
    p = subprocess.Popen(MMTOK + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    sigterm_after_two_records(p, run)
    out, err = p.communicate(timeout=180)
    assert p.returncode != 0 and "interrupted at step" in err, err[-2000:]
    step = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    assert step == metrics(run)[-1]["step"] and 2 <= step < 40


def test_saving_a_step_again_never_leaves_latest_without_a_checkpoint(runs, train_plan, tmp_path):
    """The aux-router stage saves the newest step again. The old copy is set aside, not
    deleted first; if the process dies between the two renames, the next reader restores it."""
    import shutil

    from mmtok.trainer.train import latest_checkpoint

    run = tmp_path / "run"
    shutil.copytree(runs["A"], run)
    ckpt = latest_checkpoint(run)
    before = sorted(p.name for p in ckpt.iterdir())
    aside = ckpt.parent / f".{ckpt.name}.old"
    ckpt.rename(aside)  # the state after the first rename of a save that was killed
    assert latest_checkpoint(run) == ckpt and not aside.exists()
    assert sorted(p.name for p in ckpt.iterdir()) == before
    r = cli("train", "--stage", "aux-routers", "--out", run, "--plan", train_plan["plan"], "--resume", "--steps", 2, "--json")
    assert r.exit_code == 0, r.output
    assert latest_checkpoint(run) == ckpt and not aside.exists()
    r = cli("eval", "--checkpoint", run, "--data", train_plan["text"], "--out", tmp_path / "eval", "--json")
    assert r.exit_code == 0, r.output


def test_resuming_with_another_global_batch_warns(train_plan, tmp_path):
    from mmtok.trainer.train import GlobalBatchChanged

    common = ["--plan", train_plan["plan"], "--out", tmp_path / "g", *MOMA, "--steps", 4, "--json"]
    assert cli("train", *common, "--stop-at-step", 1).exit_code == 0
    with pytest.warns(GlobalBatchChanged, match="trained with 1 micro-batches per step .* resumed with 1 x 2"):
        r = cli("train", *common, "--grad-accum", 2, "--resume")
    assert r.exit_code == 0, r.output
    # back to 1 x 1 (resuming keeps the run's saved --grad-accum 2 unless told); the CLI shows it plainly
    r = cli_subprocess(["train", *common, "--resume", "--steps", 5, "--grad-accum", 1])
    assert r.returncode == 0 and "warning: " in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_inspect_shows_a_run_without_loading_torch(runs):
    code = ("import json, sys\n"
            "from typer.testing import CliRunner\n"
            "from mmtok.cli.app import app\n"
            f"r = CliRunner().invoke(app, ['inspect', {str(runs['A'])!r}, '--json'])\n"
            "assert r.exit_code == 0, r.output\n"
            "assert 'torch' not in sys.modules\n"
            "print(r.stdout)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout)
    assert (info["model"], info["experts"], info["step"], info["steps"]) == ("moma", "2t2i", 6, 6)
    assert info["world_size"] == 1 and info["global_batch"] == 1 and info["checkpoint"].endswith("step-00000006")
    assert info["last_metrics"]["step"] == 6 and info["last_metrics"]["loss"] == metrics(runs["A"])[-1]["loss"]
    r = cli("inspect", runs["A"])
    assert r.exit_code == 0 and "checkpoint" in r.output and "last_metrics" in r.output, r.output
