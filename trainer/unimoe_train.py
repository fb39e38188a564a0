"""Uni-MoE stages in mmtok's trainer: `train_stage` runs one of align / experts / tune,
`evaluate` scores a run on held-out pairs (text given each modality) and reports which
experts each modality's tokens prefer, per layer.

A stage's run directory is laid out like any `mmtok train` run (config.json,
metrics.jsonl, tb/, checkpoints/ with DCP files and the loader state; the same
training loop, `trainer.train.run_job`), plus `stage.json`: what trained, what was frozen,
and where the starting weights came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmtok.shards import atomic_write
from mmtok.trainer.checkpoint import load_run as _load_run
from mmtok.trainer.config import TrainConfig
from mmtok.trainer.job import CONFIG, RunKind, TrainError, json_bytes
from mmtok.trainer.model import loss_terms, token_nll
from mmtok.trainer.train import LMJob, run_job
from mmtok.trainer.unimoe import STAGES, UniMoE, UniMoEConfig

FORMAT = "mmtok-unimoe-run/1"
STAGE_FILE = "stage.json"


@dataclass
class UniMoERun:
    model: UniMoEConfig
    train: TrainConfig
    stage: str = "align"
    init: str = ""  # the previous stage's run, or a dense `mmtok train` run / export for the decoder
    data: dict = field(default_factory=dict)  # where the pairs came from (recorded, not read back)

    def as_dict(self) -> dict:
        return {"format": FORMAT, "model": self.model.as_dict(), "train": dataclasses.asdict(self.train),
                "stage": self.stage, "init": self.init, "data": self.data}

    def checkpoint_meta(self, world: int) -> dict:
        """train_state.json's fields beside step and world_size (pairs, not a plan: none is named)."""
        return {"global_batch": world * self.train.grad_accum, "model": self.model.as_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "UniMoERun":
        return cls(model=UniMoEConfig(**d["model"]), train=TrainConfig(**d["train"]), stage=d["stage"],
                   init=d.get("init", ""), data=d.get("data", {}))


def _stage_model(cfg: UniMoERun) -> UniMoE:
    model = UniMoE(cfg.model)
    model.set_stage(cfg.stage)  # routing and what trains; the weights' names are the same in every stage
    return model


UNIMOE = RunKind("uni-moe", lambda d, where: UniMoERun.from_dict(d), _stage_model,
                 "pass the --out of `mmtok train --model uni-moe`")


def is_unimoe_run(path: str | Path) -> bool:
    p = Path(path) / CONFIG
    return p.exists() and json.loads(p.read_text()).get("format") == FORMAT


def load_run(run: str | Path) -> tuple[UniMoE, UniMoERun, int]:
    """A uni-moe run's newest checkpoint as a model (CPU, eval mode, set to its stage)."""
    return tuple(_load_run(run, "uni-moe"))


def init_weights(model: UniMoE, cfg: UniMoERun) -> str:
    """Load the starting weights of `cfg.stage`; returns where they came from."""
    if cfg.model.speech_encoder:
        model.load_speech_encoder(cfg.model.speech_encoder)
    if not cfg.init:
        if cfg.stage != "align":
            raise TrainError(f"stage {cfg.stage} starts from the previous stage's run: give --init RUN")
        return "initial weights"
    if is_unimoe_run(cfg.init):
        prev, prev_cfg, step = load_run(cfg.init)
        want = STAGES[STAGES.index(cfg.stage) - 1] if cfg.stage != "align" else None
        if prev_cfg.stage != want:
            raise TrainError(f"{cfg.init} is a run of stage {prev_cfg.stage}; stage {cfg.stage} starts from "
                             + (f"the {want} stage's run" if want else "a dense run or export"))
        if prev_cfg.model != cfg.model:
            diff = [k for k, v in prev_cfg.model.as_dict().items() if cfg.model.as_dict()[k] != v]
            raise TrainError(f"{cfg.init} has another model ({', '.join(diff)} differ); use its model options")
        model.load_state_dict(prev.state_dict())
        return f"{cfg.init} (stage {prev_cfg.stage}, step {step})"
    from mmtok.trainer.export import load_model

    if cfg.stage != "align":
        raise TrainError(f"{cfg.init} is not a uni-moe run; stage {cfg.stage} starts from the previous stage's run")
    dense, dense_cfg = load_model(cfg.init)
    mine = cfg.model.decoder_config()
    for k in ("vocab_size", "n_layers", "d_model", "n_heads", "ffn_hidden", "swin_norm"):
        if getattr(dense_cfg, k) != getattr(mine, k) or dense_cfg.model != "dense":
            raise TrainError(f"{cfg.init}: its decoder ({dense_cfg.model}, {k} {getattr(dense_cfg, k)}) does not fit "
                             f"this uni-moe model ({k} {getattr(mine, k)}); use a dense run of the same size")
    missing, unexpected = model.decoder.load_state_dict(dense.state_dict(), strict=False)
    if unexpected or any(".lora_" not in k and ".router." not in k for k in missing):
        raise TrainError(f"{cfg.init}: its weights do not fit the decoder (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return f"{cfg.init} (dense decoder)"


def modality_nll(logits: torch.Tensor, batch: dict, modalities) -> dict:
    """Per modality of the sample: (sum of NLL, count) of its predicted text tokens, on the device."""
    t = batch["targets"]
    valid = t != -100
    nll = token_nll(logits, t)[0]
    out = {}
    for i, m in enumerate(modalities):
        rows = (batch["sample_modality"] == i)[:, None]
        out[m] = ((nll * rows).sum(), (valid & rows).sum())
    return out


class UniMoEJob(LMJob):
    """One Uni-MoE stage, an `LMJob` of the loop in `trainer.train.run_job`: FSDP2 under
    torchrun, bf16 on GPUs, checkpoints and resume as in any `mmtok train` run."""

    def __init__(self, cfg: UniMoERun, make_loader):
        super().__init__(cfg, make_loader)
        self.source, self.parts = "", {}

    def check_resume(self, saved: dict, where: str) -> None:
        if saved.get("format") != FORMAT or UniMoERun.from_dict(saved).as_dict() != self.cfg.as_dict():
            raise TrainError(f"{where}: was started with other options; resume with the same command line")

    def model(self, device: torch.device) -> UniMoE:
        model = UniMoE(self.cfg.model)
        self.source = init_weights(model, self.cfg)
        self.parts = model.set_stage(self.cfg.stage)
        return model

    def config_files(self) -> dict[str, bytes]:
        return {CONFIG: json_bytes(self.cfg.as_dict())}

    def files(self) -> dict:
        return {STAGE_FILE: {**self.parts, "init": self.source}}

    def forward(self, model, batch: dict) -> tuple[dict, list[dict], dict]:
        logits, stats = model(batch)
        terms = loss_terms(self.cfg.model.decoder_config(), logits, batch["targets"], stats)
        groups = {f"text_given_{m}": v for m, v in modality_nll(logits.detach(), batch, self.cfg.model.modalities).items()}
        return terms, stats, groups

    def summary(self, run: Path, rank: int, step: int, status: str) -> dict:
        # flops_per_token stays None: encoders and connectors are not in the decoder's estimate
        return {**super().summary(run, rank, step, status), "stage": self.cfg.stage, "init": self.source,
                "trained": self.parts["trained"], "frozen": self.parts["frozen"]}


def train_stage(cfg: UniMoERun, run: str | Path, make_loader, **kw) -> dict:
    """Train one stage into `run`; `make_loader(rank, world)` gives a UniMoELoader."""
    return run_job(UniMoEJob(cfg, make_loader), run, **kw)


@torch.no_grad()
def score(model: UniMoE, batches) -> dict:
    """Per modality: loss and perplexity of the text given it; per layer: the share of each
    modality's routed token slots that each expert took (stage tune; empty before)."""
    mods = model.cfg.modalities
    sums = {m: [0.0, 0] for m in mods}
    routing: dict[int, torch.Tensor] = {}
    for batch in batches:
        logits, stats = model(batch)
        for m, (s, n) in modality_nll(logits, batch, mods).items():
            sums[m][0] += float(s)
            sums[m][1] += int(n)
        sample_mod = batch["sample_modality"][:, None].expand_as(batch["input_ids"]).reshape(-1)
        for layer, s in enumerate(stats):
            if "all" not in s or model.stage != "tune":
                continue
            chosen = s["all"]["expert"]
            counts = routing.setdefault(layer, torch.zeros(len(mods), len(mods), dtype=torch.float64))
            for j in range(chosen.shape[1]):
                ok = chosen[:, j] >= 0
                counts.index_put_((sample_mod[ok], chosen[ok, j]), torch.ones(int(ok.sum()), dtype=torch.float64),
                                  accumulate=True)
    out = {"text_given": {}}
    for m, (s, n) in sums.items():
        if n:
            out["text_given"][m] = {"tokens": n, "loss": s / n, "ppl": math.exp(s / n)}
    out["routing"] = {str(layer): {m: (c[i] / c[i].sum().clamp(min=1)).tolist() for i, m in enumerate(mods) if c[i].sum()}
                      for layer, c in routing.items()}
    return out


def evaluate(run: str | Path, batches) -> dict:
    model, cfg, step = load_run(run)
    result = score(model, batches)
    return {"model": str(run), "stage": cfg.stage, "step": step, "experts": list(cfg.model.modalities), **result}


def routing_figure(routing: dict, experts: list):
    """A heatmap per layer (modality x expert: share of the modality's token slots), on one
    0..1 colour scale with its colour bar."""
    import matplotlib.pyplot as plt

    layers = list(routing)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers) + 1, 3), squeeze=False, layout="constrained")
    for ax, layer in zip(axes[0], layers):
        rows = routing[layer]
        im = ax.imshow([rows[m] for m in rows], vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {layer}"), ax.set_xticks(range(len(experts)), experts, rotation=45)
        ax.set_yticks(range(len(rows)), list(rows))
    fig.colorbar(im, ax=axes[0].tolist(), label="share of token slots")
    return fig


def write_report(result: dict, out: str | Path) -> list[str]:
    """eval.json, eval.md (tables) and routing.png (a heatmap per layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "eval.json", out / "eval.md"]
    atomic_write(files[0], json.dumps(result, indent=1, sort_keys=True).encode())
    lines = [f"# Uni-MoE evaluation of {result['model']} (stage {result['stage']}, step {result['step']})", "",
             "| text given | tokens | loss | perplexity |", "| --- | --- | --- | --- |"]
    for m, v in result["text_given"].items():
        lines.append(f"| {m} | {v['tokens']} | {v['loss']:.4f} | {v['ppl']:.3f} |")
    experts = result["experts"]
    if result["routing"]:
        lines += ["", "## Routing: share of each modality's token slots per expert", ""]
        for layer, rows in result["routing"].items():
            lines += [f"### layer {layer}", "", "| modality | " + " | ".join(f"expert {e}" for e in experts) + " |",
                      "| --- " * (len(experts) + 1) + "|"]
            lines += [f"| {m} | " + " | ".join(f"{x:.3f}" for x in share) + " |" for m, share in rows.items()]
            lines.append("")
        fig = routing_figure(result["routing"], experts)
        fig.savefig(out / "routing.png"), plt.close(fig)
        files.append(out / "routing.png")
        lines.append("![routing](routing.png)")
    atomic_write(files[1], ("\n".join(lines) + "\n").encode())
    return [str(f) for f in files]
