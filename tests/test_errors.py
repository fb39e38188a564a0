"""Clear errors, not tracebacks (issue 12): bad paths, hand-edited JSON, damaged logs and
plans, nonsense option values, and token data from another tokenizer. Each is one line
naming the input, exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers.tokens import make_doc, make_token_shards, make_vocab
from helpers.runs import cli
from mmtok.mix import plan_mix, write_plan
from mmtok.shards import SHARD_RE, ShardError, check_key, load_npy, npy_bytes

VOCAB = make_vocab(image_tokens_per_image=8, n_text=200, n_image=64)


def refused(result, *names):
    """Exit 2, one message naming each of `names`, no traceback."""
    out = " ".join((result.output or "").split())  # rich wraps long lines
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in out, out
    for name in names:
        assert str(name) in out, (name, out)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Token shards of text and pairs, and a plan over them."""
    root = tmp_path_factory.mktemp("errors")
    rng = np.random.default_rng(0)
    text = [make_doc(rng, VOCAB, [int(rng.integers(10, 40))]) for _ in range(12)]
    pairs = [make_doc(rng, VOCAB, ["img", 10] if i % 2 else [10, "img"]) for i in range(12)]
    dirs = [make_token_shards(root, text, VOCAB, "text"), make_token_shards(root, pairs, VOCAB, "pairs")]
    write_plan(plan_mix(dirs, out=root / "plan", ratio=(1, 2), world_size=1, seq_len=64, micro_batch=2, steps=4),
               root / "plan")
    (root / "a-file.txt").write_text("not a directory")
    return {"root": root, "plan": root / "plan", "text": dirs[0], "pairs": dirs[1], "file": root / "a-file.txt"}


# ------------------------------------------------------------ a file where a folder is expected

def _file_cases(d, f, new):
    mix = ["--world-size", 1, "--micro-batch", 1, "--steps", 1, "--ratio", "1:1"]
    return [
        ["shard", d, "--out", f], ["extract-keyframes", d, "--out", f], ["extract-audio", d, "--out", f],
        ["train-bpe", d, "--out", f], ["train-vq", d, "--out", f, "--steps", 1],
        ["tokenize-images", d, "-t", d, "--out", f], ["tokenize", d, "-t", d, "--out", f],
        ["tokenize", d, "-t", d, "--out", new, "--codes", f], ["tokenize", f, "-t", d, "--out", new],
        ["tokenize", d, "-t", f, "--out", new],
        ["balance-mix", d, "--out", f, *mix], ["balance-mix", f, "--out", new, *mix],
        ["train", "--plan", f, "--out", new], ["train", "--plan", d, "--out", f],
        ["train", "--model", "uni-moe", "--stage", "align", "--image", f, "--out", new],
        ["eval", "--checkpoint", f, "--data", d], ["eval", "--checkpoint", d, "--data", f],
        ["eval", "--checkpoint", d, "--pairs", f], ["eval", "--checkpoint", d, "--data", d, "--out", f],
        ["export", f, "--to", new], ["export", d, "--to", f],
        ["upcycle", d, "--experts", "2t2i", "--out", f],
        ["generate", "--checkpoint", d, "--tokenizer", d, "--out", f], ["generate", "--checkpoint", d, "--tokenizer", f],
        ["inspect", f], ["demo", "--out", f],
    ]


def test_a_file_where_a_directory_is_expected(corpus):
    d, f, new = corpus["text"], corpus["file"], corpus["root"] / "new"
    for args in _file_cases(d, f, new):
        refused(cli(*args), f.name)
        assert not new.exists(), args


# ------------------------------------------------------------ nonsense option values

@pytest.mark.parametrize("option,value,shown", [
    ("--max-size", "0", "--max-size"), ("--max-size", "-3M", "--max-size"), ("--max-pixels", "0", "--max-pixels"),
])
def test_nonsense_shard_options(corpus, tmp_path, option, value, shown):
    refused(cli("shard", corpus["text"], "--out", tmp_path / "o", option, value), shown)


@pytest.mark.parametrize("args,shown", [
    (["--capacity-factor", "0"], "--capacity-factor"), (["--warmup", "-5"], "--warmup"), (["--lr", "0"], "--lr"),
    (["--steps", "0"], "--steps"), (["--mod-capacity", "0"], "--mod-capacity"),
])
def test_nonsense_train_options(corpus, tmp_path, args, shown):
    refused(cli("train", "--plan", corpus["plan"], "--out", tmp_path / "run", *args), shown)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("toml,shown", [
    ("[model]\nn_layers = -1\n", "[model] n_layers = -1"), ('[train]\nlr = "fast"\n', "[train] lr = 'fast'"),
    ("[model]\nd_model = 64.5\n", "d_model"), ("[model]\nswin_norm = 1\n", "swin_norm"),
    ("[train]\nbetas = [0.9]\n", "betas"), ("[train]\nwarmup = -1\n", "warmup"),
    ("[model]\ncapacity_factor = 0\n", "capacity_factor"), ("model = 3\n", "model"),
])
def test_nonsense_toml_values_name_the_key(corpus, tmp_path, toml, shown):
    (tmp_path / "run.toml").write_text(toml)
    refused(cli("train", "--plan", corpus["plan"], "--out", tmp_path / "run", "--config", tmp_path / "run.toml"),
            shown)
    assert not (tmp_path / "run").exists()


def test_nonsense_generate_and_media_options(corpus, tmp_path):
    d = corpus["text"]
    refused(cli("generate", "--checkpoint", d, "--tokenizer", d, "--top-p", "0", "--out", tmp_path / "g"), "--top-p")
    refused(cli("extract-keyframes", d, "--out", tmp_path / "k", "--frames", "0"), "--frames")
    refused(cli("extract-keyframes", d, "--out", tmp_path / "k", "--quality", "101"), "--quality")
    refused(cli("tokenize", d, "-t", d, "--out", tmp_path / "t", "--batch-size", "0"), "--batch-size")


# ------------------------------------------------------------ hand-edited JSON

def _edit(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_keys_in_a_manifest(corpus, tmp_path):
    d = _copy(corpus["text"], tmp_path / "t1")
    _edit(d / "manifest.json", lambda m: m.pop("shards"))
    refused(cli("inspect", d), "manifest.json", "'shards'")
    refused(cli("balance-mix", d, "--out", tmp_path / "p", "--world-size", 1, "--micro-batch", 1, "--steps", 1,
                "--ratio", "1:1"), "manifest.json", "'shards'")
    d = _copy(corpus["text"], tmp_path / "t2")
    _edit(d / "manifest.json", lambda m: m["shards"][0].pop("bytes"))
    refused(cli("inspect", d), "manifest.json (shards[0])", "'bytes'")
    d = _copy(corpus["text"], tmp_path / "t3")
    _edit(d / "manifest.json", lambda m: m["totals"].pop("by_group"))
    refused(cli("inspect", d), "manifest.json (totals)", "'by_group'")


def _plan_copy(corpus, tmp_path):
    """A copy of the plan beside the sources, so its relative source paths still resolve."""
    return _copy(corpus["plan"], corpus["root"] / f"plan-{tmp_path.name}")


@pytest.mark.parametrize("drop", ["seq_len", "sources", "vocab"])
def test_missing_keys_in_a_plan(corpus, tmp_path, drop):
    p = _plan_copy(corpus, tmp_path)
    _edit(p / "plan.json", lambda m: m.pop(drop))
    refused(cli("inspect", p), "plan.json", repr(drop))
    refused(cli("train", "--plan", p, "--out", tmp_path / "run"), "plan.json", repr(drop))


def test_a_malformed_vocabulary_in_a_plan_is_refused(corpus, tmp_path):
    """The plan's vocab is parsed into a Vocab when read: one without <boi> never reaches training."""
    p = _plan_copy(corpus, tmp_path)
    _edit(p / "plan.json", lambda m: m["vocab"]["specials"].pop("<boi>"))
    refused(cli("train", "--plan", p, "--out", tmp_path / "run"), "plan.json (vocab)", "missing special <boi>")
    assert not (tmp_path / "run").exists()


def test_a_malformed_vocabulary_in_token_shards_is_refused(corpus, tmp_path):
    d = _copy(corpus["text"], tmp_path / "t")
    _edit(d / "manifest.json", lambda m: m["config"]["vocab"].update(n_specials=3))
    refused(cli("balance-mix", d, "--out", tmp_path / "p", "--world-size", 1, "--micro-batch", 1, "--steps", 1,
                "--ratio", "1:1"), "manifest.json (config.vocab)", "special ids")
    assert not (tmp_path / "p").exists()


def test_missing_key_in_a_plan_source(corpus, tmp_path):
    p = _plan_copy(corpus, tmp_path)
    _edit(p / "plan.json", lambda m: m["sources"][1].pop("manifest_sha256"))
    refused(cli("train", "--plan", p, "--out", tmp_path / "run"), "plan.json (sources[1])", "'manifest_sha256'")


def _fake_run(path, config: dict, metrics: str = ""):
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if metrics:
        (path / "metrics.jsonl").write_text(metrics)
    return path


def test_missing_keys_in_a_run(tmp_path):
    from mmtok.trainer.config import RunConfig

    good = RunConfig().as_dict()
    run = _fake_run(tmp_path / "r1", {"model": good["model"]})
    refused(cli("inspect", run), "config.json", "'train'")
    refused(cli("eval", "--checkpoint", run, "--data", tmp_path), "config.json", "'train'")
    run = _fake_run(tmp_path / "r2", {**good, "train": {k: v for k, v in good["train"].items() if k != "steps"}})
    refused(cli("inspect", run), "config.json (train)", "'steps'")
    with pytest.raises(ValueError, match=r"r3/config.json: .*n_layerz"):
        RunConfig.from_dict({**good, "model": {**good["model"], "n_layerz": 2}}, str(tmp_path / "r3" / "config.json"))


def test_resume_of_a_directory_without_a_run_says_so(tmp_path):
    refused(cli("train", "--out", tmp_path / "no-run", "--resume"), "holds no run", "--resume")


# ------------------------------------------------------------ damaged JSON logs

def test_an_invalid_line_in_a_json_log(corpus, tmp_path):
    from mmtok.trainer.config import RunConfig

    run = _fake_run(tmp_path / "run", RunConfig().as_dict(), '{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    refused(cli("inspect", run), "metrics.jsonl line 2")
    d = _copy(corpus["text"], tmp_path / "t")
    with open(d / "quarantine.jsonl", "a") as f:
        f.write('{"input": "x", "reason": "bad: thing"}\n[1, 2]\n')
    refused(cli("inspect", d), "quarantine.jsonl line", "not a JSON object")
    # eval's report reads the run's metrics.jsonl the same way
    from mmtok.trainer.evaluate import write_report

    with pytest.raises(ShardError, match=r"metrics.jsonl line 2: not valid JSON"):
        write_report({"model": "m"}, tmp_path / "eval", run / "metrics.jsonl")


# ------------------------------------------------------------ out-of-range plan arrays

@pytest.mark.parametrize("array,value,shown", [
    ("piece_doc", 10**6, "piece_doc.npy: value 1000000"), ("piece_seq", 7, "piece_seq.npy: value 7"),
    ("piece_start", -1, "piece_start.npy: value -1"), ("piece_len", 10**4, "piece_len.npy"),
    ("mb_ptr", 10**6, "mb_ptr.npy"),
])
def test_out_of_range_plan_arrays_are_refused(corpus, tmp_path, array, value, shown):
    from mmtok.loader import PlanLoader

    p = _plan_copy(corpus, tmp_path)
    a = np.load(p / f"{array}.npy")
    a[len(a) // 2] = value
    (p / f"{array}.npy").write_bytes(npy_bytes(a))
    with pytest.raises(ShardError, match=shown.replace(".", r"\.")):
        PlanLoader(p)


def test_out_of_range_plan_array_through_train(corpus, tmp_path):
    p = _plan_copy(corpus, tmp_path)
    a = np.load(p / "piece_doc.npy")
    a[0] = len(a) * 100
    (p / "piece_doc.npy").write_bytes(npy_bytes(a))
    refused(cli("train", "--plan", p, "--out", tmp_path / "run", "--steps", 1), "piece_doc.npy", "balance-mix")


def test_the_plan_as_written_passes_the_checks(corpus):
    from mmtok.loader import PlanLoader

    batches = list(PlanLoader(corpus["plan"]))
    assert len(batches) == 4


# ------------------------------------------------------------ token data from another tokenizer

@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Tokenizers A and B: the same vocabulary layout (equal vocab.json dicts), BPE models
    trained on different text; token shards of one text corpus made with each."""
    from helpers.media import make_shards, sentences

    from mmtok.bpe import train_bpe
    from mmtok.tokenize import Tokenizer, tokenize

    root = tmp_path_factory.mktemp("twotok")
    out = {"root": root}
    docs = make_shards(root / "docs", texts=sentences(40, seed=7))
    for name, seed in (("A", 0), ("B", 1)):
        src = make_shards(root / f"src{name}", texts=sentences(seed=seed))
        train_bpe([src], root / f"tok{name}", vocab_size=600, image_codes=16, image_tokens_per_image=4,
                  log=lambda m: None)
        tok = Tokenizer.load(root / f"tok{name}", "cpu")
        tokenize([docs], tok, root / f"tokens{name}", progress=False)
        out[name] = tok
    assert out["A"].vocab.to_dict() == out["B"].vocab.to_dict()
    assert out["A"].fingerprint() != out["B"].fingerprint()
    return out


def test_balance_mix_refuses_sources_of_two_tokenizers(two_tokenizers, tmp_path):
    r = two_tokenizers["root"]
    refused(cli("balance-mix", r / "tokensA", r / "tokensB", "--out", tmp_path / "p", "--world-size", 1,
                "--micro-batch", 1, "--seq-len", 64, "--steps", 1, "--ratio", "1:1"), "tokensB", "another tokenizer")
    assert cli("balance-mix", r / "tokensA", "--out", tmp_path / "p", "--world-size", 1, "--micro-batch", 1,
               "--seq-len", 64, "--steps", 1, "--ratio", "1:1").exit_code == 0
    assert json.loads((tmp_path / "p" / "plan.json").read_text())["tokenizer"] == two_tokenizers["A"].fingerprint()


def test_a_run_records_its_tokenizer_and_eval_and_generate_refuse_another(two_tokenizers, tmp_path):
    r, fp_a = two_tokenizers["root"], two_tokenizers["A"].fingerprint()
    assert cli("balance-mix", r / "tokensA", "--out", tmp_path / "p", "--world-size", 1, "--micro-batch", 2,
               "--seq-len", 32, "--steps", 2, "--ratio", "1:1").exit_code == 0
    run = tmp_path / "run"
    res = cli("train", "--plan", tmp_path / "p", "--out", run, "--steps", 1, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["model"]["tokenizer"] == fp_a
    refused(cli("eval", "--checkpoint", run, "--data", r / "tokensB", "--max-docs", 2), "tokensB", "another tokenizer")
    res = cli("eval", "--checkpoint", run, "--data", r / "tokensA", "--max-docs", 2, "--json")
    assert res.exit_code == 0, res.output
    refused(cli("generate", "--checkpoint", run, "--tokenizer", r / "tokB", "--prompt", "ka", "--out", tmp_path / "g"),
            "tokB", "another tokenizer")
    # the export keeps the fingerprint
    assert cli("export", run, "--to", tmp_path / "x").exit_code == 0
    refused(cli("eval", "--checkpoint", tmp_path / "x", "--data", r / "tokensB"), "another tokenizer")


# ------------------------------------------------------------ --codes that do not fit the codebook

def test_out_of_range_codes_are_quarantined_naming_the_shard(tmp_path, bpe_tokdir):
    import torch
    from helpers.media import draw_image, make_shards

    from mmtok.shards import ShardReader
    from mmtok.tokenize import Tokenizer, tokenize, tokenize_images
    from mmtok.vq import VQConfig, VQModel

    torch.manual_seed(0)
    tok_dir = bpe_tokdir
    VQModel(VQConfig(resolution=16, downsample=2, codebook_size=64, channels=8, res_blocks=1)).save(tok_dir)
    tok = Tokenizer.load(tok_dir, "cpu")
    images = [draw_image(i) for i in range(3)]
    shards = make_shards(tmp_path / "in", pairs=[(im, f"caption {i}") for i, im in enumerate(images)])
    tokenize_images([shards], tok, tmp_path / "codes", progress=False)
    reader = ShardReader(tmp_path / "codes")
    row = reader.index().to_pylist()[1]
    m = next(m for m in row["members"] if m["ext"] == "npy")
    codes = load_npy(reader.read_member(row["shard"], m["offset"], m["size"]))
    codes[5] = 64  # one past the codebook: the same bytes long
    with open(tmp_path / "codes" / row["shard"], "r+b") as f:
        f.seek(m["offset"])
        f.write(npy_bytes(codes))
    summary, _ = tokenize([shards], tok, tmp_path / "tokens", codes_dir=tmp_path / "codes", progress=False,
                          max_error_rate=0.5)
    assert summary.samples == 2 and summary.quarantined == 1
    (rec,) = [json.loads(x) for x in (tmp_path / "tokens" / "quarantine.jsonl").read_text().splitlines()]
    assert f"--codes {tmp_path / 'codes' / row['shard']}" in rec["reason"]
    assert "outside the codebook [0, 64)" in rec["reason"] and "rerun tokenize-images" in rec["reason"]


# ------------------------------------------------------------ a sender's edits: nothing outside is read

def _edit_index(d, column, fn):
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(d / "index.parquet")
    values = t.column(column).to_pylist()
    pq.write_table(t.set_column(t.column_names.index(column), column, pa.array(fn(values))), d / "index.parquet")


@pytest.mark.parametrize("edit, shown", [
    (lambda m: m["shards"][0].update(bytes="x"), "shards[0]"),
    (lambda m: m["shards"][0].update(samples=True), "shards[0]"),
    (lambda m: m["shards"][0].update(name="text-/../../secret.txt"), "shards[0]"),
    (lambda m: m["shards"][0].update(name="/etc/passwd"), "shards[0]"),
    (lambda m: m["totals"].update(by_group=[1]), "totals"),
    (lambda m: m.update(stage=["x"]), "stage"),
])
def test_a_manifest_of_the_wrong_shape_is_refused(corpus, tmp_path, edit, shown):
    d = _copy(corpus["text"], tmp_path / "t")
    _edit(d / "manifest.json", edit)
    refused(cli("inspect", d), "manifest.json", shown)
    refused(cli("balance-mix", d, "--out", tmp_path / "p", "--world-size", 1, "--micro-batch", 1, "--steps", 1,
                "--ratio", "1:1"), "manifest.json")


def test_an_index_naming_another_file_is_never_read(tmp_path, bpe_tokdir):
    """index.parquet is read by offset: a row naming `../secret.txt` (or any path) is refused,
    so no stage reads a file outside the directory into a tokenizer or token shards."""
    from helpers.media import make_shards

    secret = tmp_path / "secret.txt"
    secret.write_text("ZQXSECRETZQX password=hunter2\n" * 400)
    d = make_shards(tmp_path / "shards", texts=[f"plain text number {i}" for i in range(40)])
    for i, name in enumerate(("../secret.txt", str(secret))):
        _edit_index(d, "shard", lambda v: [name] * len(v))
        refused(cli("train-bpe", d, "--out", tmp_path / "tok-evil", "--vocab-size", 600, "--image-codes", 16),
                "index.parquet", "not a shard its manifest lists")
        assert not (tmp_path / "tok-evil" / "bpe.vocab").exists()
        refused(cli("tokenize", d, "-t", bpe_tokdir, "--out", tmp_path / f"tk{i}"), "index.parquet")


def _rename_members(d, rename):
    """Rewrite the first shard of `d` with its members renamed (`rename(name, first sample's
    key)`), and its manifest's byte count to match: a sender's edit that the checksums miss."""
    import io
    import tarfile

    shard = sorted(d.glob("*.tar"))[0]
    with tarfile.open(shard) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    first = members[0][0].name.split(".")[0]
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as t:
        for m, data in members:
            m.name = rename(m.name, first)
            t.addfile(m, io.BytesIO(data))
    _edit(d / "manifest.json", lambda m: m["shards"][0].update(bytes=shard.stat().st_size))


def test_a_key_that_is_not_a_plain_name_is_refused(corpus, tmp_path):
    """A key names members and files downstream (tokenize's shards, detokenize's files): one
    with a slash or dots, from an edited index or tar, is refused, never written or lost."""
    from mmtok.shards import ShardReader

    d = _copy(corpus["text"], tmp_path / "t1")
    _edit_index(d, "key", lambda v: ["../../evil"] + v[1:])
    with pytest.raises(ShardError, match="sample key"):
        ShardReader(d).index()
    d = _copy(corpus["text"], tmp_path / "t2")  # a member renamed in the tar itself
    _rename_members(d, lambda name, first: "sub/" + name if name.startswith(first) else name)
    with pytest.raises(ShardError, match="sample key 'sub/"):
        list(ShardReader(d))
    with pytest.raises(ShardError, match="sample key"):  # a trailing newline is no plain name either
        check_key("000000001\n", "x")
    assert SHARD_RE.match("text-000000.tar") and not SHARD_RE.match("text-000000.tar\n")


def test_tokenize_streaming_a_shard_checks_its_keys(tmp_path, bpe_tokdir):
    """A shard directory without image hashes in its index is streamed by tokenize: a key
    renamed in its tar is refused there too, never written into token shards."""
    from helpers.media import make_shards

    d = make_shards(tmp_path / "shards", texts=[f"plain text number {i}" for i in range(5)])
    _rename_members(d, lambda name, first: "sub/" + name)
    refused(cli("tokenize", d, "-t", bpe_tokdir, "--out", tmp_path / "tk"), "sample key 'sub/")


@pytest.mark.parametrize("edit, shown", [({"sp_model": "../outside.model"}, "not a file name"),
                                         ({"sp_model": "/etc/passwd"}, "not a file name"),
                                         ({"sp_model": "bpe.model\n"}, "not a file name"),
                                         ({"text_range": [16]}, "[start, end]")])
def test_a_tokenizer_names_only_its_own_files(edit, shown):
    from mmtok.vocab import Vocab, VocabError

    with pytest.raises(VocabError, match=__import__("re").escape(shown)):
        Vocab.from_dict({**make_vocab(), **edit})


def test_a_stage_given_the_wrong_kind_of_directory_says_which_it_is(corpus, tmp_path, bpe_tokdir):
    # token shards where shards go: refused, not an empty run that exits 0
    refused(cli("tokenize", corpus["text"], "-t", bpe_tokdir, "--out", tmp_path / "t"), "output of `mmtok tokenize`",
            "shard directory")
    # a directory with a vocabulary but no token counts (what tokenize-images writes) where tokens go
    d = _copy(corpus["text"], tmp_path / "codes-like")
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(d / "index.parquet").drop(["n_tokens"]), d / "index.parquet")
    _edit(d / "manifest.json", lambda m: m.update(stage="tokenize-images"))
    refused(cli("balance-mix", d, "--out", tmp_path / "p", "--world-size", 1, "--micro-batch", 1, "--steps", 1,
                "--ratio", "1:1"), "index.parquet", "is the output of `mmtok tokenize-images`: give a `mmtok tokenize`")


def test_an_image_cut_short_in_its_header_is_a_value_error():
    import io

    from PIL import Image

    from mmtok.images import open_image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    with pytest.raises(ValueError, match="not a readable image"):
        open_image(buf.getvalue()[:300])
