"""Mixed-modal sampling with causal routing and a KV cache (`mmtok generate`).

Text continues as text. When the model emits `<boi>` (or the prompt ends with one),
exactly the image's code count of image tokens follows, sampled only from the image
range, then `<eoi>` is forced and text resumes. A `<boi>` is allowed only while the token
cap leaves room for a whole image block, so every output is well formed. Sampling stops
at `<eod>` or at the cap.

Expert choice and Mixture-of-Depths decide over a whole batch, which decoding cannot see:
every token here is routed by the auxiliary routers (`routing="causal"`), so with the KV
cache each new token costs one pass over one position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mmtok.trainer.model import Decoder


@dataclass
class Sampling:
    max_tokens: int = 256  # new tokens at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


class Constraint:
    """Which ids may come next, from the sequence so far (the image-block grammar)."""

    def __init__(self, vocab: dict, prompt: np.ndarray):
        s = vocab["specials"]
        self.boi, self.eoi, self.eod = s["<boi>"], s["<eoi>"], s["<eod>"]
        self.image_range, self.text_range = tuple(vocab["image_range"]), tuple(vocab["text_range"])
        self.n_codes = int(vocab["image_tokens_per_image"])
        # a prompt may end inside an image block (`--generate-image` ends it with <boi>)
        opened = np.flatnonzero(prompt == self.boi)
        self.in_block = bool(len(opened)) and not (prompt[opened[-1]:] == self.eoi).any()
        self.codes_left = self.n_codes - (len(prompt) - 1 - opened[-1]) if self.in_block else 0

    def allowed(self, vocab_size: int, room: int) -> torch.Tensor:
        """Bool mask over the vocabulary; `room` = new tokens the cap still allows."""
        ok = torch.zeros(vocab_size, dtype=torch.bool)
        if self.codes_left > 0:
            ok[slice(*self.image_range)] = True
        elif self.in_block:
            ok[self.eoi] = True
        else:
            ok[slice(*self.text_range)] = True
            ok[self.eod] = True
            ok[self.boi] = room >= self.n_codes + 2  # <boi> + codes + <eoi> must fit
        return ok

    def step(self, token: int) -> None:
        if token == self.boi:
            self.in_block, self.codes_left = True, self.n_codes
        elif self.codes_left > 0:
            self.codes_left -= 1
        elif token == self.eoi:
            self.in_block = False


def sample_next(logits: torch.Tensor, allowed: torch.Tensor, s: Sampling, gen: torch.Generator) -> int:
    logits = logits.float().masked_fill(~allowed, float("-inf"))
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, -1)
    if s.top_p < 1.0:  # nucleus: the smallest set of ids whose probability reaches top_p
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < s.top_p
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def untrained_aux_routers(path: str, model: Decoder) -> str | None:
    """A warning when `model` routes by expert choice but the run at `path` (or the run an
    export came from) never trained its auxiliary routers, which generation routes by: they
    are then still at their initial weights. None when trained, or when it cannot be told."""
    import json
    from pathlib import Path

    from mmtok.trainer.model import is_aux_param
    from mmtok.trainer.aux_routers import AUX_REPORT

    if model.cfg.aux_routers == "joint" or not any(is_aux_param(n) for n, _ in model.named_parameters()):
        return None
    run, plan = Path(path), "PLAN"
    try:
        meta = json.loads((run / "config.json").read_text())
        if meta.get("format"):  # an `mmtok export`: look at the run it came from
            run = Path(meta["source_run"])
            meta = json.loads((run / "config.json").read_text())
        plan = meta.get("plan") or plan
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # the source run is gone or unreadable: nothing to tell
    if (run / AUX_REPORT).exists():
        return None
    return (f"{run}: the auxiliary routers of this {model.cfg.model} model were never trained, and generation routes "
            "every token through them (causal routing), so its output is close to random; train them first: "
            f"mmtok train --train-aux-routers --resume --plan {plan} --out {run}")


@torch.no_grad()
def generate(model: Decoder, prompt: np.ndarray, vocab: dict, s: Sampling, use_cache: bool = True,
             progress: bool = False) -> np.ndarray:
    """New ids after `prompt` (1-D ids, no `<eod>`), one document."""
    cfg = model.cfg
    if len(prompt) == 0:
        raise ValueError("the prompt is empty; give some text or an image")
    if len(prompt) + s.max_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt ({len(prompt)} tokens) + --max-tokens {s.max_tokens} exceeds the model's sequence "
                         f"length {cfg.max_seq_len}; lower --max-tokens")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(s.seed)
    rule = Constraint(vocab, np.asarray(prompt))
    seq = torch.as_tensor(np.asarray(prompt, np.int64), device=device).unsqueeze(0)
    cache = [{} for _ in model.layers] if use_cache else None
    new: list[int] = []
    feed = seq
    from mmtok.runner import progress_bar

    with progress_bar("generate", s.max_tokens, 0, progress) as bar:  # total: the cap (<eod> may stop it sooner)
        while len(new) < s.max_tokens:
            n = seq.shape[1]
            start = n - feed.shape[1]
            positions = torch.arange(start, n, device=device, dtype=torch.int32).unsqueeze(0)
            logits, _ = model(feed, positions, torch.ones_like(feed, dtype=torch.int32), "causal", cache)
            allowed = rule.allowed(cfg.vocab_size, s.max_tokens - len(new))
            token = sample_next(logits[0, -1].cpu(), allowed, s, gen)
            new.append(token)
            bar.advance()
            rule.step(token)
            if token == rule.eod:
                break
            seq = torch.cat([seq, seq.new_tensor([[token]])], 1)
            feed = seq[:, -1:] if use_cache else seq
    return np.asarray(new, np.int64)


def generate_to_files(checkpoint: str, tokdir: str, out: str, prompt: str = "", image: str | None = None,
                      s: Sampling = Sampling(), generate_image: bool = False, device: str | None = None,
                      use_cache: bool = True, progress: bool = False) -> dict:
    """Prompt (an image, then text) -> `OUT/generation.json` and one PNG per generated image.
    `device` None or "auto": CUDA when present, else CPU."""
    import json
    import time
    from pathlib import Path

    from mmtok.shards import atomic_write
    from mmtok.tokenize import Tokenizer
    from mmtok.trainer.evaluate import check_tokenizer, check_vocab
    from mmtok.trainer.export import load_model

    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = Tokenizer.load(tokdir, device=device)
    model, cfg = load_model(checkpoint)
    notes = [n for n in [untrained_aux_routers(checkpoint, model)] if n]  # for the caller to show
    vocab = tok.vocab.to_dict()
    check_vocab(vocab, cfg, f"tokenizer {tokdir}")
    check_tokenizer(tok.fingerprint(), cfg, f"tokenizer {tokdir}")
    segments = ([Path(image).read_bytes()] if image else []) + ([prompt] if prompt else [])
    if not segments and not generate_image:
        raise ValueError("give --prompt, --image or --generate-image")
    try:
        ids = tok.encode(segments)[:-1].astype(np.int64)  # drop <eod>: the document goes on
    except ValueError as e:  # the image does not open
        if image is None:
            raise
        raise ValueError(f"--image {image}: {e}") from None
    if generate_image:
        ids = np.append(ids, tok.boi)
    model.to(device)
    t0 = time.perf_counter()
    new = generate(model, ids, vocab, s, use_cache, progress)
    seconds = time.perf_counter() - t0
    full = np.concatenate([ids, new])
    full = full[:-1] if len(full) and full[-1] == tok.eod else full
    parts = tok.split(full)
    prompt_images = 1 if image else 0
    codes = [c for kind, c in parts if kind == "image"][prompt_images:]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, picture in enumerate(tok.decode_images(np.stack(codes)) if codes else []):
        files.append(str(out / f"image-{i}.png"))
        picture.save(files[-1])
    result = {"checkpoint": str(checkpoint), "tokenizer": str(tokdir), "prompt": prompt, "image": image,
              "prompt_ids": ids.tolist(), "new_ids": new.tolist(), "text": tok.decode_text(new),
              "images": files, "new_tokens": len(new), "stopped": "eod" if len(new) and new[-1] == tok.eod else "cap",
              "seconds": seconds, "tokens_per_s": len(new) / max(seconds, 1e-9), "kv_cache": use_cache,
              "sampling": {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed},
              "notes": notes}
    atomic_write(out / "generation.json", json.dumps(result, indent=1).encode())
    return result
