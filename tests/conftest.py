"""Fixtures shared by the tests. Helpers that tests import are in tests/helpers/, by purpose."""

from pathlib import Path

import pytest


@pytest.fixture
def one_thread():
    """Tiny convolutions run faster on one thread than on two shared cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A directory with every good input kind of `mmtok shard`."""
    import csv
    import json

    from helpers.media import make_video, png_bytes, wav_bytes, write_tar

    root = tmp_path / "in"
    (root / "imgs").mkdir(parents=True)
    (root / "imgs" / "cat.png").write_bytes(png_bytes("circle", "red", "blue"))
    (root / "imgs" / "cat.txt").write_text("a red circle on a blue background")
    (root / "imgs" / "dog.jpg").write_bytes(png_bytes("square", "green", "white", fmt="JPEG"))
    (root / "imgs" / "note.txt").write_text("plain text sample: naïve café, 日本語, emoji 🎉")
    (root / "sound.wav").write_bytes(wav_bytes())
    (root / "speech.flac").write_bytes(wav_bytes(freq=200, fmt="FLAC"))
    (root / "speech.txt").write_text("hello world")
    make_video(root / "clip.mp4")
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"text": "a text row"},
        {"image": "imgs/dog.jpg", "caption": "a green square"},
        {"segments": [{"text": "first"}, {"image": "imgs/cat.png"}, {"text": "then more"}]},
    ]) + "\n")
    with open(root / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["text", "image", "caption"])
        w.writeheader()
        w.writerow({"text": "a csv text row"})
        w.writerow({"image": "imgs/tri.png", "caption": "a triangle"})
    (root / "imgs" / "tri.png").write_bytes(png_bytes("triangle", "yellow", "black"))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "a parquet row", "audio": None},
                                         {"text": None, "audio": "sound.wav"}]), root / "rows.parquet")
    write_tar(root / "old.tar", [("s1.jpg", png_bytes("stripe", "orange", "purple", fmt="JPEG")), ("s1.txt", b"stripes"),
                                 ("s2.txt", b"tar text")])
    return root


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    """A tiny trained tokenizer: a 2000-id BPE and a 16 px VQ of 64 codes (64 per image)."""
    import torch

    from helpers.media import draw_image, make_shards, sentences
    from mmtok.bpe import train_bpe
    from mmtok.trainer.vq_train import train_vq
    from mmtok.vq import VQConfig

    tmp = tmp_path_factory.mktemp("tok")
    torch.set_num_threads(1)
    shards = make_shards(tmp / "train", texts=sentences(), images=[draw_image(i) for i in range(16)])
    train_bpe([shards], tmp / "tok", vocab_size=2000, image_codes=64, log=lambda m: None)
    train_vq([shards], tmp / "tok", VQConfig(resolution=16, downsample=2, codebook_size=64, channels=8, res_blocks=1),
             steps=10, batch_size=8, disc_weight=0, log=lambda m: None)
    return tmp / "tok"


@pytest.fixture
def bpe_tokdir(tmp_path):
    """A tokenizer directory with only its BPE trained (64 image codes, 64 per image), no VQ."""
    from helpers.media import make_shards, sentences
    from mmtok.bpe import train_bpe

    shards = make_shards(tmp_path / "bpe", texts=sentences())
    train_bpe([shards], tmp_path / "tok", vocab_size=2000, image_codes=64, image_tokens_per_image=64,
              log=lambda m: None)
    return tmp_path / "tok"


@pytest.fixture(scope="module")
def train_plan(tmp_path_factory):
    """helpers.runs.make_plan's 1:2 text:image plan, for 2 ranks of 2-sequence micro-batches."""
    from helpers.runs import make_plan

    return make_plan(tmp_path_factory.mktemp("train"), steps=40, world_size=2, micro_batch=2)
