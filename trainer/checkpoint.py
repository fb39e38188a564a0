"""One checkpoint manager for every job, and one way to load a run.

A run's checkpoints live in `checkpoints/step-NNNNNNNN/`: torch.distributed.checkpoint
files (model + optimizer), `train_state.json` (step, world size, global batch and the
job's own fields), `rank-R.json` (that rank's loader position and RNG state) and
`checksums.json` (written last); `checkpoints/latest` names the newest complete one.

`Checkpointer` saves and restores model, optimizer(s), loader position and RNG for the
training loop, for VQ training (VQ + discriminator, two optimizers) and for the recipes
that derive a checkpoint (aux-router stage, upcycling, --init-from). `load_run` is what every reader of a run uses (export, eval, generate,
upcycle, Uni-MoE's next stage): the newest intact checkpoint as a model in one process,
read through `checkpoint_io` (nothing in it is unpickled freely).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from mmtok.shards import atomic_write, is_count, read_json
from mmtok.trainer import checkpoint_io
from mmtok.trainer.job import CONFIG, RunKind, TrainError, kinds, run_kind

CKPT_DIR, LATEST, TRAIN_STATE = "checkpoints", "latest", "train_state.json"
STEP_NAME = re.compile(r"step-\d{8,}")


class SkippedCheckpoint(UserWarning):
    """--resume passed over a damaged checkpoint for an older intact one."""


def _rng_state() -> dict:
    enc = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    state = {"torch": enc(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = enc(torch.cuda.get_rng_state())
    return state


def _set_rng_state(state: dict) -> None:
    dec = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
    torch.set_rng_state(dec(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(dec(state["cuda"]))


def latest_checkpoint(run: Path) -> Path | None:
    """The checkpoint `latest` names; refused unless it is a step directory of this run."""
    p = run / CKPT_DIR / LATEST
    if not p.exists():
        return None
    name = p.read_text().strip()
    if not STEP_NAME.fullmatch(name):  # never a path: a shared run must not make us read elsewhere
        raise TrainError(f"{p} names {name!r}, not a checkpoint of this run (step-NNNNNNNN); the run was altered")
    path, aside = run / CKPT_DIR / name, run / CKPT_DIR / f".{name}.old"
    if not path.exists() and aside.exists():  # killed while a step was saved again: its previous copy is whole
        os.replace(aside, path)
    if path.is_symlink():
        raise TrainError(f"{path} is a link; a checkpoint must be a directory inside its run")
    return path


def intact_checkpoint(run: Path, fallback: bool = False) -> Path | None:
    """The newest checkpoint whose files match their checksums. Without `fallback` a damaged
    newest one is an error (CheckpointError); with it (--resume), older ones are tried in
    turn, each skip a SkippedCheckpoint warning naming the checkpoint and the damage."""
    newest = latest_checkpoint(run)
    if newest is None:
        return None
    step = lambda p: int(p.name[5:])  # noqa: E731
    older = [p for p in (run / CKPT_DIR).glob("step-*") if STEP_NAME.fullmatch(p.name) and step(p) < step(newest)
             and p.is_dir() and not p.is_symlink()] if fallback else []
    damage = []
    for path in [newest, *sorted(older, key=step, reverse=True)]:
        try:
            checkpoint_io.verify(path)
            return path
        except checkpoint_io.CheckpointError as e:
            if not fallback:
                raise
            damage.append(str(e))
            warnings.warn(f"skipping checkpoint {path.name}: {e}", SkippedCheckpoint, stacklevel=2)
    raise TrainError(f"{run}: no intact checkpoint to resume from ({'; '.join(damage)}); start again in a new --out")


def loader_position(ckpt: Path, rank: int = 0) -> dict:
    """The loader state `rank` saved (rank 0's where the run had fewer ranks: the position is
    one in the plan's global order, the same on every rank)."""
    return _rank_state(ckpt, rank)[0]["loader"]


ALTERED = "the checkpoint was altered: delete that step directory to resume from the one before, or start again"


def _rank_state(ckpt: Path, rank: int) -> tuple[dict, Path]:
    """A rank's rank-R.json (loader position and RNG) and its path, its shape checked: the
    checksums catch damage, not a sender's edit."""
    mine = ckpt / f"rank-{rank}.json"
    path = mine if mine.exists() else ckpt / "rank-0.json"
    state = read_json(path)
    if not (isinstance(state.get("loader"), dict) and isinstance(state.get("rng"), dict)
            and all(isinstance(v, str) for v in state["rng"].values()) and "torch" in state["rng"]):
        raise TrainError(f"{path}: not a loader position and RNG state; {ALTERED}")
    return state, path


def checkpoint_step(ckpt: Path) -> int:
    """The step train_state.json records, checked to be one."""
    step = read_json(ckpt / TRAIN_STATE).get("step")
    if not is_count(step):
        raise TrainError(f"{ckpt / TRAIN_STATE}: step {step!r} is not a step number; {ALTERED}")
    return step


class LoaderState:
    """Stands in for a loader in Checkpointer.load/save: keeps a saved position as it is
    (a checkpoint derived from another one continues its data where it stopped)."""

    def __init__(self, state: dict | None = None):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


class Checkpointer:
    def __init__(self, run: Path, rank: int, world: int, keep: int = 2):
        self.dir, self.rank, self.world, self.keep = run / CKPT_DIR, rank, world, keep

    def _barrier(self):
        if self.world > 1:
            dist.barrier()

    def save(self, step: int, model, optimizer, loader, meta: dict) -> Path:
        """`optimizer`: one, or a tuple over disjoint parameters of `model` (DCP keys each
        state by parameter name). `meta`: train_state.json's fields beside step (the job's `checkpoint_meta`); a
        `world_size` there (a checkpoint derived from another) replaces this group's."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"step-{step:08d}"
        final, tmp = self.dir / name, self.dir / f".{name}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        state = {"loader": loader.state_dict(), "rng": _rng_state()}
        atomic_write(tmp / f"rank-{self.rank}.json", json.dumps(state).encode())
        if self.rank == 0:
            atomic_write(tmp / TRAIN_STATE, json.dumps({"step": step, "world_size": self.world, **meta}, indent=1).encode())
        self._barrier()
        if self.rank == 0:
            checkpoint_io.write_checksums(tmp)  # last: a checkpoint with its list is whole
            aside = self.dir / f".{name}.old"
            if final.exists():  # the same step saved again (aux-router stage): set the old copy aside, never delete first
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
            os.replace(tmp, final)
            atomic_write(self.dir / LATEST, name.encode())
            shutil.rmtree(aside, ignore_errors=True)
            for old in self._saved()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        return final

    def _saved(self) -> list[Path]:
        """The checkpoints this manager wrote, oldest first: a `step-NNNNNNNN` directory with its
        train_state.json. A user's `step-00000050-best` copy or notes are not among them."""
        ours = [p for p in self.dir.iterdir() if STEP_NAME.fullmatch(p.name) and (p / TRAIN_STATE).is_file()]
        return sorted(ours, key=lambda p: int(p.name[5:]))

    def load(self, path: Path, model, optimizer, loader) -> None:
        """Restore `path` (verified by the caller: intact_checkpoint); the job says which step
        it counts from (`Job.first_step`)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        checkpoint_io.load(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        # A run may resume at another world size: DCP reshards the model and optimizer.
        state, where = _rank_state(path, self.rank)
        try:
            loader.load_state_dict(state["loader"])
            _set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a position or RNG state of another shape
            raise TrainError(f"{where}: cannot be restored ({type(e).__name__}: {str(e).splitlines()[0]}); "
                             f"{ALTERED}") from None


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Fill `model` from checkpoint `ckpt` in this process, never unpickling (checkpoint_io)."""
    state = {"model": model.state_dict()}
    checkpoint_io.load(state, ckpt, no_dist=True)
    model.load_state_dict(state["model"])


def read_run_config(run: Path, kind: str | None = None) -> tuple[object, RunKind]:
    """A run's saved configuration and its kind; a folder that is not a run (or not of
    `kind`) is refused naming it."""
    if not (run / CONFIG).exists():
        raise TrainError(f"{run}: not a training run (no {CONFIG}); pass the --out directory of `mmtok train`")
    where = str(run / CONFIG)
    saved = read_json(run / CONFIG)
    found = run_kind(saved, where)
    if kind is not None and found.name != kind:
        raise TrainError(f"{run}: a {found.name} run, not a {kind} one; {kinds()[kind].hint}")
    return found.read_config(saved, where), found


@dataclass
class LoadedRun:
    """A run's newest intact checkpoint, loaded. Unpacks as (model, config, step), the
    public `mmtok.load_run` shape; `checkpoint` and `state` are for recipes deriving a run."""

    model: torch.nn.Module
    config: object  # the kind's config: RunConfig, UniMoERun
    step: int
    checkpoint: Path
    state: dict  # train_state.json

    def __iter__(self):
        return iter((self.model, self.config, self.step))


def load_run(run: str | Path, kind: str | None = None) -> LoadedRun:
    """The model of a run's newest checkpoint, on CPU, in one process, in eval mode (refused
    if damaged, or if `kind` is given and the run is of another kind)."""
    run = Path(run)
    cfg, found = read_run_config(run, kind)
    ckpt = intact_checkpoint(run)
    if ckpt is None:
        raise TrainError(f"{run}: has no checkpoint yet; train it first")
    model = found.build(cfg)
    load_weights(model, ckpt)
    return LoadedRun(model.eval(), cfg, checkpoint_step(ckpt), ckpt, read_json(ckpt / TRAIN_STATE))


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop a log's records past the checkpoint a run resumes from (a killed run may have
    written them); `metrics.Metrics` keeps every job's log so (metrics.jsonl, vq_log.jsonl)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    atomic_write(path, "".join(ln + "\n" for ln in keep).encode())
