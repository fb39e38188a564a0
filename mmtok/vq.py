"""The VQ image tokenizer: preprocessing, encoder, quantizer, decoder (and the training-only
discriminator and perceptual loss). Reads top to bottom; training lives in trainer/vq_train.py.

Image -> [-1, 1] tensor -> Encoder (convs, downsample by `downsample`) -> low-dimensional
latent -> Quantizer (nearest l2-normalised code) -> code grid (resolution/downsample)^2
-> Decoder -> image. Low-dimensional, l2-normalised codes (as in ViT-VQGAN) keep most of
the codebook in use; dead codes are restarted by the trainer.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmtok.images import MAX_PIXELS, _to_rgb, _upright, open_image

WEIGHTS = "vq.safetensors"
CONFIG = "vq.json"
# Bumped whenever `load_image` can give other pixels for the same bytes: codes made before
# then no longer match, and the tokenizer fingerprint (which includes this) tells them apart.
PREPROCESSING = 2  # 2: reduced-scale JPEG decoding (to >= 2x the target) for sources >= 2x the resolution


# ---------------------------------------------------------------- preprocessing

REDUCING_GAP = 3.0  # Pillow: box-reduce first while the rest of the resize is >= 3x; 55 dB from the plain resize


def load_image(data: bytes, resolution: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Chameleon's preprocessing: alpha onto white, resize the short side (bicubic), turn
    upright by the EXIF orientation, centre crop. Returns uint8 [3, resolution, resolution];
    `to_unit` scales it to [-1, 1] (on the device, so workers ship a quarter of the bytes).
    16-bit and float greys are scaled to 8 bits (`_to_rgb`). Raises on bad bytes, on images
    over `max_pixels` (decompression bombs) and over `MAX_ASPECT`, before decoding them.

    A source at least twice the resolution (short side) takes a faster path: a JPEG is
    decoded by libjpeg at 1/2, 1/4 or 1/8 scale (never below twice the target size) before
    the resize, which uses `REDUCING_GAP`, as it does for other formats. PSNR from the full
    decode is in docs/TOKENIZERS.md; smaller sources take the exact path."""
    from PIL import Image

    img = open_image(data, max_pixels)
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    big = min(w, h) >= 2 * resolution
    # libjpeg's reduced decode stops at twice the target: the bicubic resize then still
    # antialiases, which keeps thin lines and small text (decoding right down to the target
    # cost up to 25 dB on line art)
    drafted = img.draft("RGB", (2 * nw, 2 * nh)) if big else None  # None unless a JPEG
    img.load()
    turn = _upright(img)
    img = _to_rgb(img)
    img = img.resize((nw, nh), Image.Resampling.BICUBIC, box=drafted[1] if drafted else None,
                     reducing_gap=REDUCING_GAP if big else None)
    # turned after the resize, so the draft box stays in the decoded image's own axes; the
    # short side's scale is the same either way
    if turn is not None:
        img = img.transpose(turn)
        nw, nh = img.size
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels from `load_image` -> float32 in [-1, 1], on the tensor's own device."""
    return pixels.float() / 127.5 - 1.0


def to_pil(image: torch.Tensor):
    """[3, H, W] in [-1, 1] -> PIL RGB image."""
    from PIL import Image

    arr = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy())


# ---------------------------------------------------------------- config

@dataclass
class VQConfig:
    resolution: int = 512
    downsample: int = 16
    codebook_size: int = 8192
    code_dim: int = 8
    channels: int = 128
    channel_mult: tuple[int, ...] | None = None  # one per resolution level; default from downsample
    res_blocks: int = 2
    beta: float = 0.25  # commitment weight

    def __post_init__(self):
        levels = int(math.log2(self.downsample))
        if 2 ** levels != self.downsample or levels < 1:
            raise ValueError(f"--downsample must be a power of two >= 2, got {self.downsample}")
        if self.resolution % self.downsample:
            raise ValueError(f"--resolution {self.resolution} is not a multiple of --downsample {self.downsample}")
        if self.channel_mult is None:
            self.channel_mult = (1, 1, 2, 2, 4, 4, 8, 8)[: levels + 1]
        self.channel_mult = tuple(self.channel_mult)
        if len(self.channel_mult) != levels + 1:
            raise ValueError(f"channel_mult needs {levels + 1} entries for downsample {self.downsample}")

    @property
    def grid(self) -> int:
        return self.resolution // self.downsample

    @property
    def tokens_per_image(self) -> int:
        return self.grid ** 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d


# ---------------------------------------------------------------- building blocks

def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(3, chans[0], 3, padding=1)
        layers, c = [], chans[0]
        for i, c_out in enumerate(chans):
            for _ in range(cfg.res_blocks):
                layers.append(ResBlock(c, c_out))
                c = c_out
            if i < len(chans) - 1:
                layers.append(nn.Conv2d(c, c, 4, stride=2, padding=1))  # halve the resolution
        self.body = nn.Sequential(*layers, ResBlock(c, c))
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, cfg.code_dim, 1)

    def forward(self, x):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(x)))))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        chans = [cfg.channels * m for m in cfg.channel_mult]
        c = chans[-1]
        self.conv_in = nn.Conv2d(cfg.code_dim, c, 3, padding=1)
        layers = [ResBlock(c, c)]
        for i in reversed(range(len(chans))):
            for _ in range(cfg.res_blocks):
                layers.append(ResBlock(c, chans[i]))
                c = chans[i]
            if i > 0:
                layers.append(Upsample(c))
        self.body = nn.Sequential(*layers)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.norm_out(self.body(self.conv_in(z)))))


class Quantizer(nn.Module):
    """Nearest-code lookup on the unit sphere with a straight-through gradient."""

    def __init__(self, n_codes: int, dim: int, beta: float):
        super().__init__()
        self.codebook = nn.Parameter(F.normalize(torch.randn(n_codes, dim), dim=1))
        self.beta = beta

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, H, W] -> code ids [B, H, W]."""
        b, d, h, w = z.shape
        with torch.autocast(z.device.type, enabled=False):  # the nearest code is chosen in fp32, never bf16
            flat = F.normalize(z.float().permute(0, 2, 3, 1).reshape(-1, d), dim=1)
            return (flat @ F.normalize(self.codebook.float(), dim=1).t()).argmax(1).view(b, h, w)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """code ids [B, H, W] -> normalised code vectors [B, D, H, W]."""
        return F.normalize(self.codebook, dim=1)[codes].permute(0, 3, 1, 2)

    def forward(self, z):
        zn = F.normalize(z, dim=1)
        idx = self.codes(z)
        q = self.embed(idx)
        loss = self.beta * F.mse_loss(zn, q.detach()) + F.mse_loss(q, zn.detach())
        return zn + (q - zn).detach(), idx, loss

    @torch.no_grad()
    def restart(self, dead: torch.Tensor, z: torch.Tensor, generator: torch.Generator) -> int:
        """Move dead codes onto randomly chosen current encoder outputs (with a little noise)."""
        n = int(dead.sum())
        if n == 0:
            return 0
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float(), dim=1)
        pick = torch.randint(0, flat.shape[0], (n,), generator=generator).to(flat.device)
        noise = 0.01 * torch.randn(n, flat.shape[1], generator=generator).to(flat.device)
        self.codebook[dead] = F.normalize(flat[pick] + noise, dim=1).to(self.codebook.dtype)
        return n


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.quantizer, self.decoder = Encoder(cfg), Quantizer(cfg.codebook_size, cfg.code_dim, cfg.beta), Decoder(cfg)

    def forward(self, x):
        """x [B, 3, R, R] in [-1, 1] -> (reconstruction, codes, quantizer loss, latent)."""
        z = self.encoder(x)
        q, idx, qloss = self.quantizer(z)
        return self.decoder(q), idx, qloss, z

    def preprocess(self, data: bytes) -> np.ndarray:
        """Encoded image -> uint8 [3, R, R] (`load_image`); an imported VQ brings its own."""
        return load_image(data, self.cfg.resolution)

    scale = staticmethod(to_unit)  # uint8 pixels -> the encoder's input, on the device

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, R, R] in [-1, 1] -> code ids [B, (R/downsample)^2] (row-major)."""
        return self.quantizer.codes(self.encoder(x)).flatten(1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code ids [B, grid*grid] -> images [B, 3, R, R] in [-1, 1]."""
        g = self.cfg.grid
        return self.decoder(self.quantizer.embed(codes.view(-1, g, g))).clamp(-1, 1)

    def save(self, tokdir: str | Path) -> None:
        from safetensors.torch import save_file

        from mmtok.shards import atomic_write

        tokdir = Path(tokdir)
        tmp = tokdir / f".{WEIGHTS}.tmp"
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(tokdir / WEIGHTS)
        atomic_write(tokdir / CONFIG, json.dumps(self.cfg.to_dict(), indent=1, sort_keys=True).encode())

    @classmethod
    def load(cls, tokdir: str | Path, device: str = "cpu") -> "VQModel":
        from safetensors.torch import load_file

        tokdir = Path(tokdir)
        if not (tokdir / WEIGHTS).exists() or not (tokdir / CONFIG).exists():
            raise FileNotFoundError(f"{tokdir}: no trained VQ ({WEIGHTS} + {CONFIG}); run `mmtok train-vq` first")
        try:
            model = cls(VQConfig(**json.loads((tokdir / CONFIG).read_text())))
            model.load_state_dict(load_file(str(tokdir / WEIGHTS)))
        except Exception as e:  # malformed config, truncated or foreign weights: name the files
            raise ValueError(f"{tokdir}: unreadable VQ ({WEIGHTS} / {CONFIG}: {type(e).__name__}: {e})") from None
        return model.to(device).eval()


def load_vq(tokdir: str | Path, device: str = "cpu"):
    """A tokenizer directory's VQ: mmtok's own, or an imported one (`kind` in vq.json)."""
    try:
        kind = json.loads((Path(tokdir) / CONFIG).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None  # VQModel.load names what is missing or malformed
    from mmtok.chameleon_vq import KIND, ChameleonVQ

    if kind == KIND:
        return ChameleonVQ.load(tokdir, device)
    return VQModel.load(tokdir, device)


# ---------------------------------------------------------------- training-only parts

class PatchDiscriminator(nn.Module):
    """A PatchGAN: one real/fake logit per overlapping patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods, c = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for i in range(1, layers):
            c_out = channels * min(2 ** i, 8)
            mods += [nn.Conv2d(c, c_out, 4, 2 if i < layers - 1 else 1, 1), _norm(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        mods.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x)


class PerceptualLoss(nn.Module):
    """Distance between VGG16 feature maps (unit-normalised per position, as LPIPS does, but
    unweighted). The weights come from a file the user supplies; nothing is downloaded."""

    LAYERS = (3, 8, 15, 22)  # relu1_2, relu2_2, relu3_3, relu4_3 in torchvision's vgg16.features

    def __init__(self, weights_path: str | Path):
        super().__init__()
        from torchvision.models import vgg16

        path = Path(weights_path)
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        self.features = vgg16(weights=None).features[: self.LAYERS[-1] + 1]
        self.features.load_state_dict(state, strict=False)
        missing = [k for k in self.features.state_dict() if k not in state]
        if missing:
            raise ValueError(f"{path}: not torchvision VGG16 weights (missing {missing[:3]})")
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x, y):
        h = torch.cat([x, y]).add(1).div(2).sub(self.mean).div(self.std)
        loss = 0.0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.LAYERS:
                a, b = F.normalize(h, dim=1).chunk(2)
                loss = loss + (a - b).pow(2).sum(1).mean()
        return loss
