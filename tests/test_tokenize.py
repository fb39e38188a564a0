import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from helpers.media import TRICKY, draw_image, make_shards, sentences
from helpers.runs import cli

from mmtok.runner import StageError
from mmtok.shards import ShardReader, content_hash, load_npy
from mmtok.detokenize import detokenize
from mmtok.tokenize import Tokenizer, pair_image_first, tokenize, tokenize_images
from mmtok.tokenizer import image_alone
from mmtok.vocab import Vocab, VocabError

TPI = 64  # (16 / 2)^2 codes per image for the tiny VQ


@pytest.fixture(scope="module")
def tok(tokdir):
    return Tokenizer.load(tokdir, device="cpu")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("in")
    shared = draw_image(100)
    return make_shards(
        tmp / "in",
        texts=TRICKY[:5] + [b"bad \xff\xfe bytes"],
        images=[draw_image(200)],
        pairs=[(draw_image(300 + i), f"caption number {i}") for i in range(8)] + [(b"not an image", "broken")],
        docs=[["A doc starts. ", shared, " Middle text ", draw_image(101), " and the end."],
              [shared, "second doc reuses the image"]],
    )


def payload(sample) -> dict:
    """A read-back sample's members without its `json` metadata: what `sha256` covers."""
    return {e: b for e, b in sample.members.items() if e != "json"}


def blocks(ids, tok):
    """Check the image blocks of one sequence; return their number."""
    v, n, i, count = tok.vocab, TPI, 0, 0
    while i < len(ids):
        if ids[i] == tok.boi:
            assert v.is_image(ids[i + 1:i + 1 + n]).all() and ids[i + 1 + n] == tok.eoi
            i, count = i + n + 2, count + 1
        else:
            assert not v.is_image(ids[i]) and ids[i] != tok.eoi
            i += 1
    return count


def test_text_round_trip_in_unified_ids(tok):
    for text in TRICKY + sentences(10, seed=3):
        ids = tok.encode_text(text)
        assert ids.dtype == np.uint32
        assert all(tok.vocab.text_range[0] <= i < tok.vocab.text_range[1] for i in ids)
        assert tok.decode_text(ids) == text


def test_library_encode_decode_interleaved(tok):
    img = Image.open(io.BytesIO(draw_image(7)))
    ids = tok.encode(["before ", img, "after 🎉"])
    assert ids[-1] == tok.eod and blocks(ids, tok) == 1
    assert int(tok.vocab.is_image(ids).sum()) == TPI
    parts = tok.decode(ids)
    assert parts[0] == "before " and parts[2] == "after 🎉"
    assert parts[1].size == (16, 16)
    with pytest.raises(ValueError, match="malformed image block"):
        tok.split(ids[:10])


def test_pair_order_is_image_first_half_the_time():
    first = [pair_image_first(0, f"k{i}") for i in range(2000)]
    assert 0.45 < sum(first) / len(first) < 0.55
    assert first == [pair_image_first(0, f"k{i}") for i in range(2000)]  # deterministic
    assert first != [pair_image_first(1, f"k{i}") for i in range(2000)]  # and decided by the seed


def test_tokenize_shards(tok, inputs, tmp_path):
    summary, skipped = tokenize([inputs], tok, tmp_path / "tokens", seed=3, progress=False, max_error_rate=1.0)
    assert summary.samples == 6 + 8 + 2  # 5 good texts + 1 image + 8 pairs + 2 docs
    q = [json.loads(l) for l in (tmp_path / "tokens/quarantine.jsonl").read_text().splitlines()]
    reasons = {r["input"].rsplit(":", 1)[1]: r["reason"] for r in q}
    assert "UTF-8" in reasons["t0005"] and "does not decode" in reasons["p0008"] and len(q) == 2
    assert "0x" not in reasons["p0008"]  # no object address: a rerun writes the same quarantine log

    index = pq.read_table(tmp_path / "tokens/index.parquet").to_pylist()
    manifest = json.loads((tmp_path / "tokens/manifest.json").read_text())
    assert manifest["config"]["vocab"] == tok.vocab.to_dict()
    by_key = {r["key"]: r for r in index}
    orders = set()
    for s in ShardReader(tmp_path / "tokens"):
        ids, meta, row = load_npy(s.members["npy"]), s.meta, by_key[s.key]
        assert meta["sha256"] == row["sha256"] == content_hash(payload(s))
        assert ids.dtype == np.uint32 and ids.ndim == 1 and ids[-1] == tok.eod
        assert (ids < tok.vocab.vocab_size).all()
        n_img = int(tok.vocab.is_image(ids).sum())
        assert (meta["n_tokens"], meta["n_image"], meta["n_text"]) == (len(ids), n_img, len(ids) - n_img)
        assert (row["n_tokens"], row["n_image"], row["n_text"], row["source_key"]) == (len(ids), n_img, len(ids) - n_img, s.key)
        assert blocks(ids, tok) == meta["images"] and n_img == TPI * meta["images"]
        if meta["modality"] == "pair":
            first = ids[0] == tok.boi
            assert first == pair_image_first(3, s.key)
            orders.add(first)
        if meta["modality"] == "text":
            assert meta["images"] == 0
            assert tok.decode_text(ids) == TRICKY[int(s.key[1:])]
    assert orders == {True, False}  # both orders occur among 8 pairs
    docs = {s.key: s.meta for s in ShardReader(tmp_path / "tokens") if s.meta["modality"] == "doc"}
    assert docs["d0000"]["images"] == 2 and docs["d0001"]["images"] == 1


def test_tokenize_quarantines_missing_doc_image(tok, tmp_path):
    shards = make_shards(tmp_path / "in", docs=[["text", draw_image(1)]])
    for p in shards.glob("image-*.tar"):  # lose the image but keep the document
        p.write_bytes(b"\0" * 1024)
    import pyarrow as pa

    t = pq.read_table(shards / "index.parquet")
    pq.write_table(t.set_column(t.schema.get_field_index("sha256"), "sha256",
                                pa.array(["0" * 64] * len(t))), shards / "index.parquet")
    summary, _ = tokenize([shards], tok, tmp_path / "tokens", progress=False, max_error_rate=1.0)
    q = (tmp_path / "tokens/quarantine.jsonl").read_text()
    assert summary.samples == 0 and "not found" in q and "d0000" in q


def test_same_output_with_workers_and_with_precomputed_codes(tok, inputs, tmp_path):
    opts = dict(seed=3, progress=False, max_error_rate=1.0)
    tokenize([inputs], tok, tmp_path / "a", **opts)
    tokenize([inputs], tok, tmp_path / "b", workers=2, **opts)
    s = tokenize_images([inputs], tok, tmp_path / "codes", progress=False, max_error_rate=1.0)
    assert s.samples == 1 + 8 + 3 and s.quarantined == 1  # the image, good pairs, doc images; the broken pair
    images = {s.key: content_hash(image_alone(s.members)) for s in ShardReader(inputs) if image_alone(s.members)}
    for c in ShardReader(tmp_path / "codes"):
        codes = load_npy(c.members["npy"])
        assert codes.shape == (TPI,) and codes.max() < tok.vocab.n_image_codes
        assert c.meta["sha256"] == content_hash(payload(c))
        # one name for an image: a stand-alone (or document) image sample's sha256 is its image_sha256
        assert c.meta["image_sha256"] == images[c.key]
    tokenize([inputs], tok, tmp_path / "c", codes_dir=tmp_path / "codes", **opts)
    shards = [json.loads((tmp_path / d / "manifest.json").read_text())["shards"] for d in "abc"]
    assert shards[0] == shards[1] == shards[2]  # byte-identical shards
    # the codes' tokenizer without its VQ: named as that, not as "another tokenizer"
    no_vq = tmp_path / "no-vq"
    no_vq.mkdir()
    for f in Path(tok.source).iterdir():
        if f.is_file() and not f.name.startswith("vq."):
            (no_vq / f.name).write_bytes(f.read_bytes())
    with pytest.raises(VocabError, match="has no trained VQ"):
        tokenize([inputs], Tokenizer.load(no_vq), tmp_path / "d", codes_dir=tmp_path / "codes", **opts)


def test_uint8_pixels_give_the_codes_of_the_old_float_preprocessing(tok):
    from helpers.media import old_load_image

    from mmtok.vq import to_unit

    images = [draw_image(i, size=s) for i, s in enumerate((20, 24, 31))] + [draw_image(3, size=30, mode="RGBA")]
    pixels = np.stack([tok.preprocess(b) for b in images])  # sources under 2 x 16: the exact old resize
    floats = np.stack([old_load_image(b, tok.resolution) for b in images])
    assert pixels.dtype == np.uint8
    # numpy and torch each scale here, so compare within far less than one grey level (1/127.5)
    torch.testing.assert_close(to_unit(torch.from_numpy(pixels)), torch.from_numpy(floats), atol=1e-6, rtol=0)
    codes = tok.encode_images(pixels, batch_size=3)
    assert np.array_equal(codes, tok.vq.encode(torch.from_numpy(floats)).numpy())
    assert np.array_equal(codes, tok.encode_images(floats, batch_size=3))  # floats in [-1, 1] still work
    assert np.array_equal(codes, tok.encode_images(images))  # and encoded bytes


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_big_jpegs_same_codes_everywhere_and_bombs_quarantined(tok, tmp_path):
    from helpers.media import bomb_png

    big = draw_image(5, size=80, fmt="JPEG")  # short side 80 >= 2 x 16: libjpeg decodes it at 1/4 scale
    shards = make_shards(tmp_path / "in", images=[big, draw_image(6), bomb_png()])
    opts = dict(progress=False, max_error_rate=1.0)
    codes = {}
    for workers in (1, 2):
        out = tmp_path / f"codes{workers}"
        s = tokenize_images([shards], tok, out, workers=workers, **opts)
        assert (s.samples, s.quarantined) == (2, 1)
        q = json.loads((out / "quarantine.jsonl").read_text())
        assert q["input"].endswith(":i0002") and "decompression bomb" in q["reason"]
        codes[workers] = {c.key: load_npy(c.members["npy"]) for c in ShardReader(out)}
    assert codes[1].keys() == codes[2].keys() == {"i0000", "i0001"}
    assert all(np.array_equal(codes[1][k], codes[2][k]) for k in codes[1])
    assert np.array_equal(codes[1]["i0000"], tok.encode_images([big])[0])
    summary, _ = tokenize([shards], tok, tmp_path / "tokens", **opts)
    assert (summary.samples, summary.quarantined) == (2, 1)
    for s in ShardReader(tmp_path / "tokens"):
        ids = load_npy(s.members["npy"])
        assert np.array_equal(ids[1:1 + TPI] - tok.vocab.image_range[0], codes[1][s.key])


def test_detokenize_reproduces_text_and_images(tok, inputs, tmp_path):
    tokenize([inputs], tok, tmp_path / "tokens", seed=3, progress=False, max_error_rate=1.0)
    info = detokenize(tmp_path / "tokens", tok, tmp_path / "out", progress=False)
    assert info["documents"] == 16 and info["images"] == 1 + 8 + 3 and info["skipped"] == 0
    for i, text in enumerate(TRICKY[:5]):
        assert (tmp_path / f"out/t{i:04d}.txt").read_bytes() == text.encode()
    assert (tmp_path / "out/p0002.txt").read_text() == "caption number 2"
    doc = json.loads((tmp_path / "out/d0000.json").read_text())["segments"]
    assert [list(s) for s in doc] == [["text"], ["image"], ["text"], ["image"], ["text"]]
    assert doc[2]["text"] == " Middle text "
    assert Image.open(tmp_path / "out" / doc[1]["image"]).size == (16, 16)


def _files(d):  # not the lock file: every run writes its pid there
    return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(d.iterdir())
            if p.name != ".mmtok.lock"}


def test_detokenize_resumes_and_redoes_interrupted_documents(tok, inputs, tmp_path):
    tokenize([inputs], tok, tmp_path / "tokens", seed=3, progress=False, max_error_rate=1.0)
    out = tmp_path / "out"
    detokenize(tmp_path / "tokens", tok, out)  # with the progress bar
    first = _files(out)
    assert "detokenize.json" in first and not [n for n in first if ".tmp-" in n]

    info = detokenize(tmp_path / "tokens", tok, out, progress=False)
    assert (info["documents"], info["skipped"], info["images"]) == (0, 16, 0)
    assert _files(out) == first  # nothing rewritten: same bytes, inodes and mtimes

    # a run killed inside d0000: its .json not yet written, its .txt half written, a temp file left
    (out / "d0000.json").unlink()
    (out / "d0000.txt").write_bytes(first["d0000.txt"][0][:5])
    (out / ".d0000-1.png.tmp-999").write_bytes(b"half")
    info = detokenize(tmp_path / "tokens", tok, out, progress=False)
    assert (info["documents"], info["skipped"], info["images"]) == (1, 15, 2)
    again = _files(out)
    assert {n: v[0] for n, v in again.items()} == {n: v[0] for n, v in first.items()}
    redone = {n for n in first if first[n][1:] != again[n][1:]}
    assert redone == {"d0000.json", "d0000.txt", "d0000-0.png", "d0000-1.png"}

    r = cli("detokenize", tmp_path / "tokens", "--tokenizer", tok.dir, "--out", out, "--overwrite", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == {"out": str(out), "documents": 16, "images": 12, "skipped": 0}
    after = _files(out)
    assert {n: v[0] for n, v in after.items()} == {n: v[0] for n, v in first.items()}
    assert all(after[n][1:] != again[n][1:] for n in after  # every document written again
               if n not in ("detokenize.json", "detokenize-files.jsonl"))


def test_detokenize_refuses_output_of_other_tokens_or_tokenizer(tok, tokdir, inputs, tmp_path):
    from safetensors.torch import load_file, save_file

    tokenize([inputs], tok, tmp_path / "tokens", seed=3, progress=False, max_error_rate=1.0)
    tokenize([inputs], tok, tmp_path / "tokens4", seed=4, progress=False, max_error_rate=1.0)
    out = tmp_path / "out"
    detokenize(tmp_path / "tokens", tok, out, limit=3, progress=False)
    with pytest.raises(StageError, match="made from other tokens .*--overwrite"):
        detokenize(tmp_path / "tokens4", tok, out, progress=False)

    other = tmp_path / "othertok"  # same vocabulary, another VQ decoder
    other.mkdir()
    for p in tokdir.iterdir():
        if p.is_file():
            (other / p.name).write_bytes(p.read_bytes())
    weights = load_file(other / "vq.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, other / "vq.safetensors")
    r = cli("detokenize", tmp_path / "tokens", "--tokenizer", other, "--out", out)
    assert r.exit_code == 2 and "another tokenizer" in r.output and "Traceback" not in r.output
    keys = [s.key for s in ShardReader(tmp_path / "tokens4")]
    assert sorted(p.name for p in out.glob("*.json")) == sorted(["detokenize.json"] + [f"{k}.json" for k in keys[:3]])

    # --overwrite clears the other job's documents and starts again
    r = cli("detokenize", tmp_path / "tokens4", "--tokenizer", tokdir, "--out", out, "--limit", 1,
                "--overwrite", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["documents"] == 1, r.output
    detokenize(tmp_path / "tokens4", tok, tmp_path / "fresh", limit=1, progress=False)
    assert {n: v[0] for n, v in _files(out).items()} == {n: v[0] for n, v in _files(tmp_path / "fresh").items()}


def test_wrong_or_missing_tokenizer(tok, tokdir, inputs, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.load(tmp_path / "nope")
    tokenize([inputs], tok, tmp_path / "tokens", progress=False, max_error_rate=1.0)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("bpe.model", "vq.json", "vq.safetensors"):
        (other / name).write_bytes((tokdir / name).read_bytes())
    bigger = Vocab.layout(2000 + 16, 80, TPI)  # same text pieces, another image range
    bigger.save(other)
    with pytest.raises(VocabError, match="does not match"):
        Tokenizer.load(other).vq
    with pytest.raises(VocabError, match="different vocabulary"):
        detokenize(tmp_path / "tokens", Tokenizer.load(other), tmp_path / "out")
    Vocab.layout(3000, 64, TPI).save(other)  # text range no longer matches bpe.model
    with pytest.raises(VocabError, match="different vocabularies"):
        Tokenizer.load(other)
    (other / "vq.safetensors").write_bytes(b"truncated")
    Vocab.layout(2000, 64, TPI).save(other)
    with pytest.raises(ValueError, match="unreadable VQ"):
        Tokenizer.load(other).vq
    (other / "bpe.model").write_bytes(b"garbage")
    with pytest.raises(VocabError, match="not a SentencePiece model"):
        Tokenizer.load(other)


def test_cli_errors_are_clear(tmp_path, inputs, tokdir):
    r = cli("tokenize", inputs, "--tokenizer", tmp_path / "missing", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "tokenizer directory not found" in r.output and "Traceback" not in r.output
    r = cli("detokenize", inputs, "--tokenizer", tokdir, "--out", tmp_path / "o")
    assert r.exit_code == 2 and "not a `mmtok tokenize` output" in r.output
    r = cli("train-vq", inputs, "--out", tmp_path / "vq", "--steps", 1, "--downsample", 3)
    assert r.exit_code == 2 and "power of two" in r.output


@pytest.mark.slow
def test_cli_end_to_end_from_mmtok_shard(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [{"text": t} for t in sentences(1500)]
    for i in range(12):
        (raw / f"img{i}.png").write_bytes(draw_image(i))
        rows.append({"image": f"img{i}.png", "caption": f"shapes number {i}"})
    rows.append({"segments": [{"text": "Look: "}, {"image": "img0.png"}, {"text": " done."}]})
    (raw / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("shard", raw / "corpus.jsonl", "--out", tmp_path / "shards", "--quiet").exit_code == 0

    tok = tmp_path / "tok"
    r = cli("train-bpe", tmp_path / "shards", "--out", tok, "--vocab-size", 2000, "--image-codes", 64, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["vocab"]["image_range"] == [1936, 2000]
    r = cli("train-vq", tmp_path / "shards", "--out", tok, "--steps", 4, "--codebook-size", 64, "--resolution", 16,
                "--downsample", 2, "--channels", 8, "--res-blocks", 1, "--batch-size", 4, "--log-every", 2, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["step"] == 4 and Vocab.load(tok).image_tokens_per_image == 64
    r = cli("tokenize-images", tmp_path / "shards", "--tokenizer", tok, "--out", tmp_path / "codes", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["samples"] == 13, r.output
    r = cli("tokenize", tmp_path / "shards", "--tokenizer", tok, "--codes", tmp_path / "codes",
                "--out", tmp_path / "tokens", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["by_modality"] == {"doc": 1, "pair": 12, "text": 1500}
    r = cli("detokenize", tmp_path / "tokens", "--tokenizer", tok, "--out", tmp_path / "dec", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout) == {"out": str(tmp_path / "dec"), "documents": 1513, "images": 13,
                                                         "skipped": 0}
    first = sorted((tmp_path / "dec").glob("*.txt"))[0].read_text()
    assert first == rows[0]["text"]


def _shard_dir(raw, out):
    """A shard directory written by the `shard` stage itself (its index has image_sha256)."""
    from mmtok.ingest import ShardFn, shard_items
    from mmtok.runner import run_stage

    run_stage("shard", shard_items([str(raw)]), ShardFn(), out, config={"inputs": [str(raw)]}, progress=False,
               max_count=4, threads=True)
    return out


def _tree(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name not in ("_stage.json", ".mmtok.lock")}


def test_image_hash_in_index_joins_without_streaming_and_old_dirs_still_read(tok, tmp_path, monkeypatch):
    import shutil

    import pyarrow.parquet as pq

    import mmtok.tokenize

    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [{"text": f"plain text number {i}"} for i in range(6)]
    for i in range(5):
        (raw / f"im{i}.png").write_bytes(draw_image(500 + i))
        rows.append({"image": f"im{i}.png", "caption": f"caption {i}"})
    rows.append({"segments": [{"text": "doc "}, {"image": "im0.png"}, {"text": " end"}]})
    (raw / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    new = _shard_dir(raw / "c.jsonl", tmp_path / "new")
    index = pq.read_table(new / "index.parquet")
    by_group = {}
    for r in index.to_pylist():
        by_group.setdefault(r["group"].split("-")[0], set()).add(r["image_sha256"])
    assert by_group["text"] == {None} and by_group["doc"] == {None}
    pairs = [r for r in index.to_pylist() if r["group"].startswith("pair-")]
    reader = ShardReader(new)
    for r in pairs:  # the image's own hash, not the pair's
        m = next(m for m in r["members"] if m["ext"] == "png")
        assert r["image_sha256"] == content_hash({"png": reader.read_member(r["shard"], m["offset"], m["size"])})
        assert r["image_sha256"] != r["sha256"]
    old = tmp_path / "old"  # the same shards, indexed as before the column existed
    shutil.copytree(new, old)
    pq.write_table(index.drop(["image_sha256"]), old / "index.parquet")

    def outputs(src, tag):
        tokenize_images([src], tok, tmp_path / f"codes-{tag}", progress=False, batch_size=3)
        tokenize([src], tok, tmp_path / f"tok-{tag}", progress=False, batch_size=3)
        tokenize([src], tok, tmp_path / f"tokc-{tag}", codes_dir=tmp_path / f"codes-{tag}", progress=False)
        return [_tree(tmp_path / f"{k}-{tag}") for k in ("codes", "tok", "tokc")]

    want = outputs(old, "old")  # streamed, images hashed
    real_iter_tar = mmtok.tokenize.iter_tar
    monkeypatch.setattr(mmtok.tokenize, "iter_tar", lambda *a, **k: pytest.fail("streamed a tar"))
    got = outputs(new, "new")  # by index, no tar streamed
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for name in w:
            if name.endswith(".tar") or name.endswith("quarantine.jsonl"):
                assert w[name] == g[name], name
    monkeypatch.setattr(mmtok.tokenize, "iter_tar", real_iter_tar)
    # --codes with the column: a pair's image bytes are never read (its codes are known)
    reads = []
    real_read = ShardReader.read_member
    monkeypatch.setattr(ShardReader, "read_member",
                        lambda self, shard, o, n: reads.append((shard, n)) or real_read(self, shard, o, n))
    tokenize([new], tok, tmp_path / "tokc-again", codes_dir=tmp_path / "codes-new", progress=False)
    assert _tree(tmp_path / "tokc-again")["tokens-000000.tar"] == got[2]["tokens-000000.tar"]
    captions = sorted(next(m["size"] for m in r["members"] if m["ext"] == "txt") for r in pairs)
    assert sorted(n for shard, n in reads if shard.startswith("pair-")) == captions
