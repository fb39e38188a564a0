"""Image inputs that phones, scanners and scientific tools make (issue 12): EXIF orientation,
16-bit and float pixels, extreme aspect ratios. Every path that reads an image for the VQ
(train-vq, tokenize-images, tokenize) goes through mmtok.vq.load_image; Uni-MoE through
mmtok.images.rgb_image."""

import io

import numpy as np
import pytest
from PIL import Image

from mmtok.images import MAX_ASPECT
from mmtok.vq import load_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(img: Image.Image, fmt: str, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kw["exif"] = exif
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def left_red(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), BLUE)
    img.paste(RED, (0, 0, w // 2, h))
    return img


# JPEG at 400 x 200 takes the reduced-decoding (draft) path at resolution 16; PNG the exact one
@pytest.mark.parametrize("fmt,size", [("PNG", (40, 20)), ("JPEG", (40, 20)), ("JPEG", (400, 200))])
def test_exif_orientation_is_applied_before_the_crop(fmt, size):
    # stored: left half red, right half blue. Orientation 6 = turn 90 degrees clockwise to
    # view, so the upright picture is red on top, blue below
    data = encode(left_red(*size), fmt, orientation=6)
    x = load_image(data, 16).astype(int)
    assert x.shape == (3, 16, 16)
    tol = 40 if fmt == "JPEG" else 0  # JPEG ringing at the edge is far below the 255 between the colours
    assert np.abs(x[:, :4, :] - np.array(RED)[:, None, None]).max() <= tol  # top rows: red, all the way across
    assert np.abs(x[:, -4:, :] - np.array(BLUE)[:, None, None]).max() <= tol
    # orientation 1 (upright) and no EXIF at all give the same pixels
    plain = load_image(encode(left_red(*size), fmt), 16)
    assert np.array_equal(load_image(encode(left_red(*size), fmt, orientation=1), 16), plain)
    assert np.abs(plain[:, :, :4].astype(int) - np.array(RED)[:, None, None]).max() <= tol  # left columns red


@pytest.mark.parametrize("orientation,top_left", [(3, BLUE), (8, BLUE), (2, BLUE), (4, RED)])
def test_other_orientations(orientation, top_left):
    x = load_image(encode(left_red(40, 20), "PNG", orientation), 16)
    assert tuple(x[:, 0, 0]) == top_left


def test_uni_moe_images_are_upright_too():
    from mmtok.trainer.unimoe_data import image_array

    x = image_array(encode(left_red(40, 20), "PNG", orientation=6), 8)
    assert x.shape == (3, 8, 8)
    assert np.allclose(x[:, 0, :], np.array([1.0, -1.0, -1.0])[:, None], atol=1e-6)
    assert np.allclose(x[:, -1, :], np.array([-1.0, -1.0, 1.0])[:, None], atol=1e-6)


def _grey(mode: str, fmt: str, value) -> bytes:
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    arr = np.full((20, 30), value, dtype=dtype)
    arr[:, :10] = 0  # a dark stripe: scaling keeps it dark
    return encode(Image.fromarray(arr, mode) if mode != "I;16" else Image.fromarray(arr), fmt)


@pytest.mark.parametrize("mode,fmt,value", [("I;16", "PNG", 128 * 257), ("I;16", "TIFF", 128 * 257),
                                            ("I", "TIFF", 128 * 257), ("F", "TIFF", 128 / 255)])
def test_16_bit_and_float_pixels_are_scaled_not_clipped(mode, fmt, value):
    data = _grey(mode, fmt, value)
    assert Image.open(io.BytesIO(data)).mode == mode
    x = load_image(data, 16).astype(int)
    # clipping would give 255 (16-bit) or 0/1 (float); scaling gives the mid grey
    assert np.abs(x[:, :, -4:] - 128).max() <= 1
    assert x[:, :, 0].max() <= 1


def test_extreme_aspect_ratio_refused_before_any_resize(monkeypatch):
    strip = encode(Image.new("RGB", (1, 300_000), RED), "PNG")

    def no_resize(*a, **k):
        raise AssertionError("resized an image that should have been refused")

    monkeypatch.setattr(Image.Image, "resize", no_resize)
    with pytest.raises(ValueError, match=r"1x300000: aspect ratio over the 50:1 limit.*crop it"):
        load_image(strip, 512)
    monkeypatch.undo()
    wide = encode(Image.new("RGB", (MAX_ASPECT * 10, 10), RED), "PNG")  # at the limit: accepted
    assert load_image(wide, 16).shape == (3, 16, 16)


def test_tokenize_images_quarantines_a_strip(tmp_path, bpe_tokdir):
    """The stage names the reason in quarantine.jsonl and goes on with the good images."""
    import json

    import torch
    from helpers.media import draw_image, make_shards

    from mmtok.tokenize import Tokenizer, tokenize_images
    from mmtok.vq import VQConfig, VQModel

    torch.manual_seed(0)
    tok_dir = bpe_tokdir
    VQModel(VQConfig(resolution=16, downsample=2, codebook_size=64, channels=8, res_blocks=1)).save(tok_dir)
    strip = encode(Image.new("RGB", (2, 3000), RED), "PNG")
    shards = make_shards(tmp_path / "in", images=[draw_image(1), strip, draw_image(2)])
    summary = tokenize_images([shards], Tokenizer.load(tok_dir, "cpu"), tmp_path / "codes", progress=False,
                              max_error_rate=0.5)
    assert summary.samples == 2 and summary.quarantined == 1
    (rec,) = [json.loads(x) for x in (tmp_path / "codes" / "quarantine.jsonl").read_text().splitlines()]
    assert "2x3000: aspect ratio over the 50:1 limit" in rec["reason"]
