"""Raw inputs made here: text (a syllable corpus, tricky strings), pictures, sound, video and
tars, and input shard directories in `mmtok shard`'s layout (docs/FORMATS.md), made with the
stage runner, for the tokenizer tests."""

from __future__ import annotations

import io
import random
import subprocess
import tarfile
from pathlib import Path

import numpy as np

from mmtok.runner import Item, Sample, run_stage
from mmtok.shards import content_hash, dumps_meta


TRICKY = [
    "Emoji 🎉👩‍👩‍👧 and flags 🇫🇷!",
    "中文文本，日本語のテキスト、한국어 텍스트",
    "control\tchars\x00\x01\x1b[31m and \r\n newlines\n\n  double  spaces  ",
    " leading and trailing space ",
    "digits 1234567890 and 3.14159",
    "",
]


def sentences(n=1500, seed=0) -> list[str]:
    """`n` sentences of made-up words from a few syllables: enough text to train a small BPE."""
    r = random.Random(seed)
    syl = ["ka", "to", "mi", "ran", "se", "lo", "pu", "ne", "dor", "vi", "qua", "zen", "bri", "ho"]
    words = ["".join(r.choice(syl) for _ in range(r.randint(1, 4))) for _ in range(800)]
    return [" ".join(r.choice(words) for _ in range(r.randint(4, 20))) + r.choice([".", "!", "?", " 42."])
            for _ in range(n)]


def png_bytes(shape="circle", fg="red", bg="blue", size=48, seed=0, fmt="PNG") -> bytes:
    """One of the demo's shapes, encoded."""
    from mmtok.demo import draw_shape

    b = io.BytesIO()
    draw_shape(shape, fg, bg, size=size, seed=seed).save(b, fmt)
    return b.getvalue()


def wav_bytes(seconds=0.5, sr=16000, freq=440.0, fmt="WAV") -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    b = io.BytesIO()
    sf.write(b, (0.3 * np.sin(2 * np.pi * freq * t)).astype("float32"), sr, format=fmt)
    return b.getvalue()


def make_video(path: Path, seconds=1, src="testsrc") -> Path:
    """A 64 x 48, 10 fps H.264 clip of one of ffmpeg's test sources."""
    from mmtok.media import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", f"{src}=size=64x48:rate=10:duration={seconds}",
                    "-pix_fmt", "yuv420p", "-c:v", "libx264", str(path)], check=True)
    return path


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def draw_image(seed: int, size: int = 48, mode: str = "RGB", fmt: str = "PNG") -> bytes:
    """A random picture of a few filled shapes on a plain background."""
    from PIL import Image, ImageDraw

    r = random.Random(seed)
    img = Image.new("RGB", (size + r.randrange(0, 16), size), tuple(r.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = r.randrange(size // 2), r.randrange(size // 2)
        box = (x0, y0, x0 + r.randrange(6, size // 2), y0 + r.randrange(6, size // 2))
        colour = tuple(r.randrange(256) for _ in range(3))
        (d.ellipse if r.random() < 0.5 else d.rectangle)(box, fill=colour)
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(128)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _sample(entry):
    kind, key, body = entry
    if kind == "text":
        return Sample(key, "text", {"txt": body}, {"modality": "text", "source": key, "sha256": content_hash({"txt": body})})
    if kind == "image":
        return Sample(key, "image-png", {"png": body}, {"modality": "image", "source": key, "sha256": content_hash({"png": body})})
    if kind == "pair":
        img, cap = body
        return Sample(key, "pair-png", {"png": img, "txt": cap},
                      {"modality": "pair", "source": key, "sha256": content_hash({"png": img, "txt": cap})})
    segments, images = body  # doc: its images become separate image samples
    out = [Sample(f"{key}_img{i}", "image-png", {"png": im},
                  {"modality": "image", "source": key, "sha256": content_hash({"png": im}), "role": "doc_image", "parent": key})
           for i, im in enumerate(images)]
    meta = {"modality": "doc", "source": key, "segments": segments,
            "sha256": content_hash({"segments": dumps_meta(segments)})}
    return [Sample(key, "doc", {}, meta)] + out


def make_shards(out, texts=(), images=(), pairs=(), docs=()):
    """texts: str or bytes; images: bytes; pairs: (image bytes, caption); docs: list of
    str | image bytes segments. Returns the shard directory."""
    entries = []
    for i, t in enumerate(texts):
        entries.append(("text", f"t{i:04d}", t.encode() if isinstance(t, str) else t))
    for i, im in enumerate(images):
        entries.append(("image", f"i{i:04d}", im))
    for i, (im, cap) in enumerate(pairs):
        entries.append(("pair", f"p{i:04d}", (im, cap.encode() if isinstance(cap, str) else cap)))
    for i, segs in enumerate(docs):
        segments, imgs = [], []
        for s in segs:
            if isinstance(s, str):
                segments.append({"text": s})
            else:
                segments.append({"image": content_hash({"png": s})})
                imgs.append(s)
        entries.append(("doc", f"d{i:04d}", (segments, imgs)))
    items = [Item(e[1], e) for e in entries]
    run_stage("shard", items, _sample, out, config={"test": str(out)}, progress=False, max_count=7)
    return out


def old_load_image(data: bytes, resolution: int) -> np.ndarray:
    """The preprocessing before draft decoding and uint8 pixels, as a reference: float32 in [-1, 1]."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    img = img.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return (np.asarray(img, dtype=np.float32) / 127.5 - 1.0).transpose(2, 0, 1).copy()


def photo(seed: int, width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A photo-like picture: lit gradient, blurred shapes and lines, sensor noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    light = np.stack([xx / width * rng.uniform(60, 200) + yy / height * rng.uniform(0, 80) for _ in range(3)], -1)
    img = Image.fromarray(light.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for _ in range(30):
        x, y, s = rng.integers(width), rng.integers(height), rng.integers(height // 40, height // 4)
        d.ellipse((x, y, x + s, y + s * rng.uniform(0.5, 1.5)), fill=tuple(rng.integers(256, size=3).tolist()))
    for _ in range(20):
        d.line(tuple(rng.integers(width, size=4).tolist()), fill=tuple(rng.integers(256, size=3).tolist()),
               width=int(rng.integers(1, max(2, height // 200))))
    img = img.filter(ImageFilter.GaussianBlur(height / 1000))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def bomb_png() -> bytes:
    """A PNG whose header claims 10000 x 10000 pixels (100 M) over 8 x 8 pixels of data."""
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = (10_000).to_bytes(4, "big") * 2  # IHDR width, height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)
