"""balance-mix planner: properties on random corpora (hypothesis) and exact checks."""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.tokens import make_doc, make_token_shards, make_vocab
from mmtok.loader import TokenCorpus
from mmtok.mix import parse_ratio, plan_mix, write_plan
from mmtok.plan import parse_layout

VOCAB = make_vocab(image_tokens_per_image=16)
IMG_LO, IMG_HI = VOCAB["image_range"]
BOI, EOI = VOCAB["specials"]["<boi>"], VOCAB["specials"]["<eoi>"]


def random_corpus(seed: int, n_text: int, n_image: int, max_text: int = 120) -> tuple[list, list]:
    """Text documents of random length; image documents: pairs (either order) and
    interleaved documents with up to 3 blocks and short texts between them."""
    rng = np.random.default_rng(seed)
    text = [make_doc(rng, VOCAB, [int(rng.integers(1, max_text))]) for _ in range(n_text)]
    image = []
    for _ in range(n_image):
        kind = rng.integers(3)
        segs = (["img", int(rng.integers(1, 4))] if kind == 0 else [int(rng.integers(1, 4)), "img"] if kind == 1
                else ["img", int(rng.integers(1, 3)), "img", int(rng.integers(1, 3)), "img"])
        image.append(make_doc(rng, VOCAB, segs))
    return text, image


def tokens_of(corpus: TokenCorpus, arrays: dict) -> list[list[np.ndarray]]:
    """Per micro-batch, the list of piece token arrays (read independently of the loader)."""
    out = []
    for m in range(len(arrays["mb_ptr"]) - 1):
        p0, p1 = arrays["mb_ptr"][m], arrays["mb_ptr"][m + 1]
        out.append([(int(arrays["piece_seq"][p]), corpus.read(int(arrays["piece_doc"][p]))[
            arrays["piece_start"][p]:arrays["piece_start"][p] + arrays["piece_len"][p]]) for p in range(p0, p1)])
    return out


def check_plan(corpus: TokenCorpus, plan, ratio, seq_len, micro_batch, tol=0.02):
    a = plan.arrays
    rho = ratio[0] / ratio[1]
    for m, pieces in enumerate(tokens_of(corpus, a)):
        fill = defaultdict(int)
        n_img = n_txt = 0
        for s, toks in pieces:
            fill[s] += len(toks)
            # an image block is never split: the piece is balanced in <boi>/<eoi>, never inside a block
            depth = np.cumsum((toks == BOI).astype(int) - (toks == EOI))
            assert depth.min() >= 0 and depth[-1] == 0, "image block split"
            img = int(((toks >= IMG_LO) & (toks < IMG_HI)).sum())
            n_img, n_txt = n_img + img, n_txt + len(toks) - img
        assert all(0 <= s < micro_batch for s in fill) and max(fill.values()) <= seq_len
        assert n_img == a["mb_image"][m] and n_txt == a["mb_text"][m]
        assert n_img > 0 and abs(n_txt / n_img / rho - 1) <= tol, (m, n_txt, n_img)
    assert plan.report["off_target_microbatches"] == 0
    assert plan.report["max_ratio_deviation"] <= tol


def check_coverage(corpus: TokenCorpus, arrays: dict):
    """Every document's pieces, micro-batch after micro-batch, tile it from 0 to its end,
    again and again; within a pool of a source no document starts its k+1-th pass before
    every other one has started its k-th (no loss or duplicate within an epoch). Inside a
    micro-batch pieces may sit in any sequence, so each is looked up by where it starts."""
    pos, passes = {}, defaultdict(int)
    ptr = arrays["mb_ptr"]
    for m in range(len(ptr) - 1):
        sl = slice(ptr[m], ptr[m + 1])
        by_doc = defaultdict(list)
        for d, s, n in zip(arrays["piece_doc"][sl].tolist(), arrays["piece_start"][sl].tolist(),
                           arrays["piece_len"][sl].tolist()):
            by_doc[d].append((s, n))
        for d, pieces in by_doc.items():
            while pieces:
                expect = pos.get(d, 0)
                hit = [p for p in pieces if p[0] == expect]
                assert hit, f"document {d}: micro-batch {m} has pieces {pieces}, none starting at {expect}"
                pieces.remove(hit[0])
                passes[d] += expect == 0
                pos[d] = (expect + hit[0][1]) % int(corpus.n_tokens[d])
    for src, pool in itertools.product(range(len(corpus.dirs)), (True, False)):
        docs = np.flatnonzero((corpus.source == src) & ((corpus.n_image > 0) == pool))
        counts = [passes[d] for d in docs.tolist()]
        if counts and max(counts) > 1:
            assert min(counts) >= max(counts) - 1, "a document repeated before the epoch ended"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n_text=st.integers(5, 40), n_image=st.integers(3, 30),
       world=st.integers(1, 3), micro_batch=st.integers(1, 3), seq_len=st.sampled_from([48, 64, 100]),
       ratio=st.sampled_from([(1, 1), (1, 2), (2, 1), (3, 1)]), steps=st.integers(1, 6))
def test_plan_properties_on_random_corpora(tmp_path_factory, seed, n_text, n_image, world, micro_batch, seq_len,
                                           ratio, steps):
    rho = ratio[0] / ratio[1]
    # room for the largest image document and its text (raised, not filtered: filtering made
    # hypothesis fail its filter_too_much health check now and then)
    micro_batch = max(micro_batch, math.ceil((60 + 48 * (1 + rho)) / seq_len))
    tmp = tmp_path_factory.mktemp("c")
    text, image = random_corpus(seed, n_text, n_image)
    dirs = [make_token_shards(tmp, text, VOCAB, "text"), make_token_shards(tmp, image, VOCAB, "image")]
    corpus = TokenCorpus(dirs)
    plan = plan_mix(dirs, out=tmp / "plan", ratio=ratio, world_size=world, seq_len=seq_len, micro_batch=micro_batch,
                    steps=steps, seed=seed)
    assert len(plan.arrays["mb_text"]) == world * steps
    check_plan(corpus, plan, ratio, seq_len, micro_batch)
    check_coverage(corpus, plan.arrays)
    # a longer plan at another world size begins with the same micro-batches
    longer = plan_mix(dirs, out=tmp / "plan", ratio=ratio, world_size=world + 1, seq_len=seq_len,
                      micro_batch=micro_batch, steps=steps + 1, seed=seed)
    n = plan.arrays["mb_ptr"][-1]
    for k in ("piece_doc", "piece_start", "piece_len", "piece_seq"):
        assert np.array_equal(longer.arrays[k][:n], plan.arrays[k])
    assert plan.meta["order_sha256"] == longer.meta["order_sha256"]


def test_plan_is_deterministic_and_seed_dependent(tmp_path):
    text, image = random_corpus(3, 40, 30)
    dirs = [make_token_shards(tmp_path, text, VOCAB, "text"), make_token_shards(tmp_path, image, VOCAB, "image")]
    kw = dict(ratio=(1, 1), world_size=2, seq_len=64, micro_batch=2, steps=8)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_plan(plan_mix(dirs, out=tmp_path / name, seed=seed, **kw), tmp_path / name)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "plan.json" in files and "piece_doc.npy" in files
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "piece_doc.npy").read_bytes() != (tmp_path / "c" / "piece_doc.npy").read_bytes()


def test_long_interleaved_documents_are_cut_between_image_blocks(tmp_path):
    rng = np.random.default_rng(0)
    long_docs = [make_doc(rng, VOCAB, [2, "img", 3, "img", 1, "img", 2, "img", 1]) for _ in range(6)]  # 82 tokens
    text = [make_doc(rng, VOCAB, [int(rng.integers(20, 200))]) for _ in range(30)]
    dirs = [make_token_shards(tmp_path, text, VOCAB, "text"), make_token_shards(tmp_path, long_docs, VOCAB, "docs")]
    corpus = TokenCorpus(dirs)
    plan = plan_mix(dirs, out=tmp_path / "p", ratio=(1, 1), world_size=2, seq_len=48, micro_batch=2, steps=5, seed=1)
    check_plan(corpus, plan, (1, 1), 48, 2)
    check_coverage(corpus, plan.arrays)
    a = plan.arrays
    long_ids = set(range(corpus.first_doc[1], corpus.first_doc[2]))
    starts = [s for d, s in zip(a["piece_doc"].tolist(), a["piece_start"].tolist()) if d in long_ids]
    assert any(s > 0 for s in starts), "documents longer than seq_len must be cut"
    # text documents longer than a sequence are split too
    assert any(n > 0 and s > 0 for d, s, n in zip(a["piece_doc"], a["piece_start"], a["piece_len"]) if d < corpus.first_doc[1])


def test_an_atom_that_first_fit_cannot_place_opens_the_next_micro_batch(tmp_path):
    # 38-token image documents (32 codes): three fit a micro-batch's budget (2 x 64 tokens with
    # the text a 1:3 ratio asks for), but only one fits each sequence, so first fit stops at two
    rng = np.random.default_rng(0)
    image = [make_doc(rng, VOCAB, ["img", "img", 1]) for _ in range(8)]
    text = [make_doc(rng, VOCAB, [int(rng.integers(5, 40))]) for _ in range(30)]
    dirs = [make_token_shards(tmp_path, text, VOCAB, "text"), make_token_shards(tmp_path, image, VOCAB, "image")]
    corpus = TokenCorpus(dirs)
    plan = plan_mix(dirs, out=tmp_path / "p", ratio=(1, 3), world_size=2, seq_len=64, micro_batch=2, steps=6, seed=4)
    check_plan(corpus, plan, (1, 3), 64, 2)
    check_coverage(corpus, plan.arrays)
    a = plan.arrays
    image_ids = set(range(corpus.first_doc[1], corpus.first_doc[2]))
    ptr = a["mb_ptr"]
    per_mb = [sum(d in image_ids for d in a["piece_doc"][ptr[m]:ptr[m + 1]].tolist()) for m in range(12)]
    assert per_mb == [2] * 12
    # 24 atoms are exactly three epochs of the 8 image documents: none skipped, none repeated early
    uses = defaultdict(int)
    for d in a["piece_doc"].tolist():
        uses[d] += d in image_ids
    assert sorted(uses[d] for d in image_ids) == [3] * 8


def test_text_heavy_interleaved_documents_are_reported(tmp_path):
    rng = np.random.default_rng(0)
    docs = [make_doc(rng, VOCAB, [40, "img", 40]) for _ in range(10)]
    text = [make_doc(rng, VOCAB, [30]) for _ in range(10)]
    dirs = [make_token_shards(tmp_path, docs, VOCAB, "docs"), make_token_shards(tmp_path, text, VOCAB, "text")]
    plan = plan_mix(dirs, out=tmp_path / "p", ratio=(1, 1), world_size=1, seq_len=128, micro_batch=1, steps=3)
    assert plan.report["off_target_microbatches"] == 3 and plan.report["max_ratio_deviation"] > 0.02
    assert "more text than the ratio allows" in plan.report["notes"][0]


def test_an_image_block_longer_than_seq_len_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    d = make_token_shards(tmp_path, [make_doc(rng, VOCAB, ["img", 3])], VOCAB, "img")
    block = VOCAB["image_tokens_per_image"] + 2  # <boi>, the codes, <eoi>
    with pytest.raises(ValueError, match=f"image block longer than --seq-len 12; raise --seq-len to at least {block}$"):
        plan_mix([d], out=tmp_path / "p", ratio=(1, 1), world_size=1, seq_len=12, micro_batch=2, steps=1)


def test_source_shares_follow_weights_and_epochs_are_counted(tmp_path):
    # two sources from one recipe (so any weights agree with the ratio) and a text-only one
    dirs = []
    for i, name in enumerate(("a", "b")):
        text, image = random_corpus(100 + i, 60, 40, max_text=60)
        dirs.append(make_token_shards(tmp_path, text + image, VOCAB, name))
    plan = plan_mix(dirs, out=tmp_path / "p", ratio=(1, 1), world_size=4, seq_len=128, micro_batch=2, steps=40,
                    seed=2, weights=[0.3, 0.7])
    r = plan.report
    shares = list(r["source_shares"].values())
    assert abs(shares[0] - 0.3) <= 0.01 and abs(shares[1] - 0.7) <= 0.01, shares
    corpus = TokenCorpus(dirs)
    # epochs: tokens used per source and pool over what the source holds (the pool used most)
    a = plan.arrays
    used = np.zeros((2, 2))
    for d, n in zip(a["piece_doc"].tolist(), a["piece_len"].tolist()):
        used[int(corpus.source[d]), int(corpus.n_image[d] > 0)] += n
    for s in range(2):
        held = [corpus.n_tokens[(corpus.source == s) & ((corpus.n_image > 0) == p)].sum() for p in (0, 1)]
        expect = max(used[s, 0] / held[0], used[s, 1] / held[1])
        assert list(r["epochs"].values())[s] == pytest.approx(expect)
    assert max(r["epochs"].values()) > 1  # this plan needs more than one pass over a source
    check_coverage(corpus, a)


def test_report_says_where_the_corpus_cannot_hold_the_ratio(tmp_path):
    rng = np.random.default_rng(0)
    text_only = make_token_shards(tmp_path, [make_doc(rng, VOCAB, [50]) for _ in range(20)], VOCAB, "t")
    plan = plan_mix([text_only], out=tmp_path / "p", ratio=(1, 1), world_size=2, seq_len=64, micro_batch=1, steps=3)
    assert plan.report["off_target_microbatches"] == 6
    assert plan.report["max_ratio_deviation"] is None
    assert "no image tokens" in plan.report["notes"][0]
    assert plan.report["padding_fraction"] == 0.0  # text alone still packs full sequences


def test_ratio_parsing():
    assert parse_ratio("3:1") == (3, 1) and parse_layout("4t4i") == (4, 4) and parse_layout("2t6i") == (2, 6)
    for bad in ("1", "1:0", "a:b"):
        with pytest.raises(ValueError, match="--ratio"):
            parse_ratio(bad)
    with pytest.raises(ValueError, match="--experts"):
        parse_layout("4x4", "--experts")


def test_bad_inputs_name_the_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="empty: no manifest.json"):
        plan_mix([tmp_path / "empty"], out=tmp_path / "p", ratio=(1, 1), world_size=1, seq_len=8, micro_batch=1, steps=1)
    rng = np.random.default_rng(0)
    d = make_token_shards(tmp_path, [make_doc(rng, VOCAB, [5])], VOCAB, "t")
    with pytest.raises(ValueError, match="--weights"):
        plan_mix([d], out=tmp_path / "p", ratio=(1, 1), world_size=1, seq_len=8, micro_batch=1, steps=1, weights=[1, 2])


def test_plan_paths_are_relative_to_the_plan(tmp_path):
    text, image = random_corpus(1, 10, 10)
    dirs = [make_token_shards(tmp_path / "data", text, VOCAB, "t"), make_token_shards(tmp_path / "data", image, VOCAB, "i")]
    plan = plan_mix(dirs, out=tmp_path / "plans" / "p", ratio=(1, 1), world_size=1, seq_len=64, micro_batch=1, steps=2)
    assert [s["path"] for s in plan.meta["sources"]] == ["../../data/t", "../../data/i"]
    assert Path(tmp_path / "plans" / "p" / plan.meta["sources"][0]["path"]).resolve() == dirs[0].resolve()


def test_cli_balance_mix_json_table_plot_and_errors(tmp_path):
    from typer.testing import CliRunner

    from mmtok.cli.app import app

    text, image = random_corpus(5, 30, 20)
    t, i = make_token_shards(tmp_path, text, VOCAB, "text"), make_token_shards(tmp_path, image, VOCAB, "image")
    args = ["balance-mix", str(t), str(i), "--world-size", "2", "--seq-len", "64", "--micro-batch", "2",
            "--steps", "5", "--experts", "4t4i", "--seed", "1"]
    res = CliRunner().invoke(app, args + ["--out", str(tmp_path / "p"), "--json", "--plot", str(tmp_path / "mix.png")])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["max_ratio_deviation"] <= 0.02 and r["microbatches"] == 10 and 0 <= r["padding_fraction"] < 0.2
    assert set(r["source_shares"]) == {str(t), str(i)} and set(r["epochs"]) == {str(t), str(i)}
    assert (tmp_path / "mix.png").read_bytes()[:4] == b"\x89PNG"
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "p"), "--json"])  # what the plan holds, later
    assert res.exit_code == 0, res.output
    seen = json.loads(res.stdout)
    assert (seen["world_size"], seen["steps"], seen["microbatches"], seen["ratio"]) == (2, 5, 10, [4, 4])
    assert seen["report"] == r and set(seen["sources"]) == {str(t), str(i)}
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "p")])
    assert res.exit_code == 0 and "balance-mix" in res.output and "world_size" in res.output, res.output
    # --tokens: enough steps for the tokens; the table goes to stderr
    res = CliRunner().invoke(app, args[:9] + ["--tokens", "1000", "--ratio", "1:1", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "q" / "plan.json").read_text())["steps"] == 4  # ceil(1000 / (2*2*64))
    assert "max deviation" in res.output
    for bad, msg in ((["--ratio", "1:0"], "--ratio"), (["--ratio", "1:1", "--experts", "4t4i"], "exactly one"),
                     (["--experts", "4t4i", "--weights", "1,x"], "--weights")):
        res = CliRunner().invoke(app, ["balance-mix", str(t), "--out", str(tmp_path / "z"), "--world-size", "1",
                                       "--micro-batch", "1", "--steps", "1"] + bad)
        assert res.exit_code == 2 and msg in res.output, res.output
    res = CliRunner().invoke(app, ["balance-mix", str(tmp_path / "nope"), "--out", str(tmp_path / "z"),
                                   "--world-size", "1", "--micro-batch", "1", "--steps", "1", "--ratio", "1:1"])
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output


def test_balance_mix_is_the_commands_library_call(tmp_path):
    """mmtok.balance_mix plans and writes what plan_mix + write_plan do; --tokens becomes steps,
    --experts a ratio; conflicting targets are refused."""
    import mmtok

    text, image = random_corpus(5, 30, 20)
    dirs = [make_token_shards(tmp_path, text, VOCAB, "text"), make_token_shards(tmp_path, image, VOCAB, "image")]
    plan = mmtok.balance_mix(dirs, tmp_path / "a", world_size=2, micro_batch=2, seq_len=64, tokens=2 * 2 * 64 * 3 + 1,
                             experts="1t1i")
    assert plan.meta["steps"] == 4 and plan.meta["ratio"] == [1, 1]
    write_plan(plan_mix(dirs, out=tmp_path / "b", ratio=(1, 1), world_size=2, seq_len=64, micro_batch=2, steps=4),
               tmp_path / "b")
    for f in sorted((tmp_path / "b").iterdir()):
        assert (tmp_path / "a" / f.name).read_bytes() == f.read_bytes(), f.name
    with pytest.raises(ValueError, match="not both"):
        mmtok.balance_mix(dirs, tmp_path / "c", world_size=1, micro_batch=1, seq_len=64, steps=1, ratio="1:1",
                          experts="1t1i")
    with pytest.raises(ValueError, match="--steps or --tokens"):
        mmtok.balance_mix(dirs, tmp_path / "c", world_size=1, micro_batch=1, seq_len=64, ratio="1:1")


def test_inspect_of_a_plan_counts_each_sources_held_out_documents(tmp_path):
    """A source's `documents` counts all of its documents (document numbers count from it);
    `held_out` says how many the plan leaves out, as PLAN/holdout/ holds them."""
    import json

    from helpers.runs import cli, make_plan

    data = make_plan(tmp_path / "d")
    plan = tmp_path / "held"
    r = cli("balance-mix", data["text"], data["pairs"], "--out", plan, "--ratio", "1:2", "--world-size", 1,
            "--seq-len", 64, "--micro-batch", 4, "--steps", 20, "--holdout", 0.2, "--json")
    assert r.exit_code == 0, r.output
    sources = json.loads(cli("inspect", plan, "--json").stdout)["sources"]
    meta = json.loads((plan / "plan.json").read_text())
    for src, held in zip(meta["sources"], meta["holdout"]["sources"]):
        assert sources[src["name"]]["documents"] == src["documents"]
        assert sources[src["name"]]["held_out"] == held["documents"] > 0
    plain = json.loads(cli("inspect", data["plan"], "--json").stdout)["sources"]
    assert all("held_out" not in s for s in plain.values())

