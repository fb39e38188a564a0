import json

import pytest
import sentencepiece as spm

from mmtok.bpe import train_bpe
from mmtok.vocab import Vocab
from helpers.media import TRICKY, draw_image, make_shards, sentences

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    texts = sentences()
    docs = [["intro text of the doc", draw_image(1), "closing words of the doc"]]
    pairs = [(draw_image(2), "a caption about shapes")]
    shards = make_shards(tmp / "in", texts=texts + [b"\xff\xfe not utf8"], pairs=pairs, docs=docs)
    logs = []
    info = train_bpe([shards], tmp / "tok", vocab_size=2000, image_codes=64, image_tokens_per_image=16,
                     log=logs.append)
    return tmp / "tok", info, logs


def test_layout_and_stock_loader(trained):
    tok, info, logs = trained
    v = Vocab.load(tok)
    assert v.vocab_size == 2000 and v.image_range == (1936, 2000) and v.image_tokens_per_image == 16
    sp = spm.SentencePieceProcessor(model_file=str(tok / "bpe.model"))  # stock sentencepiece loads it
    assert sp.get_piece_size() == v.n_text
    assert info["not_utf8"] == 1 and any("not UTF-8" in l for l in logs)
    assert info["texts"] == 1500 + 1 + 2  # texts, the caption, two doc text segments
    assert any("estimated peak memory" in l for l in logs)


def test_text_round_trip_exact(trained):
    tok, _, _ = trained
    sp = spm.SentencePieceProcessor(model_file=str(tok / "bpe.model"))
    for text in TRICKY + sentences(20, seed=5):
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert all(0 <= i < sp.get_piece_size() for i in ids)
    assert sp.unk_id() not in sp.encode("\U0001f600 \u0378 unassigned")


def test_digits_split_and_merges_learned(trained):
    tok, _, _ = trained
    sp = spm.SentencePieceProcessor(model_file=str(tok / "bpe.model"))
    assert sp.encode("424242", out_type=str) == ["4", "2"] * 3  # "42" is frequent, yet never merged
    line = sentences(1, seed=0)[0]
    assert len(sp.encode(line)) < len(line.encode()) / 2  # real merges, not bytes


def test_sampling_is_deterministic(trained, tmp_path):
    tok, _, _ = trained
    shards = make_shards(tmp_path / "in", texts=sentences(1500))
    a = train_bpe([shards], tmp_path / "a", vocab_size=2000, image_codes=64, input_sentence_size=1000, log=lambda m: None)
    b = train_bpe([shards], tmp_path / "b", vocab_size=2000, image_codes=64, input_sentence_size=1000, log=lambda m: None)
    assert a["sampled_lines"] == b["sampled_lines"] == 1000
    # the same bytes, not only the same pieces: the tokenizer's fingerprint (in every manifest
    # and run downstream) hashes bpe.model, so no run-specific path may be recorded in it
    for name in ("bpe.model", "bpe.vocab", "vocab.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_vocab_too_large_for_corpus_is_a_clear_error(tmp_path):
    shards = make_shards(tmp_path / "in", texts=["tiny corpus"] * 3)
    with pytest.raises(ValueError, match="--vocab-size"):
        train_bpe([shards], tmp_path / "tok", vocab_size=4000, image_codes=64, log=lambda m: None)


def test_no_text_is_a_clear_error(tmp_path):
    shards = make_shards(tmp_path / "in", images=[draw_image(0)])
    with pytest.raises(ValueError, match="no text found"):
        train_bpe([shards], tmp_path / "tok", vocab_size=2000, image_codes=64, log=lambda m: None)


def test_vq_trained_first_decides_the_image_side(tmp_path):
    shards = make_shards(tmp_path / "in", texts=sentences(1500))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok/vq.json").write_text(json.dumps({"codebook_size": 64, "resolution": 16, "downsample": 2}))
    with pytest.raises(ValueError, match="--image-codes 64"):
        train_bpe([shards], tmp_path / "tok", vocab_size=2000, image_codes=128, log=lambda m: None)
    train_bpe([shards], tmp_path / "tok", vocab_size=2000, image_codes=64, image_tokens_per_image=1024, log=lambda m: None)
    assert Vocab.load(tmp_path / "tok").image_tokens_per_image == 64
