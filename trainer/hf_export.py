"""Chameleon checkpoints in, Hugging Face models out.

- `chameleon_options` / `load_chameleon`: a Hugging Face `ChameleonForConditionalGeneration`
  directory (config.json + *.safetensors) as mmtok model options and a dense `Decoder`
  state dict; `init_run` writes it as the step-0 checkpoint of a run (`mmtok train
  --init-from hf:DIR`), upcycled to MoMa experts when the run asks for them.
- `export_hf`: a run as a Hugging Face directory with the tokenizer bundled. A dense model
  with Chameleon's QK-norm becomes a stock `ChameleonForConditionalGeneration`; every
  other model (mmtok's own QK-norm, MoE, MoMa, Mixture-of-Depths) is written with its
  modelling code (`modeling_mmtok.py`, from trainer/hf_modeling_mmtok.py; `auto_map`,
  loaded with `trust_remote_code=True`), routing causally through the auxiliary routers.

Two layouts differ beyond names. transformers rotates the halves of each head's dims
(rotate_half), mmtok rotates adjacent pairs (Meta's own layout): the query and key rows,
and Chameleon's per-head QK-norm, are permuted per head on the way in and back on the way
out; attention scores do not change, since queries and keys are permuted alike. And
transformers' Chameleon sets the logits of image tokens to the lowest float (it generates
text only): an export's logits equal mmtok's on every other id.

Nothing but tensors is read: safetensors files and JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mmtok.shards import atomic_write, read_json
from mmtok.trainer.config import ModelConfig, RunConfig
from mmtok.trainer.model import Decoder
from mmtok.trainer.train import CONFIG, TrainError

HF_PREFIX = "hf:"
MODELING = "modeling_mmtok.py"
WEIGHTS = "model.safetensors"
VQ_PREFIX = "model.vqmodel."


def _config(src: Path) -> dict:
    try:
        hf = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise TrainError(f"{src}: no config.json; give a Hugging Face Chameleon checkpoint directory") from None
    except json.JSONDecodeError as e:
        raise TrainError(f"{src}/config.json: not valid JSON ({e})") from None
    if not isinstance(hf, dict) or hf.get("model_type") != "chameleon":
        got = hf.get("model_type") if isinstance(hf, dict) else None
        raise TrainError(f"{src}/config.json: model_type {got!r}, expected 'chameleon' (a ChameleonForConditionalGeneration)")
    return hf


def chameleon_options(src: str | Path) -> dict:
    """ModelConfig fields that make mmtok's dense decoder Chameleon's architecture; what
    mmtok's decoder cannot express is refused, naming the setting."""
    src = Path(src)
    hf = _config(src)
    rope = hf.get("rope_parameters") or {}
    unsupported = {
        "num_key_value_heads": (hf.get("num_key_value_heads") or hf.get("num_attention_heads"), hf.get("num_attention_heads")),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), False),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "rope_type": (rope.get("rope_type", "default"), "default"),
    }
    for key, (have, want) in unsupported.items():
        if have != want:
            raise TrainError(f"{src}/config.json: {key} = {have!r}; mmtok's decoder supports only {want!r}")
    try:
        return dict(model="dense", vocab_size=int(hf["vocab_size"]), n_layers=int(hf["num_hidden_layers"]),
                    d_model=int(hf["hidden_size"]), n_heads=int(hf["num_attention_heads"]),
                    ffn_hidden=int(hf["intermediate_size"]), swin_norm=bool(hf.get("swin_norm", False)),
                    qk_norm="chameleon", norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                    rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))))
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f"{src}/config.json: not a Chameleon config ({type(e).__name__}: {e})") from None


def image_range_of(vocabulary_map: dict) -> tuple[int, int] | None:
    """The ids of Chameleon's image tokens (IMGIMG...Z) as a half-open range, if they have names."""
    from mmtok.chameleon import code_of

    ids = sorted(i for n, i in vocabulary_map.items() if code_of(n) is not None)
    return (ids[0], ids[-1] + 1) if ids else None


def _rope_perm(head_dim: int) -> torch.Tensor:
    """mmtok's dim j of a head is transformers' dim perm[j] (adjacent pairs <- halves)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], -1).flatten()


def _pairs(cfg: ModelConfig):
    """(mmtok name, transformers name) of every tensor that maps one to one."""
    yield "embed.weight", "model.embed_tokens.weight"
    yield "norm.weight", "model.norm.weight"
    yield "head.weight", "lm_head.weight"
    for i in range(cfg.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        yield m + "attn_norm.weight", h + "input_layernorm.weight"
        yield m + "ffn_norm.weight", h + "post_attention_layernorm.weight"
        yield m + "attn.proj.weight", h + "self_attn.o_proj.weight"
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            yield m + f"ffn.{ours}.weight", h + f"mlp.{theirs}.weight"


def from_hf_state(hf: dict, cfg: ModelConfig, tied: bool = False) -> dict:
    """transformers' Chameleon tensors -> mmtok's dense Decoder state dict."""
    h, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
    perm = _rope_perm(hd)
    rows = lambda w: w.reshape(h, hd, -1)[:, perm].reshape(h * hd, -1)  # noqa: E731
    if tied and "lm_head.weight" not in hf:
        hf = {**hf, "lm_head.weight": hf["model.embed_tokens.weight"]}
    out = {ours: hf[theirs] for ours, theirs in _pairs(cfg)}
    for i in range(cfg.n_layers):
        a = f"model.layers.{i}.self_attn."
        out[f"layers.{i}.attn.qkv.weight"] = torch.cat([rows(hf[a + "q_proj.weight"]), rows(hf[a + "k_proj.weight"]),
                                                       hf[a + "v_proj.weight"]])
        for n in ("q_norm", "k_norm"):
            for p in ("weight", "bias"):
                out[f"layers.{i}.attn.{n}.{p}"] = hf[f"{a}{n}.{p}"].reshape(h, hd)[:, perm].flatten()
    return out


def to_hf_state(state: dict, cfg: ModelConfig) -> dict:
    """The inverse of `from_hf_state` (a dense Decoder with qk_norm "chameleon")."""
    h, hd, d = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.d_model
    inv = torch.argsort(_rope_perm(hd))
    rows = lambda w: w.reshape(h, hd, -1)[:, inv].reshape(h * hd, -1)  # noqa: E731
    out = {theirs: state[ours] for ours, theirs in _pairs(cfg)}
    for i in range(cfg.n_layers):
        a = f"model.layers.{i}.self_attn."
        q, k, v = state[f"layers.{i}.attn.qkv.weight"].split(d)
        out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = rows(q), rows(k), v
        for n in ("q_norm", "k_norm"):
            for p in ("weight", "bias"):
                out[f"{a}{n}.{p}"] = state[f"layers.{i}.attn.{n}.{p}"].reshape(h, hd)[:, inv]
    return {k: v.contiguous() for k, v in out.items()}


def load_chameleon(src: str | Path, cfg: ModelConfig) -> Decoder:
    """A dense Decoder (`cfg` from `chameleon_options`) holding the checkpoint's weights."""
    from safetensors import safe_open

    src = Path(src)
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise TrainError(f"{src}: no *.safetensors files")
    hf = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            hf.update({k: f.get_tensor(k) for k in f.keys() if not k.startswith(VQ_PREFIX)})
    model = Decoder(cfg)
    try:
        state = from_hf_state(hf, cfg, tied=bool(_config(src).get("tie_word_embeddings", False)))
        model.load_state_dict(state)
    except KeyError as e:
        raise TrainError(f"{src}: the weights lack {e.args[0]} (a truncated or foreign checkpoint)") from None
    except RuntimeError as e:
        raise TrainError(f"{src}: the weights do not fit its config.json ({str(e).splitlines()[-1].strip()})") from None
    return model.eval()


def init_run(src: str | Path, cfg: RunConfig, out: str | Path, position: dict, global_batch: int,
             seed: int = 0) -> dict:
    """Write `out` as a run at step 0 whose model is the checkpoint in `src`: as it is for a
    dense `cfg`, or upcycled (every expert of a group a copy of the dense FFN, fresh
    routers) for moma / mod-moma. `cfg` must carry `chameleon_options(src)`; `position`
    is the loader's starting state. Continue with `mmtok train --resume --out OUT`."""
    from mmtok.locks import exclusive
    from mmtok.trainer.checkpoint import Checkpointer, LoaderState
    from mmtok.trainer.train import build_optimizer
    from mmtok.trainer.upcycle import upcycle_weights

    src, out = Path(src), Path(out)
    dense_cfg = ModelConfig(**{**cfg.as_dict()["model"], "model": "dense", "experts": ""})
    dense = load_chameleon(src, dense_cfg)
    if cfg.model.model == "dense":
        model = dense
    elif cfg.model.model in ("moma", "mod-moma"):
        torch.manual_seed(seed)
        model = Decoder(cfg.model)
        upcycle_weights(dense, model, from_dense=True)
    else:
        raise TrainError(f"--init-from starts dense, moma or mod-moma runs, not {cfg.model.model}")
    with exclusive(out):
        if (out / CONFIG).exists():
            raise TrainError(f"{out} already holds a run; --init-from starts a new one: choose a new --out")
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / CONFIG, json.dumps(cfg.as_dict(), indent=1, sort_keys=True).encode())
        path = Checkpointer(out, 0, 1).save(0, model.train(), build_optimizer(model, cfg.train), LoaderState(position),
                                            {**cfg.checkpoint_meta(1), "global_batch": global_batch})
        atomic_write(out / "initialized_from.json", json.dumps({"source": str(src.resolve()), "format": "huggingface",
                                                                 "model": cfg.model.model}, indent=1).encode())
    return {"out": str(out), "checkpoint": str(path), "source": str(src), "model": cfg.model.model}


# ---------------------------------------------------------------- export

def hf_tokenizer(tokdir: Path):
    """The tokenizer directory's text tokenizer as a Hugging Face `tokenizers` object over the
    model's whole id space: an imported one's own file, or mmtok's SentencePiece BPE rebuilt
    as a byte-fallback BPE (ids shifted past the specials, the same merges), with the
    specials and the image codes (named as Chameleon names them) as special tokens. Returns
    (tokenizer, {role: token name})."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    from mmtok.chameleon import image_token_name
    from mmtok.vocab import Vocab

    vocab = Vocab.load(tokdir)
    if vocab.text_tokenizer:  # imported: the model's own tokenizer file, with its own names
        tok = Tokenizer.from_file(str(tokdir / vocab.text_tokenizer))
        return tok, dict(vocab.names or {})
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokdir / vocab.sp_model))
    lo = vocab.text_range[0]
    pieces = {sp.id_to_piece(i): lo + i for i in range(sp.get_piece_size())}
    merges = []
    for piece, i in pieces.items():  # sentencepiece's BPE ranks merges by the merged piece's id
        if sp.is_byte(i - lo) or sp.is_unknown(i - lo) or sp.is_control(i - lo):
            continue
        splits = [(pieces[piece[:k]], pieces[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in pieces and piece[k:] in pieces]
        merges += [(i, a_id, b_id, a, b) for a_id, b_id, a, b in splits]
    merges.sort()
    specials = {name: i for name, i in vocab.specials.items()}
    images = {image_token_name(c): vocab.image_range[0] + c for c in range(vocab.n_image_codes)}
    full = {**specials, **pieces, **images}
    tok = Tokenizer(models.BPE(vocab=full, merges=[(a, b) for *_, a, b in merges], unk_token=sp.id_to_piece(sp.unk_id()),
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in [*specials, *images]])
    return tok, {r: r for r in specials}


def _tokenizer_files(tokdir: Path, out: Path, max_len: int) -> dict:
    """tokenizer.json + tokenizer_config.json (a PreTrainedTokenizerFast), and the mmtok
    tokenizer directory itself as `mmtok-tokenizer/` (for `mmtok generate` and `tokenize`)."""
    tok, names = hf_tokenizer(tokdir)
    atomic_write(out / "tokenizer.json", tok.to_str().encode())
    roles = {"bos_token": "<bos>", "eos_token": "<eod>", "pad_token": "<pad>"}
    atomic_write(out / "tokenizer_config.json", json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "add_bos_token": False,
         **{k: names.get(r, r) for k, r in roles.items()}}, indent=1).encode())
    bundle = out / "mmtok-tokenizer"
    if bundle.exists():
        shutil.rmtree(bundle)  # written by a previous export into this directory (checked by the caller)
    shutil.copytree(tokdir, bundle, ignore=shutil.ignore_patterns(".*"))
    return {"vocabulary_map": tok.get_vocab(with_added_tokens=True),
            **{k.replace("_token", "_token_id"): tok.token_to_id(names.get(r, r)) for k, r in roles.items()}}


def _vq_part(tokdir: Path, n_codes: int) -> tuple[dict, dict]:
    """vq_config and model.vqmodel.* tensors: the tokenizer's own VQ-GAN when it is
    Chameleon's (mmtok.chameleon keeps transformers' names), else a small random stand-in
    of that architecture (transformers' Chameleon always has a VQ; images then come in as
    ids from `mmtok tokenize-images`, not through its image processor)."""
    from mmtok.chameleon_vq import KIND, ChameleonVQ, ChameleonVQConfig
    from mmtok.vq import CONFIG as VQ_CONFIG

    vq_json = tokdir / VQ_CONFIG
    if vq_json.exists() and json.loads(vq_json.read_text()).get("kind") == KIND:
        vq, placeholder = ChameleonVQ.load(tokdir), False
    else:
        torch.manual_seed(0)
        vq = ChameleonVQ(ChameleonVQConfig(resolution=16, codebook_size=n_codes, embed_dim=4, latent_channels=4,
                                           base_channels=32, channel_multiplier=(1,), num_res_blocks=1, decoder=False))
        placeholder = True
    c = vq.cfg
    config = {"embed_dim": c.embed_dim, "num_embeddings": c.codebook_size, "latent_channels": c.latent_channels,
              "resolution": c.resolution, "base_channels": c.base_channels, "channel_multiplier": list(c.channel_multiplier),
              "num_res_blocks": c.num_res_blocks, "attn_resolutions": list(c.attn_resolutions), "double_latent": False,
              "in_channels": 3, "attn_type": "vanilla", "dropout": 0.0, "mmtok_placeholder": placeholder}
    tensors = {VQ_PREFIX + k: v.contiguous() for k, v in vq.state_dict().items() if not k.startswith("decoder.")}
    return config, tensors


def stock_chameleon(cfg: ModelConfig) -> bool:
    """Whether transformers' own ChameleonForConditionalGeneration computes this model."""
    return cfg.model == "dense" and cfg.qk_norm == "chameleon"


def export_hf(model: Decoder, cfg: ModelConfig, out: Path, tokdir: Path, step: int) -> dict:
    """Write `model` into `out` as a Hugging Face model directory with the tokenizer bundled."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tok = _tokenizer_files(tokdir, out, cfg.max_seq_len)
    if len(tok["vocabulary_map"]) > cfg.vocab_size or max(tok["vocabulary_map"].values()) >= cfg.vocab_size:
        raise TrainError(f"--tokenizer {tokdir} has ids past the model's vocab_size {cfg.vocab_size}: not its tokenizer")
    common = {"vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": False,
              "bos_token_id": tok["bos_token_id"], "eos_token_id": tok["eos_token_id"], "pad_token_id": tok["pad_token_id"],
              "dtype": "float32", "mmtok_step": step}
    if stock_chameleon(cfg):
        vq_config, vq_tensors = _vq_part(tokdir, cfg.image_range[1] - cfg.image_range[0])
        tensors = {**to_hf_state(state, cfg), **vq_tensors}
        config = {"architectures": ["ChameleonForConditionalGeneration"], "model_type": "chameleon",
                  "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layers,
                  "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads, "hidden_act": "silu",
                  "rms_norm_eps": cfg.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                  "swin_norm": cfg.swin_norm, "attention_bias": False, "mlp_bias": False, "vq_config": vq_config,
                  "vocabulary_map": tok["vocabulary_map"], "image_token_id": tok["vocabulary_map"].get("<image>"), **common}
        (out / MODELING).unlink(missing_ok=True)
    else:
        tensors = {f"decoder.{k}": v.contiguous() for k, v in state.items()}
        config = {"architectures": ["MmtokForCausalLM"], "model_type": "mmtok",
                  "auto_map": {"AutoConfig": "modeling_mmtok.MmtokConfig",
                               "AutoModelForCausalLM": "modeling_mmtok.MmtokForCausalLM"},
                  "mmtok_model": {**cfg.__dict__, "image_range": list(cfg.image_range)}, "use_cache": False, **common}
        shutil.copyfile(Path(__file__).with_name("hf_modeling_mmtok.py"), out / MODELING)
    tmp = out / f".{WEIGHTS}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS)
    atomic_write(out / "config.json", json.dumps(config, indent=1, sort_keys=True).encode())
    return {"format": "hf", "architecture": config["architectures"][0], "remote_code": not stock_chameleon(cfg),
            "tensors": len(tensors)}


def is_hf_export(path: str | Path) -> bool:
    try:
        meta = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("model_type") in ("chameleon", "mmtok")


def load_export(model_dir: Path):
    """(model, tokenizer) of an HF export, for scoring. An export may come from anyone, so
    nothing in it runs: an mmtok model is built by the modelling code installed with mmtok
    (the directory's own modeling_mmtok.py is never imported: no trust_remote_code), weights
    come from safetensors only (never a pickled .bin), and the tokenizer from its JSON."""
    from transformers import AutoTokenizer, ChameleonForConditionalGeneration

    from mmtok.trainer.hf_modeling_mmtok import MmtokForCausalLM

    own = read_json(Path(model_dir) / "config.json").get("model_type") == "mmtok"
    loader = MmtokForCausalLM if own else ChameleonForConditionalGeneration
    try:
        model = loader.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise TrainError(f"{model_dir}: not a loadable HF export ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "pass an `mmtok export --format hf` directory") from None
    return model, tokenizer


def harness_lm(model_dir: Path):
    """The export as lm-evaluation-harness's stock `hf` model (HFLM), handed the loaded model
    (`load_export`): transformers registers Chameleon as image-text-to-text, not under
    AutoModelForCausalLM, which is all the harness's own loading tries."""
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = load_export(model_dir)
    if torch.cuda.is_available():
        model = model.cuda()
    return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=1,
                max_length=model.config.max_position_embeddings)


def run_lm_eval(model: Path, tasks: list[str], out: Path, include: Path | None = None, limit: int | None = None,
                tokenizer: Path | None = None) -> dict:
    """lm-evaluation-harness's `simple_evaluate` through its stock `hf` model type on an HF
    export (a run is exported to `out/hf` first); its results go to `out/lm_eval.json`."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TrainError("--lm-eval needs lm-evaluation-harness: pip install 'mmtok[eval]'") from None
    if not tasks:
        raise TrainError("--lm-eval: give task names, comma-separated (e.g. --lm-eval lambada_openai,hellaswag)")
    model = Path(model)
    if not is_hf_export(model):
        from mmtok.trainer.export import export

        if tokenizer is None:
            raise TrainError(f"--lm-eval on the run {model}: give --tokenizer (it is exported to {out / 'hf'} first), "
                             "or pass an `mmtok export --format hf` directory")
        export(model, out / "hf", "hf", tokenizer)
        model = out / "hf"
    res = lm_eval.simple_evaluate(model=harness_lm(model), tasks=tasks, limit=limit,
                                  task_manager=TaskManager(include_path=str(include) if include else None))
    keep = {k: res[k] for k in ("results", "versions", "n-shot", "higher_is_better", "configs") if k in res}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "lm_eval.json", json.dumps({"model": str(model), **keep}, indent=1, default=str).encode())
    return keep["results"]
