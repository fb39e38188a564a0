"""Issue 16, the training side of a newcomer's first hour: resume takes the run's own
settings, config.toml round trip and `--set`, balance-mix names every missing option and
warns of repeated sources, the trainer says how the plan maps to its processes and refuses
to run past the plan's end unless told to loop, and a held-out split that eval checks."""

from __future__ import annotations

import json
import tomllib

import numpy as np
import pytest
import torch

from helpers.tokens import make_doc, make_token_shards
from helpers.runs import VOCAB, cli, make_plan
from mmtok.loader import PlanLoader

MOMA = ["--model", "moma", "--experts", "2t2i", "--lr", "0.01", "--warmup", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_plan(tmp_path_factory.mktemp("first_hour"), steps=20, world_size=2, micro_batch=2)


@pytest.fixture(scope="module")
def run(data):
    """A moma run of 2 steps, made with options that resuming must not need again."""
    out = data["root"] / "run"
    r = cli("train", "--plan", data["plan"], "--out", out, *MOMA, "--steps", 2, "--json")
    assert r.exit_code == 0, r.output
    return out


# --- 1. resume with the run's own configuration; config.toml; --set ---

def test_resume_and_extend_need_no_options_repeated(data, run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run, out)
    r = cli("train", "--out", out, "--resume", "--steps", 3, "--json")  # no --plan, no model options
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["step"] == 3
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["model"] == "moma" and saved["model"]["experts"] == "2t2i"
    assert saved["train"]["steps"] == 3 and saved["train"]["lr"] == 0.01  # extended; the rest kept
    r = cli("train", "--plan", data["plan"], "--out", out, "--resume", "--steps", 4, "--lr", "0.005", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 0.005  # an explicit option wins


def test_an_explicit_option_against_the_runs_model_is_refused(run):
    r = cli("train", "--out", run, "--resume", "--model", "dense", "--steps", 3)
    assert r.exit_code == 2
    assert "another model" in r.output and "'moma'" in r.output and "'dense'" in r.output


def test_config_toml_round_trip(data, run, tmp_path):
    """RUN/config.toml is a --config file: a run made from it writes the same file back."""
    first = (run / "config.toml").read_text()
    parsed = tomllib.loads(first)
    saved = json.loads((run / "config.json").read_text())
    assert parsed["model"] == saved["model"] and parsed["train"] == saved["train"]
    again = tmp_path / "again"
    r = cli("train", "--plan", data["plan"], "--out", again, "--config", run / "config.toml", "--json")
    assert r.exit_code == 0, r.output
    assert (again / "config.toml").read_text() == first
    assert json.loads((again / "config.json").read_text()) == saved


def test_set_overrides_config_and_options(data, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[train]\nlr = 0.1\nsteps = 1\n")
    out = tmp_path / "run"
    r = cli("train", "--plan", data["plan"], "--out", out, "--config", toml, "--lr", "0.05",
            "--set", "train.lr=3e-4", "--set", "model.z_loss=0", "--set", "train.betas=[0.8, 0.9]",
            "--set", "model.experts=2t2i", "--set", "model.model=moma", "--json")
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["lr"] == 3e-4 and saved["train"]["steps"] == 1 and saved["train"]["betas"] == [0.8, 0.9]
    assert saved["model"]["z_loss"] == 0 and saved["model"]["model"] == "moma"


@pytest.mark.parametrize("setting, named", [("train.lrr=1", "lrr"), ("train.lr=fast", "lr"), ("train.lr=-1", "lr"),
                                            ("lr=1", "train.KEY=VALUE"), ("data.x=1", "train.KEY=VALUE"),
                                            ("model.routing=sideways", "sideways")])
def test_a_bad_set_is_refused_naming_it(data, tmp_path, setting, named):
    r = cli("train", "--plan", data["plan"], "--out", tmp_path / "run", "--set", setting, "--steps", 1)
    assert r.exit_code == 2 and named in r.output, r.output
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- 3. how the plan maps to the run; no running past its end unless --loop-plan ---

def test_the_trainer_says_how_the_plan_maps_to_its_processes(data, tmp_path):
    r = cli("train", "--plan", data["plan"], "--out", tmp_path / "run", "--steps", 2, "--json")
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("plan "))
    assert "2 rank(s) x 20 steps = 40 micro-batches" in line
    assert "1 process(es) x grad-accum 1 x steps 0..2 = 2 micro-batches" in line
    assert "--grad-accum 2" in line  # a step here averages 1 micro-batch, the plan's 2: say how to match


def test_a_run_longer_than_the_plan_is_refused_unless_it_loops(data, tmp_path):
    r = cli("train", "--plan", data["plan"], "--out", tmp_path / "run", "--steps", 41)
    assert r.exit_code == 2 and "--loop-plan" in r.output and "40 micro-batches per rank left" in r.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_loop_plan_starts_the_plan_again(data, tmp_path):
    once = list(PlanLoader(data["plan"], 0, 1))
    looped = PlanLoader(data["plan"], 0, 1, loop=True)
    it = iter(looped)
    batches = [next(it) for _ in range(len(once) + 3)]
    for a, b in zip(batches[len(once):], once[:3]):
        assert all(torch.equal(a[k], b[k]) for k in a)  # token ids: integers, read again exactly
    assert looped.state_dict()["next_microbatch"] == len(once) + 3
    out = tmp_path / "run"
    r = cli("train", "--plan", data["plan"], "--out", out, "--steps", 42, "--loop-plan", "--ckpt-every", 41,
            "--warmup", 1, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["step"] == 42 and "going through the plan again" in r.output
    assert json.loads((out / "config.json").read_text())["train"]["loop_plan"] is True


# --- 2. balance-mix: every missing option at once; repeated sources ---

def test_balance_mix_names_every_missing_option_in_one_message(data, tmp_path):
    r = cli("balance-mix", data["dirs"][0], "--seq-len", 64)
    assert r.exit_code == 2
    msg = " ".join(r.output.split())
    for name in ("--out", "--world-size", "--micro-batch", "--ratio or --experts", "--steps or --tokens"):
        assert name in msg, msg
    assert f"for example: mmtok balance-mix {data['dirs'][0]} --out plan --world-size 1 --ratio 1:1 --seq-len 64" in msg
    r = cli("balance-mix", data["dirs"][0], "--out", tmp_path / "p", "--world-size", 1, "--micro-batch", 1, "--tokens", 9)
    msg = " ".join(r.output.split())
    assert r.exit_code == 2 and "missing --ratio or --experts;" in msg and "--tokens 9" in msg


def test_balance_mix_warns_when_a_source_repeats(tmp_path):
    rng = np.random.default_rng(1)
    text = [make_doc(rng, VOCAB, [60]) for _ in range(40)]  # text-heavy: 2,440 text tokens, 96 image tokens
    pairs = [make_doc(rng, VOCAB, [4, "img"]) for _ in range(12)]
    dirs = [make_token_shards(tmp_path, text, VOCAB, "text"), make_token_shards(tmp_path, pairs, VOCAB, "pairs")]
    args = ["balance-mix", *dirs, "--world-size", 1, "--ratio", "1:1", "--seq-len", 64, "--micro-batch", 2]
    r = cli(*args, "--out", tmp_path / "p", "--steps", 10, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    repeats = report["epochs"][str(dirs[1])]
    assert repeats > 2  # the images are read several times over
    assert any(n.startswith(f"{dirs[1]} repeats {repeats:.1f} times") for n in report["notes"]), report["notes"]
    assert not any(n.startswith(str(dirs[0])) for n in report["notes"])  # the text is read once at most
    r = cli(*args, "--out", tmp_path / "q", "--steps", 1)
    assert r.exit_code == 0 and "repeats" not in r.output  # one step reads every source less than once


# --- 4. held-out split; eval warns of overlap with the training plan ---

def _keys(d) -> set:
    from mmtok.holdout import document_keys

    return set(document_keys([d]))


def test_holdout_is_deterministic_and_stable_when_documents_are_added(tmp_path):
    from mmtok.loader import TokenCorpus
    from mmtok.plan import read_plan
    from mmtok.holdout import document_keys

    rng = np.random.default_rng(2)
    docs = [make_doc(rng, VOCAB, [int(rng.integers(5, 30)), "img"]) for _ in range(120)]
    more = [make_doc(rng, VOCAB, [int(rng.integers(5, 30)), "img"]) for _ in range(60)]
    small = make_token_shards(tmp_path, docs, VOCAB, "small")
    order = rng.permutation(len(docs) + len(more))
    big = make_token_shards(tmp_path, [(docs + more)[i] for i in order], VOCAB, "big", max_count=11)
    held = {}
    for name, d in (("a", small), ("b", small), ("c", big)):
        r = cli("balance-mix", d, "--out", tmp_path / name, "--world-size", 1, "--ratio", "1:1", "--seq-len", 64,
                "--micro-batch", 2, "--steps", 5, "--holdout", 0.2)
        assert r.exit_code == 0 and "held out" in r.output, r.output
        held[name] = _keys(tmp_path / name / "holdout" / d.name)
        meta, arrays = read_plan(tmp_path / name)
        trained = set(document_keys([d])[np.unique(arrays["piece_doc"])])
        assert not trained & held[name]  # a held-out document is never in the plan
    assert held["a"] == held["b"]  # same input, same split
    assert 0.1 * len(docs) < len(held["a"]) < 0.3 * len(docs)
    assert held["c"] & _keys(small) == held["a"]  # more documents, in another order: none of the old moved
    copy = TokenCorpus([tmp_path / "a" / "holdout" / "small"])
    source = TokenCorpus([small])
    by_key = dict(zip(document_keys([small]), range(len(docs))))
    for i, k in enumerate(document_keys(copy.dirs)):
        assert np.array_equal(copy.read(i), source.read(by_key[k]))  # copied unchanged


def test_eval_warns_when_its_data_is_in_the_training_plan(data, tmp_path):
    from mmtok.plan import read_plan
    from mmtok.holdout import document_keys

    plan = tmp_path / "plan"
    r = cli("balance-mix", *data["dirs"], "--out", plan, "--world-size", 1, "--ratio", "1:2", "--seq-len", 64,
            "--micro-batch", 2, "--steps", 3, "--holdout", 0.25)
    assert r.exit_code == 0, r.output
    out = tmp_path / "run"
    assert cli("train", "--plan", plan, "--out", out, "--steps", 1, "--json").exit_code == 0
    r = cli("eval", "--checkpoint", out, "--data", plan / "holdout" / "pairs", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["overlap"]["data"]["in_training_plan"] == 0 and result["notes"] == []
    r = cli("eval", "--checkpoint", out, "--data", data["dirs"][1])  # the training source itself
    assert r.exit_code == 0 and "in the run's training plan" in " ".join(r.output.split()), r.output
    r = cli("eval", "--checkpoint", out, "--data", data["dirs"][1], "--json")
    _, arrays = read_plan(plan)
    keys = document_keys(data["dirs"])
    planned = set(keys[np.unique(arrays["piece_doc"])]) & _keys(data["dirs"][1])
    assert json.loads(r.stdout)["overlap"]["data"]["in_training_plan"] == len(planned) > 0


# --- the train command is one library call (trainer/launch.py); --stage names Uni-MoE's stages only ---

def test_train_options_are_the_train_commands_options():
    """cli/train_cmds.py hands its parameters to TrainOptions by name: the two lists must agree."""
    import inspect
    from dataclasses import fields

    from mmtok.cli.train_cmds import train
    from mmtok.trainer.launch import TrainOptions

    params = set(inspect.signature(train).parameters) - {"set_", "as_json"}
    assert {f.name for f in fields(TrainOptions)} - {"sets", "live"} == params


def test_run_config_takes_the_plans_vocabulary_and_the_options(data, tmp_path):
    from mmtok.trainer.launch import TrainOptions, run_config

    opts = TrainOptions(out=tmp_path / "r", plan=data["plan"], model="moma", experts="2t2i", lr=0.02,
                        sets=["train.warmup=3"])
    cfg = run_config(opts, data["plan"])
    assert cfg.model.vocab_size == VOCAB["vocab_size"] and tuple(cfg.model.image_range) == tuple(VOCAB["image_range"])
    assert cfg.model.model == "moma" and cfg.model.experts == "2t2i"
    assert cfg.train.lr == 0.02 and cfg.train.warmup == 3 and cfg.plan == str(data["plan"].resolve())


@pytest.mark.parametrize("kw, message", [
    (dict(), "give --plan"),
    (dict(stage="align"), "--stage align is a stage of --model uni-moe"),
    (dict(train_aux_routers=True, plan="PLAN"), "pass --resume"),
    (dict(init_from="hf:x", resume=True), "--init-from starts a new run"),
    (dict(model="uni-moe", stage="align"), "--tokenizer"),
    (dict(model="uni-moe", stage="main"), "needs --stage align, experts or tune"),
    (dict(model="uni-moe", stage="align", sets=["train.lr=1"]), "--set and --loop-plan"),
])
def test_launch_refuses_bad_options_naming_them(data, tmp_path, kw, message):
    from mmtok.trainer.launch import TrainOptions, train

    if kw.get("plan") == "PLAN":
        kw["plan"] = data["plan"]
    with pytest.raises(ValueError, match=message):
        train(TrainOptions(out=tmp_path / "none", **kw))
    assert not (tmp_path / "none").exists()


def test_launch_asks_for_torchrun_with_nproc(tmp_path, monkeypatch):
    from mmtok.trainer.launch import TrainOptions, train

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    outcome = train(TrainOptions(out=tmp_path / "r", nproc=2))
    assert outcome.kind == "relaunch" and not outcome.resume and not (tmp_path / "r").exists()


def test_train_aux_routers_and_its_old_spelling(data, tmp_path):
    """--train-aux-routers is the stage's name; `--stage aux-routers` (and `--stage main`) still work,
    with a deprecation line."""
    new = cli("train", "--train-aux-routers", "--plan", data["plan"], "--out", tmp_path / "none")
    old = cli("train", "--stage", "aux-routers", "--plan", data["plan"], "--out", tmp_path / "none")
    for r in (new, old):
        assert r.exit_code == 2 and "--train-aux-routers trains the routers of an existing run: pass --resume" in r.output
    assert "deprecated" not in new.output
    assert "warning: --stage aux-routers is deprecated; use --train-aux-routers" in old.output
    r = cli("train", "--stage", "main", "--out", tmp_path / "none")
    assert r.exit_code == 2 and "--stage main is deprecated" in r.output and "give --plan" in r.output
    r = cli("train", "--stage", "tune", "--plan", data["plan"], "--out", tmp_path / "none")
    assert r.exit_code == 2 and "--model uni-moe" in r.output and "deprecated" not in r.output
