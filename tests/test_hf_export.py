"""`mmtok export --format hf`: runs as Hugging Face model directories with the tokenizer
bundled. A dense model with Chameleon's QK-norm loads as transformers' own
ChameleonForConditionalGeneration, every other model through its modelling code
(trust_remote_code); logits equal mmtok's. lm-evaluation-harness scores them through
its stock `hf` model type, offline, on a task written here; `mmtok eval --lm-eval` wraps it."""

import json

import numpy as np
import pytest
import torch
from helpers.chameleon import TEXTS, save_chameleon, text_tokenizer
from helpers.tokens import make_doc, make_token_shards
from helpers.runs import cli
from helpers.media import make_shards

from mmtok.chameleon import import_chameleon
from mmtok.mix import plan_mix, write_plan
from mmtok.tokenize import Tokenizer
from mmtok.trainer.checkpoint import load_run
from mmtok.trainer.job import TrainError
from mmtok.vocab import Vocab

WORDS = ["the cat sat on the mat", "a dog ran in the park", "the quick brown fox jumps over the lazy dog"]


def _plan(root, vocab: dict, seq_len: int = 96):
    rng = np.random.default_rng(0)
    text = [make_doc(rng, vocab, [int(rng.integers(10, 40))]) for _ in range(20)]
    pairs = [make_doc(rng, vocab, ["img", 10] if i % 2 else [10, "img"]) for i in range(20)]
    dirs = [make_token_shards(root, text, vocab, "text"), make_token_shards(root, pairs, vocab, "pairs")]
    write_plan(plan_mix(dirs, out=root / "plan", ratio=(1, 1), world_size=1, seq_len=seq_len, micro_batch=2, steps=8),
               root / "plan")
    return root / "plan"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs on Chameleon's tokenizer (dense from a Chameleon checkpoint, twice, from two
    seeds) and on mmtok's own BPE (dense with mmtok's QK-norm, MoMa 1t1i)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hf-export")
    tok = text_tokenizer()
    out = {}
    for seed in (0, 1):
        save_chameleon(root / f"hf{seed}", tok, seed=seed, randomize=True)
    import_chameleon(root / "hf0", root / "tok-cham")
    plan = _plan(root / "cham", Vocab.load(root / "tok-cham").to_dict())
    for seed in (0, 1):
        r = cli("train", "--init-from", f"hf:{root / f'hf{seed}'}", "--plan", plan, "--out", root / f"cham{seed}",
                "--steps", "2", "--json")
        assert r.exit_code == 0, r.output
    from mmtok.bpe import train_bpe

    import random

    from mmtok.demo import sentence

    rng = random.Random(0)
    corpus = [" ".join(sentence(rng) for _ in range(4)) for _ in range(300)] + WORDS * 20 + TEXTS * 20
    shards = make_shards(root / "text-shards", texts=corpus)
    train_bpe([shards], root / "tok-own", vocab_size=600, image_codes=64, image_tokens_per_image=8, log=lambda m: None)
    plan2 = _plan(root / "own", Vocab.load(root / "tok-own").to_dict(), seq_len=64)
    for name, opts in (("dense", []), ("moma", ["--model", "moma", "--experts", "1t1i", "--aux-routers", "joint"])):
        r = cli("train", "--plan", plan2, "--out", root / name, "--steps", "3", *opts, "--json")
        assert r.exit_code == 0, r.output
    out.update(root=root, tok_cham=root / "tok-cham", tok_own=root / "tok-own")
    return out


def _export(run, out, tok):
    r = cli("export", run, "--out", out, "--format", "hf", "--tokenizer", tok, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _mmtok_logits(run, ids, routing="batch"):
    model, _, _ = load_run(run)
    with torch.no_grad():
        logits, _ = model(ids, torch.arange(ids.shape[1]).repeat(ids.shape[0], 1), torch.ones_like(ids), routing=routing)
    return model.cfg, logits


def _ids(tok_dir, texts):
    tok = Tokenizer.load(tok_dir)
    n = min(len(tok.encode_text(t)) for t in texts)
    return torch.as_tensor(np.stack([tok.encode_text(t)[:n] for t in texts]).astype(np.int64))


def test_dense_chameleon_export_is_stock_transformers(runs, tmp_path):
    from transformers import AutoTokenizer, ChameleonForConditionalGeneration

    summary = _export(runs["root"] / "cham0", tmp_path / "hf", runs["tok_cham"])
    assert summary["architecture"] == "ChameleonForConditionalGeneration" and not summary["remote_code"]
    assert not (tmp_path / "hf" / "modeling_mmtok.py").exists()
    model = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(runs["tok_cham"], TEXTS[:2])
    cfg, ours = _mmtok_logits(runs["root"] / "cham0", ids)
    with torch.no_grad():
        theirs = model(input_ids=ids).logits
    text = torch.ones(cfg.vocab_size, dtype=torch.bool)
    text[slice(*cfg.image_range)] = False  # transformers' Chameleon masks image tokens' logits (text out only)
    assert ours[..., text].std() > 0.5
    torch.testing.assert_close(theirs[..., text], ours[..., text], atol=1e-4, rtol=0)
    # its own VQ encoder came along: the image path gives the same codes as mmtok's tokenizer
    tok = Tokenizer.load(runs["tok_cham"], "cpu")
    from helpers.media import photo

    img = photo(1, 80, 64)
    pixels = tok.vq.scale(torch.from_numpy(tok.preprocess(img)))[None]
    with torch.no_grad():
        np.testing.assert_array_equal(model.model.get_image_tokens(pixels).numpy()[0],
                                      tok.encode_images([img], batch_size=1)[0] + cfg.image_range[0])
    # the tokenizer is bundled: users and the harness need nothing beside the directory
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for t in TEXTS:
        assert hf_tok(t, add_special_tokens=False).input_ids == tok.encode_text(t).tolist()
    assert (tmp_path / "hf" / "mmtok-tokenizer" / "vocab.json").exists()


def test_own_tokenizer_and_moe_models_export_with_their_code(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = Tokenizer.load(runs["tok_own"])
    for name in ("dense", "moma"):
        out = tmp_path / name
        summary = _export(runs["root"] / name, out, runs["tok_own"])
        assert summary["architecture"] == "MmtokForCausalLM" and summary["remote_code"]
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        ids = _ids(runs["tok_own"], WORDS)
        _, ours = _mmtok_logits(runs["root"] / name, ids, routing="causal")
        with torch.no_grad():
            theirs = model(input_ids=ids).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        # causal: a later token changes no earlier logit (expert choice over the batch would)
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 200 + 16
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=changed).logits[:, :-1], theirs[:, :-1], atol=1e-5, rtol=0)
        # left padding: a padded row scores like the row alone
        pad = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1]], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids[:1])], 1)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=pad, attention_mask=mask).logits[:, 3:], theirs[:1], atol=1e-4, rtol=0)
    # mmtok's SentencePiece BPE as a Hugging Face tokenizer: the same ids
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "dense")
    for t in WORDS + ["The fox, 1234 times!", "  two  spaces\nnew line", "héllo wörld 你好"]:
        ids = hf_tok(t, add_special_tokens=False).input_ids
        assert ids == tok.encode_text(t).tolist()
        assert hf_tok.decode(ids) == tok.decode_text(ids) == t


def test_mmtok_export_bundles_the_tokenizer_for_generate(runs, tmp_path):
    r = cli("export", runs["root"] / "dense", "--out", tmp_path / "m", "--tokenizer", runs["tok_own"], "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m" / "tokenizer" / "vocab.json").read_bytes() == (runs["tok_own"] / "vocab.json").read_bytes()
    r = cli("generate", tmp_path / "m", "--prompt", "the cat", "--max-tokens", "4", "--out", tmp_path / "gen", "--json")
    assert r.exit_code == 0, r.output
    r = cli("generate", runs["root"] / "dense", "--prompt", "the cat", "--out", tmp_path / "gen2")
    assert r.exit_code == 2 and "give --tokenizer" in r.output


def test_export_refuses_what_it_cannot_stand_behind(runs, tmp_path):
    r = cli("export", runs["root"] / "cham0", "--out", tmp_path / "a", "--format", "hf")
    assert r.exit_code == 2 and "give --tokenizer" in r.output
    r = cli("export", runs["root"] / "cham0", "--out", tmp_path / "a", "--format", "hf", "--tokenizer", runs["tok_own"])
    assert r.exit_code == 2 and "not its tokenizer" in r.output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    r = cli("export", runs["root"] / "cham0", "--out", tmp_path / "mine", "--format", "hf", "--tokenizer", runs["tok_cham"])
    assert r.exit_code == 2 and "something other than" in r.output and (tmp_path / "mine" / "notes.txt").exists()
    r = cli("export", runs["root"] / "cham0", "--out", tmp_path / "a", "--format", "onnx")
    assert r.exit_code == 2 and "unknown export format" in r.output


def test_scoring_an_export_runs_none_of_its_code(runs, tmp_path):
    """`mmtok eval EXPORT --lm-eval` loads a directory that may come from anyone: its
    modeling_mmtok.py is never imported (mmtok's installed modelling code builds the model)
    and a pickled weights file is never read."""
    import pickle
    import shutil

    from mmtok.trainer.hf_export import MODELING, WEIGHTS, load_export

    marker = tmp_path / "code-ran"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n"
    out = tmp_path / "moma"
    _export(runs["root"] / "moma", out, runs["tok_own"])
    (out / MODELING).write_text((out / MODELING).read_text() + evil)  # a sender's edit
    model, tokenizer = load_export(out)
    ids = _ids(runs["tok_own"], WORDS)
    _, ours = _mmtok_logits(runs["root"] / "moma", ids, routing="causal")
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ours, atol=1e-4, rtol=0)
    assert tokenizer("the cat", add_special_tokens=False).input_ids

    class Payload:  # unpickling it would write the marker
        def __reduce__(self):
            return (exec, (evil,))

    swapped = tmp_path / "swapped"  # safetensors replaced by a pickle
    shutil.copytree(out, swapped)
    (swapped / WEIGHTS).unlink()
    (swapped / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(TrainError, match="not a loadable HF export"):
        load_export(swapped)
    assert not marker.exists()


def _task(root):
    """A multiple-choice task over a JSONL file, as lm-eval's local YAML tasks are written."""
    docs = [{"context": "the cat sat on the", "choices": ["mat", "dog", "park"], "label": 0},
            {"context": "the quick brown", "choices": ["fox", "cat"], "label": 0},
            {"context": "a dog ran in", "choices": ["the park", "the mat"], "label": 0}]
    (root / "tasks").mkdir()
    (root / "tasks" / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks" / "tiny.yaml").write_text(
        "task: mmtok_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'tasks' / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    return root / "tasks", docs


def _loglikelihood(run, tok_dir, context: str, continuation: str) -> float:
    """log p(continuation | context) by mmtok's own model and tokenizer, split as the harness
    splits, over the text ids (the export, a stock Chameleon, never predicts image tokens)."""
    tok = Tokenizer.load(tok_dir)
    whole, ctx = tok.encode_text(context + continuation).tolist(), tok.encode_text(context).tolist()
    ids = torch.tensor([whole])
    cfg, logits = _mmtok_logits(run, ids)
    logits[..., slice(*cfg.image_range)] = float("-inf")  # as transformers' Chameleon: text out only
    logp = torch.log_softmax(logits[0, :-1].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_lm_eval_scores_an_export_with_the_model(runs, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mmtok.trainer.hf_export import harness_lm

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks, docs = _task(tmp_path)
    lls, acc = {}, {}
    for seed in (0, 1):
        _export(runs["root"] / f"cham{seed}", tmp_path / f"hf{seed}", runs["tok_cham"])
        lm = harness_lm(tmp_path / f"hf{seed}")
        assert isinstance(lm, HFLM)  # the harness's own `hf` model type, on the exported directory's model
        res = lm_eval.simple_evaluate(model=lm, tasks=["mmtok_tiny"], task_manager=TaskManager(include_path=str(tasks)),
                                      log_samples=True)
        samples = sorted(res["samples"]["mmtok_tiny"], key=lambda s: s["doc_id"])
        lls[seed] = [[r[0][0] for r in s["resps"]] for s in samples]
        acc[seed] = res["results"]["mmtok_tiny"]["acc,none"]
    for doc, got in zip(docs, lls[0]):
        want = [_loglikelihood(runs["root"] / "cham0", runs["tok_cham"], doc["context"], " " + c) for c in doc["choices"]]
        np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)  # sums of a few tokens' 1e-4-close log-probs
    assert max(abs(a - b) for x, y in zip(lls[0], lls[1]) for a, b in zip(x, y)) > 0.1  # another model, other scores
    # the CLI wrapper writes the harness's results next to mmtok's own report
    r = cli("eval", tmp_path / "hf0", "--lm-eval", "mmtok_tiny", "--lm-eval-tasks", tasks,
            "--out", tmp_path / "report", "--json")
    assert r.exit_code == 0, r.output
    written = json.loads((tmp_path / "report" / "lm_eval.json").read_text())
    assert written["results"]["mmtok_tiny"]["acc,none"] == acc[0]
