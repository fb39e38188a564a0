"""Issue 16, part B: a newcomer's first hour. train-vq estimates its memory first and
refuses what cannot fit; long commands show progress with true totals; generate warns of
auxiliary routers never trained; one CLI spelling (old ones kept, hidden); help texts keep
<boi> and friends; `import mmtok` is the documented, torch-free library API."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from helpers.runs import cli
from mmtok import runner
from mmtok.cli.app import app
from helpers.media import draw_image, make_shards, sentences

ROOT = Path(__file__).resolve().parents[1]
TINY_VQ = ["--codebook-size", "64", "--resolution", "16", "--downsample", "2", "--channels", "8", "--res-blocks", "1",
           "--batch-size", "4", "--disc-weight", "0"]


def flat(text: str) -> str:
    return " ".join((text or "").split())  # rich wraps long lines


pytestmark = pytest.mark.usefixtures("one_thread")


class Bars:
    """Records every progress bar the runner makes: (stage, total when the bar closed, advances)."""

    def __init__(self, monkeypatch):
        self.made = []
        real = runner.progress_bar

        def recording(stage, total, done, enabled, count=None):
            bar = real(stage, total, done, enabled, count)
            if not enabled:
                return bar
            self.made.append((stage, bar))
            adv = bar.advance

            def advance():
                bar.advances = getattr(bar, "advances", 0) + 1
                adv()

            bar.advance = advance
            return bar

        monkeypatch.setattr(runner, "progress_bar", recording)

    def seen(self, stage_prefix: str = "") -> list[tuple[str, float | None, int]]:
        return [(s, b.p.tasks[0].total, getattr(b, "advances", 0)) for s, b in self.made if s.startswith(stage_prefix)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards (texts, stand-alone images, pairs, documents with images), a tokenizer trained
    on them, their token shards, a plan, and a tiny MoMa run whose aux routers were never trained."""
    from mmtok.bpe import train_bpe
    from mmtok.mix import plan_mix, write_plan
    from mmtok.vq import VQConfig
    from mmtok.trainer.vq_train import train_vq

    root = tmp_path_factory.mktemp("first_hour")
    images = [draw_image(i) for i in range(12)]
    shards = make_shards(root / "shards", texts=sentences(200), images=images[:5],
                         pairs=[(im, f"caption {i}") for i, im in enumerate(images[5:9])],
                         docs=[["some words", images[9], "more words"], ["a doc", images[10], images[11]]])
    train_bpe([shards], root / "tok", vocab_size=600, image_codes=64, log=lambda m: None)
    train_vq([shards], root / "tok", VQConfig(resolution=16, downsample=2, codebook_size=64, channels=8, res_blocks=1),
             steps=2, batch_size=4, disc_weight=0, log=lambda m: None)
    r = cli("tokenize", shards, "--tokenizer", root / "tok", "--out", root / "tokens", "--json")
    assert r.exit_code == 0, r.output
    write_plan(plan_mix([root / "tokens"], out=root / "plan", ratio=(1, 1), world_size=1, seq_len=160, micro_batch=2,
                        steps=4), root / "plan")
    r = cli("train", "--plan", root / "plan", "--out", root / "run", "--model", "moma", "--experts", "2t2i",
            "--steps", 2, "--json")
    assert r.exit_code == 0, r.output
    return {"root": root, "shards": shards, "tok": root / "tok", "tokens": root / "tokens", "plan": root / "plan",
            "run": root / "run", "samples": {"text": 200, "image": 5, "pair": 4, "doc": 2, "doc_image": 3}}


# ---------------------------------------------------------------- 1. train-vq memory

def test_train_vq_estimate_is_within_2x_of_the_measured_peak(tmp_path):
    """A fresh process trains a small VQ whose activations outweigh the interpreter; its peak
    RSS (ru_maxrss) and the estimate it printed agree within a factor of 2."""
    shards = make_shards(tmp_path / "in", images=[draw_image(i, size=140) for i in range(8)])
    child = ("import resource, sys\nfrom mmtok.cli.app import main\nsys.argv = ['mmtok'] + sys.argv[1:]\n"
             "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
             "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr)\n")
    args = ["train-vq", str(shards), "--out", str(tmp_path / "tok"), "--steps", "1", "--resolution", "128",
            "--downsample", "8", "--channels", "32", "--res-blocks", "1", "--batch-size", "4", "--codebook-size", "64",
            "--disc-weight", "0", "--json"]
    r = subprocess.run([sys.executable, "-c", child, *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    estimate = json.loads(r.stdout)["memory_estimate_bytes"]
    peak = int(re.search(r"PEAK (\d+)", r.stderr).group(1))
    assert peak / 2 < estimate < 2 * peak, (estimate / 2**30, peak / 2**30)


def test_train_vq_refuses_what_cannot_fit_and_names_settings_that_would(tmp_path, monkeypatch):
    from mmtok.trainer import vq_memory

    # MemAvailable is what the check reads on Linux
    mem = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))
    assert abs(vq_memory.available_memory("cpu") - mem) < 2**30
    shards = make_shards(tmp_path / "in", images=[draw_image(i) for i in range(8)])
    monkeypatch.setattr(vq_memory, "available_memory", lambda device: 8 << 30)  # 8 GiB free
    # the defaults (512 px, batch 8, 128 channels) need tens of GiB: refused before any work
    r = cli("train-vq", shards, "--out", tmp_path / "tok", "--steps", 3)
    out = flat(r.output)
    assert r.exit_code == 2, out
    assert "GiB" in out and "--no-memory-check" in out and re.search(r"--batch-size \d|--resolution \d", out), out
    assert not (tmp_path / "tok" / "vq.safetensors").exists()
    # a tiny model fits in what the estimate finds free once the resident interpreter is counted
    monkeypatch.setattr(vq_memory, "available_memory", lambda device: 1 << 40)
    assert cli("train-vq", shards, "--out", tmp_path / "tok", "--steps", 1, *TINY_VQ, "--json").exit_code == 0
    # the override: it runs although the estimate says it does not fit
    monkeypatch.setattr(vq_memory, "available_memory", lambda device: 1 << 20)
    r = cli("train-vq", shards, "--out", tmp_path / "tok2", "--steps", 1, *TINY_VQ, "--no-memory-check", "--json")
    assert r.exit_code == 0, r.output


def test_train_vq_logs_its_estimate_first_and_shows_a_bar_of_its_steps(tmp_path, monkeypatch):
    from mmtok.vq import VQConfig
    from mmtok.trainer.vq_train import train_vq

    bars = Bars(monkeypatch)
    shards = make_shards(tmp_path / "in", images=[draw_image(i) for i in range(8)])
    logs = []
    train_vq([shards], tmp_path / "tok", VQConfig(resolution=16, downsample=2, codebook_size=64, channels=8, res_blocks=1),
             steps=5, batch_size=4, disc_weight=0, log_every=100, progress=True, log=logs.append)
    assert "estimated peak memory" in logs[0]  # before the first step: nothing else logs that early
    assert bars.seen("train-vq") == [("train-vq", 5, 5)]


# ---------------------------------------------------------------- 2. progress totals

def test_shard_bar_total_is_the_number_of_inputs(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    for i in range(9):
        (raw / f"t{i}.txt").write_text(f"text number {i}")
    for i in range(3):
        (raw / "sub" / f"p{i}.png").write_bytes(draw_image(i))
        (raw / "sub" / f"p{i}.txt").write_text(f"caption {i}")  # one item with its image
    (raw / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(4)))
    bars = Bars(monkeypatch)
    r = cli("shard", raw, "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    inputs = json.loads((tmp_path / "out" / "manifest.json").read_text())["totals"]["inputs"]
    assert inputs == 9 + 3 + 4
    assert bars.seen("shard") == [("shard", inputs, inputs)]


def test_tokenize_bar_total_counts_stand_alone_images_too(world, tmp_path, monkeypatch):
    bars = Bars(monkeypatch)
    r = cli("tokenize", world["shards"], "--tokenizer", world["tok"], "--out", tmp_path / "tokens")
    assert r.exit_code == 0, r.output
    n = world["samples"]
    items = n["text"] + n["image"] + n["pair"] + n["doc"]  # a document's images go with it
    assert bars.seen("tokenize") == [("tokenize", items, items)]


def test_eval_bars_count_batches(world, monkeypatch):
    from mmtok.trainer.evaluate import evaluate

    bars = Bars(monkeypatch)
    evaluate(str(world["run"]), [str(world["tokens"])], [], batch_size=3, progress=True)
    seen = bars.seen("eval")
    assert [s for s, _, _ in seen] == ["eval held-out", "eval held-out, causal routing"]  # MoMa: both routings
    assert all(total == advances > 0 for _, total, advances in seen), seen


def test_generate_and_export_show_progress_on_stderr_only(world, tmp_path, monkeypatch):
    bars = Bars(monkeypatch)
    r = cli("generate", world["run"], "--tokenizer", world["tok"], "--prompt", "ka to", "--max-tokens", 5,
            "--temperature", 0, "--out", tmp_path / "gen", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["new_tokens"] <= 5  # stdout is the JSON alone
    assert bars.seen("generate") == []  # --json: no bar
    r = cli("generate", world["run"], "--tokenizer", world["tok"], "--prompt", "ka to", "--max-tokens", 5,
            "--temperature", 0, "--out", tmp_path / "gen2")
    assert r.exit_code == 0, r.output
    (stage, total, advances), = bars.seen("generate")
    assert total == 5 and 1 <= advances <= 5


# ---------------------------------------------------------------- 3. untrained auxiliary routers

def test_generate_warns_when_the_aux_routers_were_never_trained(world, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    r = cli("generate", run, "--tokenizer", world["tok"], "--prompt", "ka", "--max-tokens", 3, "--out", tmp_path / "g")
    assert r.exit_code == 0, r.output
    out = flat(r.output)
    assert "never trained" in out and f"mmtok train --train-aux-routers --resume --plan {world['plan'].resolve()}" in out
    assert cli("export", run, "--out", tmp_path / "x").exit_code == 0  # an export knows the run it came from
    r = cli("generate", tmp_path / "x", "--tokenizer", world["tok"], "--prompt", "ka", "--max-tokens", 3,
            "--out", tmp_path / "g2")
    assert r.exit_code == 0 and "never trained" in flat(r.output)
    r = cli("train", "--stage", "aux-routers", "--resume", "--plan", world["plan"], "--out", run, "--steps", 2, "--json")
    assert r.exit_code == 0, r.output
    r = cli("generate", run, "--tokenizer", world["tok"], "--prompt", "ka", "--max-tokens", 3, "--out", tmp_path / "g3")
    assert r.exit_code == 0 and "never trained" not in flat(r.output), r.output


# ---------------------------------------------------------------- 4. one CLI spelling

def test_positional_run_and_out_with_the_old_spellings_hidden_but_working(world, tmp_path):
    run = world["run"]
    r = cli("export", run, "--out", tmp_path / "a", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["out"] == str(tmp_path / "a"), r.output
    r = cli("export", run, "--to", tmp_path / "b")
    assert r.exit_code == 0 and "--to is deprecated" in flat(r.output) and (tmp_path / "b" / "model.safetensors").exists()
    assert cli("export", run, "--to", tmp_path / "c", "--out", tmp_path / "d").exit_code == 2
    for spelling in ([run], ["--checkpoint", run]):
        r = cli("eval", *spelling, "--data", world["tokens"], "--max-docs", 4, "--out", tmp_path / "e", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout[r.stdout.index("{"):])["model"] == str(run)
    assert "--checkpoint is deprecated" in flat(r.output)
    for command, old in (("export", "--to"), ("eval", "--checkpoint"), ("generate", "--checkpoint")):
        help_text = cli(command, "--help").output
        assert not re.search(re.escape(old) + r"\b", help_text), (command, old)
        assert "--out" in help_text and "RUN" in help_text
    assert "[default: auto]" in flat(CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).output)


# ---------------------------------------------------------------- 5. literal specials in help

def test_every_help_shows_the_special_tokens_its_source_names():
    checked = 0
    for cmd in app.registered_commands:
        name = cmd.name or cmd.callback.__name__
        texts = [cmd.callback.__doc__ or ""] + [p.default.help or "" for p in inspect.signature(cmd.callback).parameters.values()
                                                 if isinstance(p.default, typer.models.ParameterInfo)]
        specials = set(re.findall(r"<[a-z_:]+>", " ".join(texts).replace("\\<", "<")))
        if not specials:
            continue
        shown = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "250"}).output
        for s in specials:
            assert s in shown, (name, s)
            checked += 1
    assert checked >= 3  # tokenize's <boi>, <eoi>, <eod> at least


# ---------------------------------------------------------------- 7. the library API

def test_import_mmtok_is_light_and_lazy():
    code = ("import sys, mmtok\nassert 'torch' not in sys.modules, 'import mmtok imported torch'\n"
            "mmtok.ShardReader, mmtok.Tokenizer, mmtok.PlanLoader, mmtok.balance_mix, mmtok.TrainOptions, mmtok.train\n"
            "assert 'torch' not in sys.modules\n"
            "from mmtok.trainer.checkpoint import load_run\nassert mmtok.load_run is load_run\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_the_readme_python_example_runs(world, tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Use mmtok from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for name in ("tok", "shards", "tokens", "plan", "run"):
        os.symlink(world[name], tmp_path / name)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0] == "a red square" and lines[-1].startswith("moma 2 (2, 160, ")
