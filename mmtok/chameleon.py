"""Chameleon's tokenizer as an mmtok tokenizer directory (`mmtok import-tokenizer chameleon`).

Reads either layout a user has: Meta's release (`tokenizer/text_tokenizer.json`,
`tokenizer/vqgan.yaml`, `tokenizer/vqgan.ckpt`) or a Hugging Face checkpoint directory
(`config.json` with `vq_config`, `*.safetensors`, `tokenizer.json`), and writes a normal
tokenizer directory: `vocab.json` (format `mmtok-vocab/2`, Chameleon's own ids),
`text_tokenizer.json` (the text tokenizer, byte for byte), `vq.safetensors` + `vq.json`
(the VQ-GAN, `kind: chameleon-vqgan`).

The VQ-GAN is mmtok/chameleon_vq.py's, with the original parameter names, so Meta's state
dict loads as it is and Hugging Face's after dropping its `model.vqmodel.` prefix. Hugging
Face checkpoints carry the encoder only: a tokenizer imported from one encodes images but
cannot decode them.

Nothing is unpickled but tensors: `vqgan.ckpt` (a torch pickle) is read with
`torch.load(weights_only=True)`, which refuses any other object.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mmtok.chameleon_vq import ChameleonVQ, ChameleonVQConfig
from mmtok.vocab import FORMAT_ANY, Vocab, VocabError

TEXT_FILE = "text_tokenizer.json"
IMAGE_PREFIX, IMAGE_SUFFIX = "IMGIMG", "Z"  # image code 123 is the token IMGIMGBCDZ (0 -> A ... 9 -> J)
# mmtok's role -> Chameleon's token for it
ROLES = {"<bos>": "<s>", "<pad>": "<pad>", "<eod>": "</s>", "<boi>": "<racm3:break>", "<eoi>": "<eoss>"}
_PARTS = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def image_token_name(code: int) -> str:
    return IMAGE_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + IMAGE_SUFFIX


def code_of(name: str) -> int | None:
    """The image code an `IMGIMG<letters>Z` token stands for; None for any other token."""
    body = name[len(IMAGE_PREFIX):-len(IMAGE_SUFFIX)]
    if not (name.startswith(IMAGE_PREFIX) and name.endswith(IMAGE_SUFFIX) and body and all("A" <= c <= "J" for c in body)):
        return None
    return int("".join(str(ord(c) - ord("A")) for c in body))


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
