"""Uni-MoE (arXiv 2405.11273) as a model of mmtok's trainer.

Each non-text modality has an encoder and a connector. The connector is a small
transformer whose learnable queries cross-attend to the encoder's output, followed by a
linear projection into the decoder's width; its `queries` outputs replace a placeholder
span in the token sequence (`<open> <pad> x queries <close>`, see `SPAN_SPECIALS`).

    speech  Whisper log-mel chunks (n_mels x 3000)  -> Whisper's own AudioEncoder (from
            openai-whisper), so `speech_encoder` can load an exported Whisper encoder
    audio   BEATs-normalised fbank (frames x 128)    -> conv stem + transformer
    image   RGB image                                -> ViT (patch embedding + transformer)
    video   8 keyframes                              -> the image-style ViT per frame,
                                                        mean-pooled over frames (as Uni-MoE)

The decoder is `mmtok.trainer.model.Decoder` (dense family) built with `LoRAMoEFFN` as its
FFN factory, and the connectors write into its token embeddings through its embedding hook.
`LoRAMoEFFN` is the shared SwiGLU plus one LoRA adapter per expert, top-2 token-choice
routing with a capacity factor and a load-balancing loss. Three stages decide what trains
and how tokens reach experts (`STAGES`):

    align    connectors train; every FFN runs its shared weights only
    experts  connectors + LoRA experts train; a sample's tokens all go to its modality's expert
    tune     connectors + LoRA experts + routers train; top-2 routing over the experts

The decoder's own weights (attention, shared FFN, embeddings, head) never train here: they
come from a dense run (`init_decoder`) or stay at their initial values. An encoder loaded
from disk is frozen; an encoder built from scratch trains with its connector.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmtok.trainer.config import ModelConfig
from mmtok.trainer.context import Context
from mmtok.trainer.ffn import SwiGLU
from mmtok.trainer.model import Decoder
from mmtok.trainer.moe import capacity, dispatch, top2_gate

MODALITIES = ("speech", "audio", "video", "image")
STAGES = ("align", "experts", "tune")
# The specials that open and close each modality's placeholder span (mmtok/vocab.py names).
SPAN_SPECIALS = {"speech": ("<bos_audio>", "<eos_audio>"), "audio": ("<bos_audio>", "<eos_audio>"),
                 "video": ("<bos_video>", "<eos_video>"), "image": ("<boi>", "<eoi>")}
WHISPER_FRAMES = 3000  # one 30 s chunk of Whisper log-mel; its encoder halves it to 1500


@dataclass
class UniMoEConfig:
    vocab_size: int = 1024
    image_range: tuple[int, int] = (1008, 1024)
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    ffn_hidden: int = 192
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    swin_norm: bool = False
    z_loss: float = 1e-5
    modalities: tuple[str, ...] = MODALITIES  # one LoRA expert per modality, in this order
    queries: int = 8  # connector outputs per sample (the placeholder span's length)
    connector_layers: int = 4  # Uni-MoE's connectors have 4 layers
    enc_width: int = 64
    enc_heads: int = 4
    enc_layers: int = 1
    n_mels: int = 80
    fbank_bins: int = 128
    image_size: int = 32
    patch: int = 8
    frames: int = 8
    lora_rank: int = 8  # Uni-MoE stage 3: rank 8, alpha 16
    lora_alpha: float = 16.0
    capacity_factor: float = 1.5
    balance_loss: float = 0.01
    router_z_loss: float = 1e-3
    speech_encoder: str = ""  # safetensors of a Whisper encoder: loaded and frozen
    speech_encoder_dims: dict = field(default_factory=dict)  # its (n_state, n_head, n_layer), read from the file

    def __post_init__(self):
        self.image_range, self.modalities = tuple(self.image_range), tuple(self.modalities)
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ValueError(f"unknown modalities {bad}; choose from {', '.join(MODALITIES)}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.enc_width % self.enc_heads:
            raise ValueError(f"enc_width {self.enc_width} is not divisible by enc_heads {self.enc_heads}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1 (got {self.lora_rank})")
        self.decoder_config()  # validates the decoder part

    def decoder_config(self) -> ModelConfig:
        return ModelConfig(model="dense", vocab_size=self.vocab_size, image_range=self.image_range,
                           n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                           ffn_hidden=self.ffn_hidden, swin_norm=self.swin_norm, rope_theta=self.rope_theta,
                           max_seq_len=self.max_seq_len, z_loss=self.z_loss, balance_loss=self.balance_loss,
                           router_z_loss=self.router_z_loss)

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ encoders


def _transformer(width: int, heads: int, layers: int) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True,
                                       activation="gelu")
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def speech_encoder(cfg: UniMoEConfig) -> nn.Module:
    """Whisper's encoder: (n, n_mels, 3000) -> (n, 1500, width)."""
    from whisper.model import AudioEncoder

    dims = cfg.speech_encoder_dims or {"n_state": cfg.enc_width, "n_head": cfg.enc_heads, "n_layer": cfg.enc_layers}
    return AudioEncoder(cfg.n_mels, WHISPER_FRAMES // 2, dims["n_state"], dims["n_head"], dims["n_layer"])


def whisper_dims(path: str) -> dict:
    """A Whisper encoder's sizes from its safetensors (Whisper uses 64-wide heads)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        if "conv1.weight" not in keys:
            raise ValueError(f"{path}: not a Whisper encoder export (no conv1.weight); export "
                             "whisper_model.encoder.state_dict() with safetensors")
        n_state = f.get_slice("conv1.weight").get_shape()[0]
    n_layer = len({k.split(".")[1] for k in keys if k.startswith("blocks.")})
    return {"n_state": n_state, "n_head": max(1, n_state // 64), "n_layer": n_layer}


class FbankEncoder(nn.Module):
    """(n, frames, bins) with valid lengths -> (n, frames/2, width) and its padding mask."""

    def __init__(self, cfg: UniMoEConfig):
        super().__init__()
        w = cfg.enc_width
        self.conv1 = nn.Conv1d(cfg.fbank_bins, w, 3, padding=1)
        self.conv2 = nn.Conv1d(w, w, 3, stride=2, padding=1)
        self.blocks = _transformer(w, cfg.enc_heads, cfg.enc_layers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from whisper.model import sinusoids

        h = F.gelu(self.conv2(F.gelu(self.conv1(x.transpose(1, 2))))).transpose(1, 2)
        pad = torch.arange(h.shape[1], device=x.device)[None] >= ((lengths + 1) // 2)[:, None]
        h = h + sinusoids(h.shape[1], h.shape[2]).to(h)
        return self.blocks(h, src_key_padding_mask=pad), pad


class ImageEncoder(nn.Module):
    """A small ViT: (n, 3, S, S) -> (n, patches, width)."""

    def __init__(self, cfg: UniMoEConfig):
        super().__init__()
        self.patchify = nn.Conv2d(3, cfg.enc_width, cfg.patch, stride=cfg.patch)
        self.pos = nn.Parameter(torch.randn((cfg.image_size // cfg.patch) ** 2, cfg.enc_width) * 0.02)
        self.blocks = _transformer(cfg.enc_width, cfg.enc_heads, cfg.enc_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.patchify(x).flatten(2).transpose(1, 2) + self.pos)


class Connector(nn.Module):
    """Learnable queries cross-attend to an encoder's output; a linear map into the decoder."""

    def __init__(self, cfg: UniMoEConfig, enc_width: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(cfg.queries, enc_width) * 0.02)
        heads = max(1, enc_width // 16)  # 16-wide heads: divides every Whisper width and ours
        layer = nn.TransformerDecoderLayer(enc_width, heads, 4 * enc_width, dropout=0.0,
                                           batch_first=True, norm_first=True, activation="gelu")
        self.blocks = nn.TransformerDecoder(layer, cfg.connector_layers)
        self.proj = nn.Linear(enc_width, cfg.d_model)

    def forward(self, memory: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        q = self.queries.expand(memory.shape[0], -1, -1)
        return self.proj(self.blocks(q, memory, memory_key_padding_mask=pad))  # (n, queries, d_model)


class ModalityInput(nn.Module):
    """Encoder + connector of one modality: its batch entries -> (n, queries, d_model)."""

    def __init__(self, cfg: UniMoEConfig, modality: str):
        super().__init__()
        self.modality = modality
        if modality == "speech":
            self.encoder = speech_encoder(cfg)
            width = self.encoder.conv1.out_channels
        else:
            self.encoder = FbankEncoder(cfg) if modality == "audio" else ImageEncoder(cfg)
            width = cfg.enc_width
        self.connector = Connector(cfg, width)

    def forward(self, batch: dict) -> torch.Tensor:
        x, m = batch[self.modality], self.modality
        if m == "speech":  # (n, chunks, n_mels, 3000): encode each chunk, join them in time
            n, c = x.shape[:2]
            h = self.encoder(x.flatten(0, 1)).unflatten(0, (n, c)).flatten(1, 2)
            pad = (torch.arange(c, device=x.device)[None] >= batch["speech_chunks"][:, None]).repeat_interleave(
                h.shape[1] // c, dim=1)
            return self.connector(h, pad)
        if m == "audio":
            return self.connector(*self.encoder(x, batch["audio_frames"]))
        if m == "video":  # (n, frames, 3, S, S): per frame, then the mean over frames
            n, f = x.shape[:2]
            return self.connector(self.encoder(x.flatten(0, 1)).unflatten(0, (n, f)).mean(1))
        return self.connector(self.encoder(x))


# ------------------------------------------------------------------ LoRA experts


class LoRAMoEFFN(SwiGLU):
    """The shared SwiGLU (same parameter names as the dense model's, so a dense run's
    weights load directly) plus E LoRA experts: expert e's projection W becomes
    W + (alpha / rank) * A_e B_e. B starts at zero, so a new expert equals the shared FFN.

    `mode`: "base" (shared weights only), "forced" (token t goes to expert `ctx.expert_route[t]`) or
    "routed" (top-2 softmax routing; each expert takes at most `capacity_factor` times its
    fair share of the 2N assignments, the rest are dropped and the residual carries them)."""

    def __init__(self, d: int, hidden: int, n_experts: int, rank: int, alpha: float, capacity_factor: float):
        super().__init__(d, hidden)
        self.n_experts, self.scale, self.capacity_factor = n_experts, alpha / rank, capacity_factor
        self.mode = "base"
        self.router = nn.Linear(d, n_experts, bias=False)
        shapes = {"1": (d, hidden), "3": (d, hidden), "2": (hidden, d)}
        self.lora_a = nn.ParameterDict({k: nn.Parameter(torch.empty(n_experts, i, rank)) for k, (i, o) in shapes.items()})
        self.lora_b = nn.ParameterDict({k: nn.Parameter(torch.zeros(n_experts, rank, o)) for k, (i, o) in shapes.items()})
        self.init_weights()

    def init_weights(self) -> None:
        """The LoRA terms and the router (the decoder's init calls it after its own)."""
        for a in self.lora_a.values():
            nn.init.normal_(a, std=1 / math.sqrt(a.shape[1]))
        for b in self.lora_b.values():
            nn.init.zeros_(b)
        nn.init.normal_(self.router.weight, std=0.02)

    def _lora(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        """Every expert's LoRA term of one projection over its tokens: buf [E, C, in] -> [E, C, out]."""
        return self.scale * torch.bmm(torch.bmm(buf, self.lora_a[name]), self.lora_b[name])

    def experts(self, xs: torch.Tensor, token: torch.Tensor, by_expert: torch.Tensor, slot: torch.Tensor,
                width: int) -> torch.Tensor:
        """Expert outputs [E, width, d] for tokens xs [n, d] laid out at (by_expert, slot).
        The shared w1/w3 products are computed once per token, not once per chosen expert
        (they do not depend on the expert); w2 acts after the expert's nonlinearity, so per slot."""
        def place(t):
            buf = t.new_zeros(self.n_experts, width, t.shape[-1])
            buf[by_expert, slot] = t[token]
            return buf

        buf = place(xs)
        h1 = place(self.w1(xs)) + self._lora(buf, "1")
        h3 = place(self.w3(xs)) + self._lora(buf, "3")
        h = F.silu(h1) * h3
        return self.w2(h) + self._lora(h, "2")

    def merged(self, e: int) -> SwiGLU:
        """Expert e as a plain SwiGLU with the LoRA product folded into its weights."""
        out = SwiGLU(self.w1.in_features, self.w1.out_features).to(self.w1.weight)
        with torch.no_grad():
            for k in ("1", "3", "2"):
                delta = self.scale * (self.lora_a[k][e] @ self.lora_b[k][e])  # [in, out]
                getattr(out, f"w{k}").weight.copy_(getattr(self, f"w{k}").weight + delta.T)
        return out

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        # token choice is causal already: the routing mode changes nothing
        if self.mode == "base":
            return super().forward(x)
        d, E = x.shape[-1], self.n_experts
        flat = x.reshape(-1, d)
        rows = ctx.real.reshape(-1).nonzero().squeeze(1)
        xs = flat[rows]
        n = xs.shape[0]
        stats = {"tokens": torch.tensor(float(n), device=x.device)}
        if self.mode == "forced":
            expert = ctx.expert_route.reshape(-1)[rows].unsqueeze(1)  # [n, 1]
            weight = torch.ones(n, 1, device=x.device)
            cap = n
        else:
            weight, expert, losses = top2_gate(self.router(xs).float())
            cap = capacity(2 * n, E, self.capacity_factor)
            stats |= losses
        k = expert.shape[1]
        # The assignments per expert, in token order; each expert keeps its first `cap`.
        order, by_expert, slot, counts = dispatch(expert, E, cap)
        token = order // k
        width = int(min(cap, int(counts.max()))) if n else 0
        y = self.experts(xs, token, by_expert, slot, width)[by_expert, slot]
        y = y * weight.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        out = torch.zeros_like(flat).index_add(0, rows[token], y)
        chosen = torch.full((flat.shape[0], k), -1, dtype=torch.long, device=x.device)
        chosen[rows] = expert
        kept = torch.zeros(n, dtype=torch.bool, device=x.device)
        kept[token] = True
        stats |= {"load": torch.bincount(by_expert, minlength=E).float(), "unrouted": (~kept).sum().float(),
                  "expert": chosen}
        self.routing_stats = {"all": stats}
        return out.view_as(x)


# ------------------------------------------------------------------ the model


class UniMoE(nn.Module):
    def __init__(self, cfg: UniMoEConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = Decoder(cfg.decoder_config(), ffn=lambda c, layer: LoRAMoEFFN(
            c.d_model, c.ffn_hidden, len(cfg.modalities), cfg.lora_rank, cfg.lora_alpha, cfg.capacity_factor))
        self.inputs = nn.ModuleDict({m: ModalityInput(cfg, m) for m in cfg.modalities})
        self.stage = "align"

    @property
    def layers(self) -> nn.ModuleList:
        """The decoder's blocks: what `trainer.parallel.parallelize` wraps and shards one by one."""
        return self.decoder.layers

    @property
    def ffns(self) -> list[LoRAMoEFFN]:
        return [layer.ffn for layer in self.decoder.layers]

    def frozen_encoders(self) -> set[str]:
        return {"speech"} if self.cfg.speech_encoder and "speech" in self.cfg.modalities else set()

    def set_stage(self, stage: str) -> dict:
        """Switch routing and trainable parameters for `stage`; returns what trains and what is frozen."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
        self.stage = stage
        for ffn in self.ffns:
            ffn.mode = {"align": "base", "experts": "forced", "tune": "routed"}[stage]
        frozen_enc = self.frozen_encoders()
        groups = {"connectors": [], "encoders": [], "lora_experts": [], "routers": [], "decoder": [],
                  "frozen_encoders": []}
        for name, p in self.named_parameters():
            if name.startswith("inputs."):
                modality, part = name.split(".")[1:3]
                g = "connectors" if part == "connector" else "frozen_encoders" if modality in frozen_enc else "encoders"
            elif ".lora_" in name:
                g = "lora_experts"
            elif ".router." in name:
                g = "routers"
            else:
                g = "decoder"
            groups[g].append(name)
        train = {"align": ("connectors", "encoders"), "experts": ("connectors", "encoders", "lora_experts"),
                 "tune": ("connectors", "encoders", "lora_experts", "routers")}[stage]
        for name, p in self.named_parameters():
            p.requires_grad_(any(name in groups[g] for g in train))
        count = lambda gs: {g: sum(self.get_parameter(n).numel() for n in groups[g]) for g in gs}  # noqa: E731
        return {"stage": stage, "trained": count(train), "frozen": count(g for g in groups if g not in train)}

    def load_speech_encoder(self, path: str) -> None:
        from safetensors.torch import load_file

        enc = self.inputs["speech"].encoder
        missing, unexpected = enc.load_state_dict(load_file(path), strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: does not fit a Whisper encoder (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def forward(self, batch: dict) -> tuple[torch.Tensor, list[dict]]:
        """Logits [B, T, V] and per-layer routing statistics. A sample's tokens go to the expert
        of its modality in stage "experts" (`batch["sample_modality"]`: one index per sample)."""
        ids = batch["input_ids"]
        return self.decoder(ids, batch["positions"], batch["doc_ids"], embed_hook=lambda x: self.write_spans(x, batch),
                            expert_route=batch["sample_modality"][:, None].expand_as(ids))

    def write_spans(self, x: torch.Tensor, batch: dict) -> torch.Tensor:
        """The token embeddings x [B, T, d] with the connector outputs of each modality's rows
        written over positions span[row] .. span[row] + queries."""
        q = self.cfg.queries
        for m, module in self.inputs.items():
            rows = batch.get(f"{m}_rows")
            if rows is None or rows.numel() == 0:
                if self.training:  # absent here: still a (zero) gradient, so FSDP ranks reduce the same tensors
                    x = x + 0.0 * sum(p.reshape(-1)[0] for p in module.parameters() if p.requires_grad)
                continue
            cols = batch["span"][rows][:, None] + torch.arange(q, device=x.device)
            x = x.index_put((rows[:, None].expand(-1, q), cols), module(batch).to(x.dtype))
        return x
