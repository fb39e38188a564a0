"""Chameleon's VQ-GAN (the taming-transformers encoder / quantizer / decoder that Chameleon
uses) with mmtok's VQ interface, and its image preprocessing. Written here so that
`transformers` stays optional; parameter names are the original ones, so Meta's state dict
loads as it is and Hugging Face's after dropping its `model.vqmodel.` prefix
(mmtok/chameleon.py imports both). `mmtok.vq.load_vq` loads it for a tokenizer directory
whose vq.json says `kind: chameleon-vqgan`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

KIND = "chameleon-vqgan"
RESCALE = 0.0078  # ChameleonImageProcessor's rescale_factor, then minus 1: 255 becomes 0.989, not 1


@dataclass
class ChameleonVQConfig:
    resolution: int = 512
    codebook_size: int = 8192
    embed_dim: int = 256
    latent_channels: int = 256
    base_channels: int = 128
    channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    decoder: bool = True  # Hugging Face checkpoints have no decoder weights
    source_layout: str = "meta"
    kind: str = field(default=KIND)

    def __post_init__(self):
        self.channel_multiplier, self.attn_resolutions = tuple(self.channel_multiplier), tuple(self.attn_resolutions)
        if self.resolution % (1 << (len(self.channel_multiplier) - 1)):
            raise ValueError(f"resolution {self.resolution} does not divide into {len(self.channel_multiplier)} levels")

    @property
    def grid(self) -> int:
        return self.resolution >> (len(self.channel_multiplier) - 1)

    @property
    def tokens_per_image(self) -> int:
        return self.grid ** 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_multiplier"], d["attn_resolutions"] = list(self.channel_multiplier), list(self.attn_resolutions)
        return d


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


def _swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) as the reference computes it (not F.silu), so codes match bit for bit; in
    place, on a fresh norm output (one tensor less per block): the model only runs under no_grad."""
    return x.mul_(torch.sigmoid(x))


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv2(_swish(self.norm2(self.conv1(_swish(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        w = F.softmax(torch.bmm(q, self.k(h).reshape(b, c, hh * ww)) * (int(c) ** -0.5), dim=2)
        out = torch.bmm(self.v(h).reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # padded on the right and bottom only


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list, attns: list, resample: nn.Module | None, name: str) -> nn.Module:
    m = nn.Module()
    m.block, m.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        setattr(m, name, resample)
    return m


def _mid(c: int) -> nn.Module:
    m = nn.Module()
    m.block_1, m.attn_1, m.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return m


def _run_level(level: nn.Module, h, resample: str):
    """One resolution level: its res blocks (each followed by attention where the level
    has it), then its down- or upsampling if it has one."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return getattr(level, resample)(h) if hasattr(level, resample) else h


class Encoder(nn.Module):
    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        mult, ch, n = (1, *cfg.channel_multiplier), cfg.base_channels, len(cfg.channel_multiplier)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down, res = nn.ModuleList(), cfg.resolution
        for i in range(n):
            c, blocks, attns = ch * mult[i], [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(c, ch * mult[i + 1]))
                c = ch * mult[i + 1]
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c))
            self.down.append(_level(blocks, attns, Downsample(c) if i < n - 1 else None, "downsample"))
            res = res // 2 if i < n - 1 else res
        self.mid = _mid(c)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h, "downsample")
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        ch, mult, n = cfg.base_channels, cfg.channel_multiplier, len(cfg.channel_multiplier)
        c, res = ch * mult[-1], cfg.grid
        self.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
        self.mid = _mid(c)
        levels = []
        for i in reversed(range(n)):  # lowest resolution first; stored in level order, as the original
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(c, ch * mult[i]))
                c = ch * mult[i]
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(c))
            levels.insert(0, _level(blocks, attns, Upsample(c) if i > 0 else None, "upsample"))
            res = res * 2 if i > 0 else res
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h, "upsample")
        return self.conv_out(_swish(self.norm_out(h)))


class ChameleonVQ(nn.Module):
    """Chameleon's VQ-GAN with mmtok's VQ interface (`cfg`, `preprocess`, `scale`, `encode`, `decode`)."""

    def __init__(self, cfg: ChameleonVQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(cfg.codebook_size, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(cfg) if cfg.decoder else None
        # uint8 -> model input, computed as ChameleonImageProcessor does (float64 rescale, float32 shift)
        lut = (np.arange(256, dtype=np.float64) * RESCALE).astype(np.float32) - np.float32(1.0)
        self.register_buffer("lut", torch.from_numpy(lut), persistent=False)

    def preprocess(self, data: bytes) -> np.ndarray:
        return load_image(data, self.cfg.resolution)

    def scale(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels from `preprocess` -> the model's input, on the tensor's own device."""
        return self.lut[pixels.long()]

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] (`scale`d) -> codes [B, grid*grid], row-major."""
        z = self.quant_conv(self.encoder(x))
        with torch.autocast(z.device.type, enabled=False):  # the nearest code is chosen in fp32, never bf16
            z = z.float().permute(0, 2, 3, 1).contiguous()
            flat, e = z.view(-1, self.cfg.embed_dim), self.quantize.embedding.weight.float()
            # the reference's expansion of |z - e|^2, term for term: the argmin then agrees on near ties too
            d = (torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
                 - 2 * torch.einsum("bd,dn->bn", flat, e.transpose(0, 1)))
            return torch.argmin(d, dim=1).view(z.shape[0], -1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, grid*grid] -> images [B, 3, R, R] in [-1, 1]."""
        if self.decoder is None:
            raise ValueError("this Chameleon tokenizer was imported from a Hugging Face checkpoint, which carries only "
                             "the VQ encoder: images cannot be decoded; import Meta's release (tokenizer/vqgan.ckpt)")
        g = self.cfg.grid
        q = self.quantize.embedding(codes.view(-1, g, g)).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(q)).clamp(-1, 1)

    def save(self, tokdir: str | Path) -> None:
        from mmtok.vq import VQModel

        VQModel.save(self, tokdir)  # the same files: weights (the lookup table is not saved), then config

    @classmethod
    def load(cls, tokdir: str | Path, device: str = "cpu") -> "ChameleonVQ":
        from safetensors.torch import load_file

        from mmtok.vq import CONFIG, WEIGHTS

        tokdir = Path(tokdir)
        try:
            model = cls(ChameleonVQConfig(**json.loads((tokdir / CONFIG).read_text())))
            model.load_state_dict(load_file(str(tokdir / WEIGHTS)))
        except Exception as e:  # malformed config, truncated or foreign weights: name the files
            raise ValueError(f"{tokdir}: unreadable Chameleon VQ ({WEIGHTS} / {CONFIG}: {type(e).__name__}: {e})") from None
        return model.to(device).eval()


def load_image(data: bytes, resolution: int) -> np.ndarray:
    """ChameleonImageProcessor's pixels, as uint8 [3, R, R]: upright by EXIF, alpha composited
    onto white, the short side resized to `resolution` (Lanczos; the long side truncated, as
    it does), centre crop. `ChameleonVQ.scale` does the rest. mmtok's guards against
    decompression bombs and extreme aspect ratios apply (mmtok.images.open_image)."""
    from PIL import Image

    from mmtok.images import _to_rgb, _upright, open_image

    img = open_image(data)
    img.load()
    turn = _upright(img)
    img = _to_rgb(img)
    img = img.transpose(turn) if turn is not None else img
    w, h = img.size
    short, long = min(w, h), max(w, h)
    size = (resolution, int(resolution * long / short))
    img = img.resize(size if w <= h else size[::-1], Image.Resampling.LANCZOS)
    left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
