"""Decoding images as every image stage does, without torch: `mmtok shard` validates with the
same guards and conversions that `tokenize-images` (mmtok.vq.load_image) and the Uni-MoE
image connector apply, so that an image shard keeps is one they can read."""

from __future__ import annotations

import io

import numpy as np

MAX_PIXELS = 89_478_485  # PIL's own bomb-warning threshold, and `mmtok shard --max-pixels`'s default
# Longest side over shortest side at most: resizing the short side of a 1 x 300,000 strip to
# 512 would allocate 512 x 153,600,000 pixels (230 GB); 50:1 caps that at 40 MB at 512.
MAX_ASPECT = 50
# EXIF Orientation tag (0x0112) -> the transposition that makes the picture upright (as ImageOps.exif_transpose)
_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
                7: "TRANSVERSE", 8: "ROTATE_90"}


def open_image(data: bytes, max_pixels: int = MAX_PIXELS, max_aspect: float = MAX_ASPECT):
    """A PIL image of encoded bytes, header read, nothing decoded yet. Raises ValueError on
    an unknown format, on an image over `max_pixels` (a decompression bomb) and on one whose
    sides differ by more than `max_aspect` times (resizing it would take gigabytes)."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names a buffer's address, different on every run
        raise ValueError("not a known image format") from None
    except OSError as e:  # a header cut short
        raise ValueError(f"not a readable image ({e})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ValueError(f"{w}x{h} = {w * h:,} pixels is over the {max_pixels:,} limit (possible decompression bomb)")
    if min(w, h) < 1 or max(w, h) > max_aspect * min(w, h):
        raise ValueError(f"{w}x{h}: aspect ratio over the {max_aspect:g}:1 limit (resizing it to a square "
                         "would take too much memory); crop it to tiles first")
    return img


def _upright(img):
    """The transposition that the EXIF Orientation tag asks for (None when upright). Read
    after `load()`: a PNG keeps its EXIF after the pixels."""
    from PIL import Image

    name = _ORIENTATION.get(img.getexif().get(0x0112))
    return getattr(Image.Transpose, name) if name else None


def _to_rgb(img):
    """A loaded image as 8-bit RGB: 16-bit (I;16*, I) and float (F, taken as 0..1) greys
    scaled to 0..255 rather than clipped, alpha composited onto white."""
    from PIL import Image

    if img.mode.startswith("I") or img.mode == "F":
        scale = 255.0 if img.mode == "F" else 255.0 / 65535.0
        grey = np.asarray(img, dtype=np.float32) * scale
        img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def rgb_image(data: bytes, max_pixels: int = MAX_PIXELS):
    """Encoded bytes -> upright 8-bit RGB PIL image, with `open_image`'s guards; for callers
    that do their own resizing (the Uni-MoE image connector)."""
    img = open_image(data, max_pixels)
    img.load()
    turn = _upright(img)
    img = _to_rgb(img)
    return img.transpose(turn) if turn is not None else img
