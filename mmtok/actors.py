"""Where a model-backed stage runs (`spread`): this process, torchrun's ranks, or Ray actors
(`tokenize-images` / `tokenize --backend ray`).

Each actor builds the stage once from a small recipe (paths and numbers: the tokenizer
loads on the actor's own GPU, or CPU) and runs one share of the input shards, the split
torchrun's ranks use (mmtok.ranks), into OUT/_parts/rank-R-of-N. The driver then joins
the parts exactly as rank 0 does, so OUT is byte for byte the one-process output. What
crosses to an actor: the recipe, the job's config, the per-shard item counts and a share
number; never image bytes (each actor reads its own inputs) and never a model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mmtok.dispatch import StageError, ray_session
from mmtok.ranks import join_shares, run_share, run_stage_ranks, shares_finished
from mmtok.runner import Summary, progress_bar, run_stage


@dataclass
class Share:
    """What the driver sends an actor for one share (all of it small, tested so)."""

    out: str  # OUT, absolute: the part goes under it, on a filesystem every node sees
    config: dict  # the job's config, as the driver built it
    weights: list[int]  # items per input shard
    rank: int
    world_size: int
    overwrite: bool
    max_count: int
    max_size: int


class Encoder:
    """A Ray actor: the stage, built once on this actor's device, runs shares of it and
    counts the items done, which the driver reads while `run` goes on (two threads)."""

    def __init__(self, make_stage: Callable[[str], object], device: str, cwd: str):
        if os.path.isdir(cwd):  # relative input paths mean what they mean on the driver
            os.chdir(cwd)
        self.stage, self.error, self.done = None, "", 0
        try:
            self.stage = make_stage(device)
        except Exception as e:  # a tokenizer missing on this node, say: reported by `run`, in one line
            self.error = f"{type(e).__name__}: {e}"

    def run(self, share: Share) -> None:
        """Run the share into its part."""
        s, node = self.stage, os.uname().nodename
        if s is None:
            raise StageError(f"the stage does not start on Ray node {node}: {self.error}")
        if s.config != share.config:  # another tokenizer or other inputs at these paths on this node
            raise StageError(f"{s.name} on Ray node {node} sees other inputs or another tokenizer than the driver "
                             "at the same paths; install the same files on every node")
        run_share(s.name, s.items, s, Path(share.out), config=share.config, weights=share.weights, rank=share.rank,
                  world_size=share.world_size, batch_fn=s.batch, batch_size=s.batch_size, progress=self._tell,
                  overwrite=share.overwrite, max_count=share.max_count, max_size=share.max_size)

    def _tell(self, n: int) -> None:
        self.done += n

    def items_done(self) -> int:
        return self.done


def actor_plan(ray, actors: int | None, workers: int, device: str | None) -> tuple[int, dict, str]:
    """(how many actors, each one's Ray resources, its torch device): one per GPU of the
    cluster (unless --device cpu), else `actors` or `workers` CPU actors of one CPU each.
    More actors than the cluster can place would wait forever: refused."""
    have = ray.cluster_resources()
    gpus = 0 if str(device).startswith("cpu") else int(have.get("GPU", 0))
    if gpus:
        n = actors or gpus
        if n > gpus:
            raise StageError(f"--actors {n}: the Ray cluster has {gpus} GPUs, one actor each; use --actors {gpus} "
                             "or fewer")
        return n, {"num_gpus": 1, "num_cpus": 0}, "cuda"  # Ray gives each actor its own CUDA_VISIBLE_DEVICES
    if device is not None and not str(device).startswith("cpu"):
        raise StageError(f"--device {device}: the Ray cluster has no GPUs; leave --device out to use its CPUs")
    n, cpus = actors or workers, int(have.get("CPU", 0))
    if n > cpus:
        raise StageError(f"{n} actors of one CPU each: the Ray cluster has {cpus} CPUs; use --actors {cpus} or fewer")
    return n, {"num_cpus": 1}, "cpu"  # Ray sets OMP_NUM_THREADS=1 in a 1-CPU actor: one core each


def run_stage_actors(stage: str, make_stage: Callable[[str], object], out: str | Path, *, config: dict,
                     weights: list[int], actors: int | None = None, workers: int = 1, device: str | None = None,
                     total: int | None = None, overwrite: bool = False, max_error_rate: float = 0.05,
                     max_count: int = 10_000, max_size: int = 1 << 30, progress: bool = False) -> Summary:
    """`run_stage_ranks` with Ray actors for the ranks and this process (the driver) doing
    rank 0's join: `make_stage(device)` builds the stage in each actor (with the driver's
    `config`). `actors`: how many (default: one per GPU of the cluster, else `workers`).
    `progress`: the driver's bar, over `total` items, counts what every actor has done."""
    out = Path(out)
    finished = shares_finished(stage, out, config, overwrite, check=True)
    n = 0  # a finished job has no parts to join
    if not finished:
        with contextlib.ExitStack() as stack:
            ray = ray_session(max(workers, actors or 1), stack)
            n, resources, actor_device = actor_plan(ray, actors, workers, device)
            encoder = ray.remote(**resources, max_concurrency=2)(Encoder)  # `items_done` answers during `run`
            shares = [Share(str(out.resolve()), config, weights, r, n, overwrite, max_count, max_size)
                      for r in range(n)]
            pool = [encoder.remote(make_stage, actor_device, os.getcwd()) for _ in range(n)]
            refs = [a.run.remote(s) for a, s in zip(pool, shares)]
            try:
                with progress_bar(stage, total, 0, progress) as bar:
                    running = refs
                    while running:
                        _, running = ray.wait(running, num_returns=len(running), timeout=0.5)
                        bar.set(sum(ray.get([a.items_done.remote() for a in pool])))
                ray.get(refs)
            except ray.exceptions.RayTaskError as e:  # the stage raised in an actor: its own message
                cause = e.cause if isinstance(e.cause, Exception) else e
                raise StageError(f"{stage} on Ray: {cause}") from None
            except ray.exceptions.RayError as e:  # an actor died or its node was lost
                raise StageError(f"a Ray actor failed ({type(e).__name__}: {e}); rerun the same command to "
                                 "resume") from None
    return join_shares(stage, out, n, finished=finished, config=config, total=total,
                       overwrite=overwrite, max_error_rate=max_error_rate, max_count=max_count, max_size=max_size)


def check_placement(backend: str, actors: int | None, world_size: int) -> None:
    """Refuse what `spread` cannot do (the CLI asks before it starts torchrun)."""
    if actors is not None and backend != "ray":
        raise StageError("--actors sets the Ray actors of --backend ray; for processes on this machine use --nproc")
    if backend == "ray" and world_size > 1:
        raise StageError("--backend ray runs its own actors, one share each; run it once, not under torchrun")


def spread(stage, out: str | Path, *, weights: list[int], rank: int, world_size: int, backend: str, workers: int,
           actors: int | None, progress: bool, **kwargs) -> Summary | None:
    """A model-backed stage (a `mmtok.runner.Stage` with `batch`, `batch_size`, `reads` and a
    picklable `recipe(device)` that builds it again) over every input shard in this process;
    over this rank's share when `world_size` > 1 (`run_stage_ranks`: rank 0 joins, the
    others return None); with backend "ray", over one share per Ray actor, joined here."""
    check_placement(backend, actors, world_size)
    if backend == "ray":
        return run_stage_actors(stage.name, stage.recipe, out, config=stage.config, weights=weights, actors=actors,
                                workers=workers, device=stage.tok.device, progress=progress, **kwargs)
    common = dict(config=stage.config, batch_fn=stage.batch, batch_size=stage.batch_size, workers=workers,
                  backend=backend, progress=progress, **kwargs)
    if world_size == 1:
        return run_stage(stage.name, stage.items(0, None), stage, out, **common)
    return run_stage_ranks(stage.name, stage.items, stage, out, weights=weights, rank=rank, world_size=world_size,
                           **common)
