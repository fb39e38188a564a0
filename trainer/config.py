"""Model and run configuration as plain data: presets, TOML files, CLI overrides.

A run's resolved config (model + training) is saved as `RUN/config.json`; everything
that reads a run (resume, export, eval) rebuilds the model from that file. The same
config is saved as `RUN/config.toml` too, a file `--config` accepts (`to_toml`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from mmtok.plan import parse_layout

# Sizes from MoMa's Table 1 (layers, width, heads; FFN = 4x width). `tiny` is ours: a
# CPU step in well under a second at sequence length 128-256.
PRESETS = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, ffn_hidden=192),
    "90m": dict(n_layers=8, d_model=512, n_heads=8, ffn_hidden=2048),
    "435m": dict(n_layers=24, d_model=1024, n_heads=16, ffn_hidden=4096),
    "1.4b": dict(n_layers=24, d_model=2048, n_heads=16, ffn_hidden=8192),
}
MODELS = ("dense", "moe", "moma", "mod-moma", "mot")  # mod-moma: MoMa + Mixture-of-Depths; mot: Mixture-of-Transformers
ROUTINGS = ("expert-choice", "top2")
ATTENTIONS = ("sdpa", "flex")
# Allowed ranges of the numeric settings: (low, high, low excluded); None = unbounded. Their
# types come from the defaults, so a TOML `lr = "fast"` or `n_layers = 2.5` is refused by name.
RANGES = {
    "vocab_size": (1, None), "n_layers": (1, None), "d_model": (1, None), "n_heads": (1, None),
    "ffn_hidden": (1, None), "max_seq_len": (1, None), "capacity_factor": (0, None, True),
    "rope_theta": (0, None, True), "norm_eps": (0, None, True), "z_loss": (0, None), "balance_loss": (0, None), "router_z_loss": (0, None),
    "steps": (1, None), "grad_accum": (1, None), "ckpt_every": (1, None), "log_every": (1, None),
    "lr": (0, None, True), "min_lr_ratio": (0, 1), "warmup": (0, None), "weight_decay": (0, None),
    "grad_clip": (0, None, True),
}


def check_values(cls, values: dict, where: str = "") -> None:
    """Refuse a setting of the wrong type or out of its range (RANGES), naming the key;
    `where` (e.g. "run.toml [model] ") says where the value came from."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, kind = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif isinstance(default, float):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        else:
            continue
        lo, hi, lo_open = (*RANGES.get(key, (None, None)), False)[:3]
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value <= hi
        if not ok:
            bounds = [f"{'>' if lo_open else '>='} {lo}"] * (lo is not None) + [f"<= {hi}"] * (hi is not None)
            raise ValueError(f"{where}{key} = {value!r}: expected {kind}{' ' + ' and '.join(bounds) if bounds else ''}")


@dataclass
class ModelConfig:
    model: str = "dense"  # dense | moe | moma
    vocab_size: int = 65536
    image_range: tuple[int, int] = (57344, 65536)  # half-open; a token is an image token iff its id is in it
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    ffn_hidden: int = 192
    experts: str = ""  # moe: "8" (number of experts); moma: "4t4i"
    routing: str = "expert-choice"  # moe only; moma always uses expert choice inside each group
    capacity_factor: float = 1.0
    swin_norm: bool = False  # Chameleon's norm reordering: normalise the block outputs
    # Chameleon's own variants (its checkpoints load with them: trainer/hf_export.py): QK-norm
    # "rms" (one RMSNorm gain shared by the heads) or "chameleon" (LayerNorm per head, with a
    # weight and bias per head), and the eps of the blocks' and the final RMSNorm.
    qk_norm: str = "rms"
    norm_eps: float = 1e-5
    attention: str = "sdpa"  # sdpa | flex
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    z_loss: float = 1e-5  # Chameleon: 1e-5 * log^2 Z
    balance_loss: float = 0.01  # top2 only
    router_z_loss: float = 1e-3  # top2 only
    # MoMa complete (issue 7): Mixture-of-Depths share of tokens through routed layers,
    # Gumbel-sigmoid noise on expert-choice router logits (upcycled training), and whether
    # the auxiliary routers train alongside the model ("joint") or in a later stage ("stage").
    mod_capacity: float = 0.25
    router_noise: str = "none"  # none | gumbel
    aux_routers: str = "stage"  # stage | joint
    # Fingerprint of the tokenizer whose ids the model reads (mmtok.tokenize.Tokenizer.fingerprint,
    # from the plan); eval and generate refuse data or a tokenizer with another. "" = not recorded.
    tokenizer: str = ""

    def __post_init__(self):
        check_values(ModelConfig, self.__dict__)
        self.image_range = tuple(self.image_range)
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"unknown routing {self.routing!r}; choose one of {', '.join(ROUTINGS)}")
        if self.qk_norm not in ("rms", "chameleon"):
            raise ValueError(f"unknown qk_norm {self.qk_norm!r}; choose rms or chameleon")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTIONS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.router_noise not in ("none", "gumbel"):
            raise ValueError(f"unknown router noise {self.router_noise!r}; choose none or gumbel")
        if self.aux_routers not in ("stage", "joint"):
            raise ValueError(f"unknown aux-routers mode {self.aux_routers!r}; choose stage or joint")
        if not 0 < self.mod_capacity <= 1:
            raise ValueError(f"mod_capacity must be in (0, 1] (got {self.mod_capacity})")
        if self.model in ("moma", "mod-moma"):
            parse_layout(self.experts)
        elif self.model == "moe":
            if not str(self.experts).isdigit() or int(self.experts) < 2:
                raise ValueError(f"--model moe needs --experts N with N >= 2 (got {self.experts!r})")
        lo, hi = self.image_range
        if not 0 <= lo <= hi <= self.vocab_size:
            raise ValueError(f"image_range {self.image_range} does not fit in vocab_size {self.vocab_size}")

    @property
    def groups(self) -> list[tuple[str, int]]:
        """Expert groups as (name, experts): moma -> text + image, moe -> one group."""
        if self.model in ("moma", "mod-moma"):
            t, i = parse_layout(self.experts)
            return [("text", t), ("image", i)]
        if self.model == "moe":
            return [("all", int(self.experts))]
        return []


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    grad_accum: int = 1  # plan steps (micro-batches per rank) per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 50
    log_every: int = 1
    compile: bool = False
    act_ckpt: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    loop_plan: bool = False  # go through the plan again at its end instead of refusing to start

    def __post_init__(self):
        check_values(TrainConfig, self.__dict__)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas = {list(self.betas)!r}: expected two numbers in [0, 1), e.g. [0.9, 0.95]")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"mixed_precision must be auto, bf16 or fp32 (got {self.mixed_precision!r})")
        for name in ("steps", "grad_accum", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (got {getattr(self, name)})")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    plan: str = ""
    preset: str = "tiny"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def checkpoint_meta(self, world: int) -> dict:
        """train_state.json's fields beside step and world_size, for a run of `world` processes."""
        return {"global_batch": world * self.train.grad_accum, "model": self.as_dict()["model"], "plan": self.plan}

    @classmethod
    def from_dict(cls, d: dict, where: str = "the run's config.json") -> "RunConfig":
        """A saved config back; a hand-edited one that lacks a key or holds a bad value is
        refused with ValueError naming `where` and the key."""
        for part in ("model", "train"):
            if not isinstance(d, dict) or not isinstance(d.get(part), dict):
                raise ValueError(f"{where}: missing the {part!r} table; restore it or start a new run")
        try:
            return cls(model=ModelConfig(**d["model"]), train=TrainConfig(**d["train"]), plan=d.get("plan", ""),
                       preset=d.get("preset", ""))
        except TypeError as e:  # an unknown or missing key: the dataclass names it
            raise ValueError(f"{where}: {e}; restore it or start a new run") from None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _known(cls, section: dict, where: str) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return section


def parse_sets(sets: list[str]) -> dict[str, dict]:
    """`--set train.lr=3e-4` (repeatable) -> {"train": {"lr": 3e-4}}. A value is read as TOML
    (3e-4, true, [0.9, 0.95]) except for text settings, which take it as written (experts=8
    stays "8"); the key and the value are checked by name like a TOML file's."""
    out: dict[str, dict] = {"model": {}, "train": {}}
    classes = {"model": ModelConfig, "train": TrainConfig}
    for item in sets:
        key, eq, raw = item.partition("=")
        table, dot, name = key.strip().partition(".")
        if not eq or not dot or table not in classes:
            raise ValueError(f"--set {item!r}: expected model.KEY=VALUE or train.KEY=VALUE, e.g. --set train.lr=3e-4")
        cls = classes[table]
        _known(cls, {name: None}, f"--set {item!r}")
        default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
        raw = raw.strip()
        value = raw
        if not isinstance(default, str):
            try:
                value = tomllib.loads(f"v = {raw}")["v"]
            except tomllib.TOMLDecodeError:
                pass  # left as text: check_values names the key and the type it wants
        check_values(cls, {name: value}, f"--set {table}.")
        out[table][name] = value
    return out


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # repr of a float (1e-05, inf) is valid TOML
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)  # a JSON string is a TOML basic string


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as a TOML file that `--config` reads back to the same config."""
    d = cfg.as_dict()
    lines = ["# Written by `mmtok train`: the resolved config of this run. Give it to",
             "# `mmtok train --config` to train the same model again.",
             f"preset = {_toml_value(d['preset'])}", f"plan = {_toml_value(d['plan'])}"]
    for table in ("model", "train"):
        lines += ["", f"[{table}]"] + [f"{k} = {_toml_value(v)}" for k, v in d[table].items()]
    return "\n".join(lines) + "\n"


def resolve(preset: str | None, model_overrides: dict, train_overrides: dict, toml_path: str | Path | None = None,
            vocab: dict | None = None, seq_len: int | None = None, plan: str = "",
            tokenizer: str | None = None, base: RunConfig | None = None, sets: list[str] = ()) -> RunConfig:
    """Preset (or `base`, the run being resumed) < TOML file (`[model]`, `[train]`) <
    command-line overrides (None = not given) < `--set` (`sets`).

    With `base`, its model and training settings replace the defaults, so a resumed run
    needs no options repeated; a preset given explicitly still applies its sizes on top.
    `vocab` (from the plan) fixes the vocabulary size and image range, `tokenizer` (the
    plan's tokenizer fingerprint) the model's; `seq_len` sets the rotary table length.
    """
    data: dict = {}
    if toml_path:
        try:
            data = tomllib.loads(Path(toml_path).read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{toml_path}: not valid TOML ({e})") from None
        preset = preset or data.get("preset")  # a saved config.toml names its preset
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS):
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = parse_sets(list(sets))
    if base is not None:
        d = base.as_dict()
        model, train = d["model"], d["train"]
        if preset is not None and preset != base.preset:
            model.update(PRESETS[preset])
        preset = preset or base.preset
    else:
        preset = preset or "tiny"
        model, train = dict(PRESETS[preset]), {}
    for table, cls, into in (("model", ModelConfig, model), ("train", TrainConfig, train)):
        section = data.get(table, {})
        if not isinstance(section, dict):
            raise ValueError(f"{toml_path}: `{table}` must be a table ([{table}])")
        check_values(cls, _known(cls, section, f"{toml_path} [{table}]"), f"{toml_path} [{table}] ")
        into.update(section)
    model.update({k: v for k, v in model_overrides.items() if v is not None})
    train.update({k: v for k, v in train_overrides.items() if v is not None})
    model.update(overrides["model"])
    train.update(overrides["train"])
    if vocab is not None:
        for key in ("vocab_size", "image_range"):
            want = int(vocab[key]) if key == "vocab_size" else tuple(vocab[key])
            have = model.get(key)
            if have is not None and (tuple(have) if key == "image_range" else int(have)) != want:
                raise ValueError(f"the plan {plan} was made for {key} {want}, the config asks for {have}; "
                                 "use a plan tokenized with the model's vocabulary, or drop the setting")
            model[key] = want
    if tokenizer:
        model["tokenizer"] = tokenizer
    if seq_len is not None:
        if model.get("max_seq_len", seq_len) < seq_len:
            raise ValueError(f"the plan {plan} has sequences of {seq_len} tokens, longer than max_seq_len "
                             f"{model['max_seq_len']}; make the plan with --seq-len {model['max_seq_len']} or raise max_seq_len")
        model["max_seq_len"] = int(model.get("max_seq_len", seq_len))
    return RunConfig(model=ModelConfig(**model), train=TrainConfig(**train), plan=plan, preset=preset)
