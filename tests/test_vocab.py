import json

import numpy as np
import pytest

from mmtok.vocab import NAMED_SPECIALS, Vocab, VocabError


@pytest.mark.parametrize("size,codes", [(65536, 8192), (4096, 1024), (2000, 64)])
def test_layout_invariants(size, codes):
    v = Vocab.layout(size, codes)
    v.check()
    assert v.image_range == (size - codes, size)
    assert v.n_image_codes == codes
    assert v.text_range == (v.n_specials, size - codes)
    assert v.n_specials + v.n_text + v.n_image_codes == size
    assert sorted(v.specials.values()) == list(range(v.n_specials))
    assert len(set(v.specials)) == len(v.specials)
    for name in NAMED_SPECIALS:
        assert v[name] < v.n_specials
    ids = np.arange(size)
    img = v.is_image(ids)
    assert img.sum() == codes and img[-codes:].all()
    assert not any(v.is_image(i) for i in v.specials.values())


def test_default_is_chameleon():
    v = Vocab.layout()
    assert (v.vocab_size, v.n_image_codes, v.image_tokens_per_image) == (65536, 8192, 1024)


def test_too_small_vocab_is_refused():
    with pytest.raises(VocabError, match="text ids"):
        Vocab.layout(1024, 1000)


def test_save_load_roundtrip(tmp_path):
    v = Vocab.layout(4096, 512, 64)
    v.save(tmp_path)
    d = json.loads((tmp_path / "vocab.json").read_text())
    assert d["format"] == "mmtok-vocab/1" and d["image_range"] == [3584, 4096]
    assert Vocab.load(tmp_path) == v


def test_load_errors_name_the_input(tmp_path):
    with pytest.raises(VocabError, match="no vocab.json"):
        Vocab.load(tmp_path)
    (tmp_path / "vocab.json").write_text("{nope")
    with pytest.raises(VocabError, match="not valid JSON"):
        Vocab.load(tmp_path)
    d = Vocab.layout(4096, 512).to_dict()
    d["image_range"] = [3000, 4096]  # overlaps text
    (tmp_path / "vocab.json").write_text(json.dumps(d))
    with pytest.raises(VocabError, match="contiguous"):
        Vocab.load(tmp_path)
    d = Vocab.layout(4096, 512).to_dict()
    d["specials"]["<extra>"] = 3  # a duplicate id
    (tmp_path / "vocab.json").write_text(json.dumps(d))
    with pytest.raises(VocabError, match="each once"):
        Vocab.load(tmp_path)
