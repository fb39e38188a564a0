"""Chameleon's tokenizer as an mmtok tokenizer directory (`mmtok import-tokenizer chameleon`).

Reads either layout a user has: Meta's release (`tokenizer/text_tokenizer.json`,
`tokenizer/vqgan.yaml`, `tokenizer/vqgan.ckpt`) or a Hugging Face checkpoint directory
(`config.json` with `vq_config`, `*.safetensors`, `tokenizer.json`), and writes a normal
tokenizer directory: `vocab.json` (format `mmtok-vocab/2`, Chameleon's own ids),
`text_tokenizer.json` (the text tokenizer, byte for byte), `vq.safetensors` + `vq.json`
(the VQ-GAN, `kind: chameleon-vqgan`).

The VQ-GAN is the taming-transformers encoder / quantizer / decoder that Chameleon uses,
written here so that `transformers` stays optional; its parameter names are the original
ones, so Meta's state dict loads as it is and Hugging Face's after dropping its
`model.vqmodel.` prefix. Hugging Face checkpoints carry the encoder only: a tokenizer
imported from one encodes images but cannot decode them.

Nothing is unpickled but tensors: `vqgan.ckpt` (a torch pickle) is read with
`torch.load(weights_only=True)`, which refuses any other object.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmtok.vocab import FORMAT_ANY, Vocab, VocabError

KIND = "chameleon-vqgan"
TEXT_FILE = "text_tokenizer.json"
IMAGE_PREFIX, IMAGE_SUFFIX = "IMGIMG", "Z"  # image code 123 is the token IMGIMGBCDZ (0 -> A ... 9 -> J)
# mmtok's role -> Chameleon's token for it
ROLES = {"<bos>": "<s>", "<pad>": "<pad>", "<eod>": "</s>", "<boi>": "<racm3:break>", "<eoi>": "<eoss>"}
RESCALE = 0.0078  # ChameleonImageProcessor's rescale_factor, then minus 1: 255 becomes 0.989, not 1
_PARTS = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def image_token_name(code: int) -> str:
    return IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + IMAGE_SUFFIX


def code_of(name: str) -> int | None:
    """The image code an `IMGIMG<letters>Z` token stands for; None for any other token."""
    body = name[len(IMAGE_PREFIX):-len(IMAGE_SUFFIX)]
    if not (name.startswith(IMAGE_PREFIX) and name.endswith(IMAGE_SUFFIX) and body and all("A" <= c <= "J" for c in body)):
        return None
    return int("".join(str(ord(c) - ord("A")) for c in body))


# ---------------------------------------------------------------- the VQ-GAN

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


# ---------------------------------------------------------------- the text tokenizer

class HFText:
    """A Hugging Face `tokenizers` file as mmtok's text model: its ids are the text ids as they
    are. Special tokens written in text are encoded as plain text, never as the special
    (so no text can open an image block); text that still yields an image or special id
    (a vocabulary whose ordinary pieces spell them) is refused, naming the token."""

    def __init__(self, path: str | Path, vocab: Vocab):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise VocabError(f"{path}: reading this tokenizer needs the `tokenizers` package: "
                             "pip install 'mmtok[chameleon]'") from None
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # its errors are plain Exceptions carrying serde's message
            raise VocabError(f"{path}: not a Hugging Face tokenizers file ({e})") from None
        self.tok.encode_special_tokens = True
        self.vocab, self.reserved = vocab, np.asarray(sorted(vocab.specials.values()), np.int64)

    def encode(self, text: str) -> np.ndarray:
        ids = np.asarray(self.tok.encode(text, add_special_tokens=False).ids, np.int64)
        bad = self.vocab.is_image(ids) | np.isin(ids, self.reserved)
        if bad.any():
            t = int(ids[bad][0])
            raise ValueError(f"text encodes to the token {self.tok.id_to_token(t)!r} (id {t}), an image or special "
                             "token of this vocabulary; such text cannot be tokenized with it")
        return ids.astype(np.uint32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


# ---------------------------------------------------------------- import

def _hf_source(src: Path) -> tuple[ChameleonVQConfig, dict, Path, int, dict | None]:
    from safetensors import safe_open

    try:
        config = json.loads((src / "config.json").read_text())
        vq = config["vq_config"]
        cfg = ChameleonVQConfig(resolution=int(vq.get("resolution", 512)), codebook_size=int(vq.get("num_embeddings", 8192)),
                                embed_dim=int(vq.get("embed_dim", 256)), latent_channels=int(vq.get("latent_channels", 256)),
                                base_channels=int(vq.get("base_channels", 128)),
                                channel_multiplier=vq.get("channel_multiplier", (1, 1, 2, 2, 4)),
                                num_res_blocks=int(vq.get("num_res_blocks", 2)), attn_resolutions=vq.get("attn_resolutions") or (),
                                decoder=False, source_layout="huggingface")
        _check_supported(vq.get("double_latent", False), vq.get("attn_type", "vanilla"), vq.get("in_channels", 3), src / "config.json")
        vocab_size = int(config["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{src}/config.json: not a Chameleon config with vq_config ({type(e).__name__}: {e})") from None
    state, prefix = {}, "model.vqmodel."
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                if k.startswith(prefix):
                    state[k[len(prefix):]] = f.get_tensor(k)
    if not state:
        raise ValueError(f"{src}: no VQ weights (model.vqmodel.*) in its *.safetensors files")
    return cfg, state, src / "tokenizer.json", vocab_size, config.get("vocabulary_map")


def _meta_source(tdir: Path) -> tuple[ChameleonVQConfig, dict, Path, int | None, None]:
    try:
        import yaml
    except ImportError:
        raise ValueError("reading vqgan.yaml needs PyYAML: pip install 'mmtok[chameleon]'") from None
    try:
        params = yaml.safe_load((tdir / "vqgan.yaml").read_text())["model"]["params"]
        dd = params["ddconfig"]
        cfg = ChameleonVQConfig(resolution=int(dd["resolution"]), codebook_size=int(params["n_embed"]),
                                embed_dim=int(params["embed_dim"]), latent_channels=int(dd["z_channels"]),
                                base_channels=int(dd["ch"]), channel_multiplier=dd["ch_mult"],
                                num_res_blocks=int(dd["num_res_blocks"]), attn_resolutions=dd.get("attn_resolutions") or (),
                                decoder=True, source_layout="meta")
        _check_supported(dd.get("double_z", False), dd.get("attn_type", "vanilla"), dd.get("in_channels", 3), tdir / "vqgan.yaml")
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{tdir}/vqgan.yaml: not a VQ-GAN config ({type(e).__name__}: {e})") from None
    ckpt = tdir / "vqgan.ckpt"
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt} is missing")
    try:  # a pickle: weights_only admits tensors and plain containers, never code
        loaded = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{ckpt}: cannot be read as tensors only (torch.load weights_only=True: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it is not loaded otherwise") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{ckpt}: no state_dict of tensors in it")
    # the training losses' weights (discriminator, LPIPS) are not part of the tokenizer
    return cfg, {k: v for k, v in state.items() if k.startswith(_PARTS)}, tdir / TEXT_FILE, None, None


def _check_supported(double_latent, attn_type, in_channels, where: Path) -> None:
    if double_latent or attn_type != "vanilla" or int(in_channels) != 3:
        raise ValueError(f"{where}: double_latent={double_latent}, attn_type={attn_type!r}, in_channels={in_channels}: "
                         "only Chameleon's own VQ-GAN (False, 'vanilla', 3) is supported")


def chameleon_vocab(text_file: Path, cfg: ChameleonVQConfig, vocab_size: int | None, vocabulary_map: dict | None) -> Vocab:
    """Chameleon's ids as a Vocab: the image range where its `IMGIMG...Z` tokens are (each
    code at offset + code), the roles at the ids of Chameleon's tokens for them, the text
    range spanning its other ordinary (non-special) tokens."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(text_file))
    except Exception as e:
        raise ValueError(f"{text_file}: not a Hugging Face tokenizers file ({e})") from None
    names = tok.get_vocab(with_added_tokens=True)
    if vocabulary_map is not None:  # transformers maps codes through config.json's copy: they must agree
        differ = [n for n in names if (code_of(n) is not None or n in ROLES.values()) and vocabulary_map.get(n) != names[n]]
        if differ:
            raise ValueError(f"{text_file} and config.json's vocabulary_map disagree on {differ[:3]}: mixed-up files")
    images = {code_of(n): i for n, i in names.items() if code_of(n) is not None}
    n = cfg.codebook_size
    offset = images.get(0, -1)
    if sorted(images) != list(range(n)) or any(i != offset + c for c, i in images.items()):
        raise ValueError(f"{text_file}: its image tokens are not codes 0..{n - 1} at consecutive ids "
                         f"({len(images)} found); only that layout is supported")
    missing = [t for t in ROLES.values() if t not in names]
    if missing:
        raise ValueError(f"{text_file}: no token {missing[0]!r}; is this Chameleon's tokenizer?")
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    text = [i for i in names.values() if not offset <= i < offset + n and i not in special]
    vocab_size = vocab_size or tok.get_vocab_size(with_added_tokens=True)
    if not text or max(names.values()) >= vocab_size:
        raise ValueError(f"{text_file}: no text tokens, or ids past the model's vocab_size {vocab_size}")
    v = Vocab(vocab_size=vocab_size, specials={r: names[t] for r, t in ROLES.items()}, n_specials=len(ROLES),
              text_range=(min(text), max(text) + 1), image_range=(offset, offset + n),
              image_tokens_per_image=cfg.tokens_per_image, sp_model=None, format=FORMAT_ANY,
              text_tokenizer=TEXT_FILE, names=dict(ROLES))
    try:
        v.check()
    except VocabError as e:
        raise ValueError(f"{text_file}: unsupported layout ({e})") from None
    return v


def import_chameleon(src: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write a tokenizer directory `out` from Chameleon's tokenizer in `src` (either layout).
    Files are written atomically, vocab.json last: its presence means the import finished."""
    from mmtok.locks import exclusive
    from mmtok.shards import atomic_write
    from mmtok.vocab import VOCAB_FILE

    src, out = Path(src), Path(out)
    if (src / "config.json").exists():
        cfg, state, text_file, vocab_size, vmap = _hf_source(src)
    elif (src / "vqgan.yaml").exists() or (src / "tokenizer" / "vqgan.yaml").exists():
        cfg, state, text_file, vocab_size, vmap = _meta_source(src if (src / "vqgan.yaml").exists() else src / "tokenizer")
    else:
        raise FileNotFoundError(f"{src}: neither a Hugging Face Chameleon checkpoint (config.json, *.safetensors, "
                                "tokenizer.json) nor Meta's release (tokenizer/vqgan.yaml, vqgan.ckpt, text_tokenizer.json)")
    if not text_file.exists():
        raise FileNotFoundError(f"{text_file} is missing")
    vocab = chameleon_vocab(text_file, cfg, vocab_size, vmap)
    model = ChameleonVQ(cfg)
    have = set(model.state_dict())
    missing, extra = sorted(have - set(state)), sorted(set(state) - have)
    if missing or extra:
        raise ValueError(f"{src}: VQ weights do not fit the config (missing {missing[:3]}, unexpected {extra[:3]})")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{src}: VQ weights do not fit the config ({str(e).splitlines()[-1].strip()})") from None
    if (out / VOCAB_FILE).exists() and not overwrite:
        raise ValueError(f"{out} already holds a tokenizer; use a new --out, or --overwrite to replace it")
    with exclusive(out):
        atomic_write(out / TEXT_FILE, text_file.read_bytes())
        model.save(out)
        vocab.save(out)
    return {"out": str(out), "layout": cfg.source_layout, "vocab_size": vocab.vocab_size,
            "image_range": list(vocab.image_range), "text_range": list(vocab.text_range),
            "image_tokens_per_image": vocab.image_tokens_per_image, "resolution": cfg.resolution,
            "decoder": cfg.decoder}
