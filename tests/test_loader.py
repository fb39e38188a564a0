"""PlanLoader: the batch contract, exact resume (with workers), elastic resume, bad shards."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.tokens import make_doc, make_token_shards, make_vocab
from mmtok.loader import PlanLoader
from mmtok.mix import plan_mix, write_plan
from mmtok.shards import ShardError, ShardReader
from mmtok.vocab import Vocab

VOCAB = make_vocab(image_tokens_per_image=16)
KEYS = ("input_ids", "targets", "modality", "doc_ids", "positions")


@pytest.fixture(scope="module")
def plan_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loader")
    rng = np.random.default_rng(7)
    text = [make_doc(rng, VOCAB, [int(rng.integers(2, 150))]) for _ in range(40)]
    image = [make_doc(rng, VOCAB, ["img", int(rng.integers(1, 4))] if i % 2 else [2, "img", 1, "img"]) for i in range(30)]
    dirs = [make_token_shards(tmp, text, VOCAB, "text"), make_token_shards(tmp, image, VOCAB, "image")]
    out = tmp / "plan"
    write_plan(plan_mix(dirs, out=out, ratio=(1, 1), world_size=4, seq_len=64, micro_batch=2, steps=6, seed=3), out)
    return out


def all_documents(plan_dir) -> list[np.ndarray]:
    """Documents by global id, read by plain iteration over the shards (not by seek)."""
    plan = json.loads((plan_dir / "plan.json").read_text())
    docs = []
    for s in plan["sources"]:
        reader = ShardReader(plan_dir / s["path"])
        order = reader.index().column("key").to_pylist()
        by_key = {x.key: np.load(io.BytesIO(x.members["npy"])) for x in reader}
        docs += [by_key[k] for k in order]
    return docs


def stream(loader) -> list[dict]:
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in KEYS)


def test_batches_follow_the_contract(plan_dir):
    loader = PlanLoader(plan_dir, rank=1, world_size=4)
    assert loader.seq_len == 64 and loader.micro_batch == 2 and loader.vocab == Vocab.from_dict(VOCAB) and len(loader) == 6
    docs = all_documents(plan_dir)
    plan = json.loads((plan_dir / "plan.json").read_text())
    arrays = {k: np.load(plan_dir / f"{k}.npy") for k in ("mb_ptr", "piece_doc", "piece_start", "piece_len", "piece_seq")}
    lo, hi = VOCAB["image_range"]
    batches = stream(loader)
    assert len(batches) == 6
    for step, b in enumerate(batches):
        assert {k: (b[k].dtype, tuple(b[k].shape)) for k in KEYS} == {
            "input_ids": (torch.int64, (2, 64)), "targets": (torch.int64, (2, 64)), "modality": (torch.uint8, (2, 64)),
            "doc_ids": (torch.int32, (2, 64)), "positions": (torch.int32, (2, 64))}
        m = step * 4 + 1
        ids, tg = b["input_ids"].numpy(), b["targets"].numpy()
        assert np.array_equal(b["modality"].numpy(), ((ids >= lo) & (ids < hi)).astype(np.uint8))
        n_img = int(b["modality"].sum())
        n_txt = int((b["doc_ids"] > 0).sum()) - n_img
        assert abs(n_txt / n_img - 1) <= 0.02  # on target in the tokens the trainer sees
        cursor = [0, 0]
        seg = [0, 0]
        for p in range(arrays["mb_ptr"][m], arrays["mb_ptr"][m + 1]):
            d, s0, n, s = (int(arrays[k][p]) for k in ("piece_doc", "piece_start", "piece_len", "piece_seq"))
            c = cursor[s]
            seg[s] += 1
            doc = docs[d].astype(np.int64)
            assert np.array_equal(ids[s, c:c + n], doc[s0:s0 + n])
            want = np.append(doc[s0 + 1:s0 + n + 1], [-100] * (s0 + n == len(doc)))
            assert np.array_equal(tg[s, c:c + n], want)
            assert (b["doc_ids"][s, c:c + n] == seg[s]).all()
            assert np.array_equal(b["positions"][s, c:c + n].numpy(), np.arange(n))
            cursor[s] = c + n
        for s in range(2):  # padding after the pieces
            assert (ids[s, cursor[s]:] == VOCAB["specials"]["<pad>"]).all() and (tg[s, cursor[s]:] == -100).all()
            assert (b["doc_ids"][s, cursor[s]:] == 0).all()
    assert plan["microbatches"] == 24


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_mid_run_with_workers(plan_dir, workers):
    full = stream(PlanLoader(plan_dir, rank=2, world_size=4, num_workers=workers))
    first = PlanLoader(plan_dir, rank=2, world_size=4, num_workers=workers)
    it = iter(first)
    head = [next(it) for _ in range(2)]  # workers have prefetched more than this
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    again = PlanLoader(plan_dir, rank=2, world_size=4, num_workers=workers)
    again.load_state_dict(state)
    assert len(again) == 4
    rest = stream(again)
    assert len(head) + len(rest) == len(full)
    assert all(same(a, b) for a, b in zip(head + rest, full))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w1=st.sampled_from([1, 2, 4]), w2=st.sampled_from([1, 2, 3, 4, 8]), stop=st.integers(0, 5))
def test_elastic_resume_continues_the_global_order(plan_dir, w1, w2, stop):
    """Stop after `stop` steps at world size w1, resume at w2: the micro-batches read, in
    global order, are exactly the single-rank stream, none skipped or repeated."""
    reference = stream(PlanLoader(plan_dir))
    seen = {}
    state = None
    for r in range(w1):
        loader = PlanLoader(plan_dir, rank=r, world_size=w1)
        for step, b in zip(range(stop), loader):
            seen.setdefault(step * w1 + r, []).append(b)
        state = loader.state_dict()
    start = state["next_microbatch"]
    assert start == min(stop, len(reference) // w1) * w1
    for r in range(w2):
        loader = PlanLoader(plan_dir, rank=r, world_size=w2)
        loader.load_state_dict(state)
        for step, b in enumerate(loader):
            seen.setdefault(start + step * w2 + r, []).append(b)
    assert sorted(seen) == list(range(len(seen)))  # no gap
    assert len(seen) >= len(reference) - w2 + 1  # only a last partial step is left unread
    for g, bs in seen.items():
        assert len(bs) == 1 and same(bs[0], reference[g])  # no repeat; same content


def test_state_of_another_plan_is_refused(plan_dir, tmp_path):
    rng = np.random.default_rng(1)
    d = make_token_shards(tmp_path, [make_doc(rng, VOCAB, ["img", 2]) for _ in range(5)], VOCAB, "x")
    write_plan(plan_mix([d], out=tmp_path / "p", ratio=(1, 1), world_size=1, seq_len=64, micro_batch=1, steps=2, seed=9),
               tmp_path / "p")
    other = PlanLoader(tmp_path / "p").state_dict()
    with pytest.raises(ValueError, match="another plan order"):
        PlanLoader(plan_dir).load_state_dict(other)


def make_small_plan(tmp_path):
    rng = np.random.default_rng(2)
    docs = [make_doc(rng, VOCAB, [20, "img", 2]) for _ in range(20)] + [make_doc(rng, VOCAB, [30]) for _ in range(20)]
    d = make_token_shards(tmp_path, docs, VOCAB, "tok", max_count=5)
    write_plan(plan_mix([d], out=tmp_path / "p", ratio=(1, 1), world_size=1, seq_len=64, micro_batch=1, steps=4),
               tmp_path / "p")
    return d, tmp_path / "p"


def test_missing_or_truncated_shard_is_named_before_training(tmp_path):
    d, p = make_small_plan(tmp_path)
    shard = sorted(d.glob("*.tar"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=f"{shard.name}.*corrupt or truncated"):
        PlanLoader(p)
    shard.unlink()
    with pytest.raises(ShardError, match=f"{shard.name}: listed in the manifest but missing"):
        PlanLoader(p)


def test_corrupt_payload_names_the_shard(tmp_path):
    d, p = make_small_plan(tmp_path)
    for shard in d.glob("*.tar"):  # same size, garbage bytes: found when a document is read
        shard.write_bytes(b"\x00" * shard.stat().st_size)
    with pytest.raises(ShardError, match=r"tokens?-0000\d\d\.tar.*corrupt npy"):
        next(iter(PlanLoader(p)))


def test_changed_corpus_and_missing_plan_are_clear_errors(tmp_path):
    d, p = make_small_plan(tmp_path)
    (d / "manifest.json").write_text((d / "manifest.json").read_text().replace('"totals"', '"totals" ', 1))
    with pytest.raises(ShardError, match="manifest changed since the plan was made"):
        PlanLoader(p)
    with pytest.raises(ShardError, match="no plan.json"):
        PlanLoader(tmp_path)


def test_one_module_owns_the_plan_format(plan_dir):
    """mmtok.plan writes and reads plans (mix and loader both use it); in memory the vocab is a
    parsed Vocab, on disk the same record as the token shards' manifests."""
    import mmtok.loader
    import mmtok.plan

    meta, arrays = mmtok.plan.read_plan(plan_dir)
    assert isinstance(meta["vocab"], Vocab) and meta["vocab"] == Vocab.from_dict(VOCAB)
    assert json.loads((plan_dir / "plan.json").read_text())["vocab"] == VOCAB
    assert set(arrays) == set(mmtok.plan.PLAN_ARRAYS) == {p.stem for p in plan_dir.glob("*.npy")}
    assert mmtok.loader.read_plan is mmtok.plan.read_plan  # the loader reads plans through it


def test_a_corpus_closes_its_shard_files(plan_dir):
    """Every corpus opens its shards once; dropping it closes them (a harness that evaluates
    many times ran out of descriptors before)."""
    import gc
    import os

    from mmtok.loader import TokenCorpus
    from mmtok.plan import read_plan_meta

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    meta = read_plan_meta(plan_dir)
    sources = [plan_dir / s["path"] for s in meta["sources"]]
    before = open_fds()
    for _ in range(3):
        corpus = TokenCorpus(sources)
        for doc in range(min(len(corpus.n_tokens), 20)):
            corpus.read(doc)
        assert open_fds() > before  # the shards are held open while the corpus reads them
        del corpus
        gc.collect()
        assert open_fds() == before
