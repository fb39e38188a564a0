"""`mmtok demo`: the whole pipeline on the generated corpus, as `make demo` runs it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

MMTOK = [sys.executable, "-m", "mmtok.cli.app"]


@pytest.mark.slow
def test_demo_runs_every_stage_end_to_end(tmp_path: Path):
    out = tmp_path / "demo"
    res = subprocess.run(MMTOK + ["demo", "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = json.loads((out / "demo-steps.json").read_text())
    assert all(s["exit"] == 0 for s in steps)
    commands = {s["command"].split()[1] for s in steps}
    assert {"shard", "extract-keyframes", "extract-audio", "train-bpe", "train-vq", "tokenize-images", "tokenize",
            "detokenize", "balance-mix", "train", "eval", "upcycle", "generate", "export"} <= commands
    shards = json.loads((out / "shards" / "manifest.json").read_text())["totals"]
    assert shards["quarantined"] == 2  # the two broken files of the corpus, and nothing else
    tokens = json.loads((out / "tokens" / "manifest.json").read_text())["totals"]
    assert tokens["samples"] > 100
    vocab = json.loads((out / "tokenizer" / "vocab.json").read_text())
    assert vocab["vocab_size"] == 800 and vocab["image_tokens_per_image"] == 64
    side = json.loads((out / "tokenizer" / "vq.json").read_text())["resolution"]
    with Image.open(out / "generated-image" / "image-0.png") as im:
        assert im.size == (side, side)
    report = json.loads((out / "run" / "eval" / "eval.json").read_text())
    # 20 tiny training steps already beat guessing uniformly over the vocabulary
    assert report["heldout"]["all"]["tokens"] > 0 and report["heldout"]["all"]["loss"] < math.log(vocab["vocab_size"])
    assert (out / "model" / "config.json").exists()
    mot = json.loads((out / "run-mot" / "eval" / "eval.json").read_text())
    assert mot["config"]["model"] == "mot" and mot["heldout"]["all"]["loss"] < math.log(vocab["vocab_size"])
    assert (out / "unimoe" / "tune" / "eval" / "eval.json").exists()
    assert "inspect" in commands
    assert json.loads((out / "run" / "aux_routers.json").read_text())["world_size"] == 2  # the aux stage on 2 processes
    # Chameleon: its tokenizer imported, a run started from its weights, exported in HF format and loaded back
    assert {"import-tokenizer"} <= commands
    assert json.loads((out / "tokenizer-chameleon" / "vocab.json").read_text())["image_range"] == [4, 260]
    assert json.loads((out / "model-hf" / "config.json").read_text())["model_type"] == "chameleon"
    back = next(s for s in steps if s["step"] == "load the export back through transformers")
    assert back["loaded"] and back["max_logit_difference"] < 1e-4
    tune = out / "unimoe" / "tune" / "checkpoints"
    assert json.loads((tune / (tune / "latest").read_text() / "train_state.json").read_text())["world_size"] == 2


def test_demo_refuses_a_directory_it_did_not_make(tmp_path: Path):
    (tmp_path / "precious.txt").write_text("keep me")
    res = subprocess.run(MMTOK + ["demo", "--out", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "not a demo output directory" in res.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
