"""A stage on several processes (torchrun's ranks): each rank runs the stage over its share
of the input shards into OUT/_parts/, and rank 0 joins the parts in rank order, so the
result is the one-process output byte for byte."""

from __future__ import annotations

import collections
import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from mmtok.dispatch import Item, Quarantined
from mmtok.locks import exclusive
from mmtok.packing import STATS_DIR, Sample
from mmtok.runner import Summary, _check_stage_file, check_paths, disk_full_resumes, input_listing, run_stage
from mmtok.shards import MANIFEST, QUARANTINE, STAGE_FILE

PARTS = "_parts"  # in OUT: each rank's share, a stage output of its own, until rank 0 joins them
_INDEX_COLUMNS = ("key", "shard", "group", "modality", "sha256", "members", "_item")  # what _OpenShard.add sets


def split_shares(weights: list[int], world_size: int) -> list[tuple[int, int]]:
    """[start, end) runs of the input shards, one per rank, of about equal total weight
    (items). Contiguous, so the ranks' results, taken in rank order, are in input order."""
    cum = [0]
    for w in weights:
        cum.append(cum[-1] + w)
    starts = [0]
    for r in range(1, world_size):
        target = cum[-1] * r / world_size
        j = min(range(starts[-1], len(cum)), key=lambda j: (abs(cum[j] - target), j))
        starts.append(j)
    return list(zip(starts, starts[1:] + [len(weights)]))


def run_stage_ranks(stage: str, items_of: Callable[[int, int], Iterable[Item]], fn: Callable, out: str | Path, *,
                    config: dict, weights: list[int], rank: int, world_size: int, total: int | None = None,
                    progress: bool = True, overwrite: bool = False, max_error_rate: float = 0.05,
                    max_count: int = 10_000, max_size: int = 1 << 30, **kwargs) -> Summary | None:
    """`run_stage` on `world_size` processes (torchrun's ranks; a torch.distributed barrier).

    Rank r runs the stage over `items_of(start, end)`, its contiguous share of the input
    shards (`weights`: items per input shard), into OUT/_parts/rank-R-of-W, a stage output of
    its own that resumes like any other. When every rank is done, rank 0 feeds the parts'
    results, part after part, through `run_stage` into OUT: the same items, in the same
    order, with the same results as one process, so OUT (shards, index, manifest,
    quarantine, stats records) is byte for byte what one process writes, provided `fn`
    gives an item the same result whatever else is in its model batch (and the stage does
    not dedup: duplicates would be found per part). The join copies the parts' bytes once
    (rank 0's I/O, no model work), then deletes OUT/_parts. Returns the summary on rank 0,
    None on the others. (mmtok.actors runs the same shares on Ray actors.)
    """
    out, t0 = Path(out), time.perf_counter()
    finished = shares_finished(stage, out, config, overwrite, check=rank == 0)
    if not finished:  # a rerun of a finished job has nothing to stage: its join below is empty
        run_share(stage, items_of, fn, out, config=config, weights=weights, rank=rank, world_size=world_size,
                  progress=progress and rank == 0, overwrite=overwrite, max_count=max_count, max_size=max_size,
                  **kwargs)
    _barrier()
    if rank != 0:
        return None
    summary = join_shares(stage, out, world_size, finished=finished, config=config, total=total, overwrite=overwrite,
                          max_error_rate=max_error_rate, max_count=max_count, max_size=max_size)
    summary.seconds = round(time.perf_counter() - t0, 3)  # the whole job's, not the join's alone
    return summary


def shares_finished(stage: str, out: Path, config: dict, overwrite: bool, check: bool) -> bool:
    """Whether OUT already holds this job, finished. If not and `check` (rank 0, or the Ray
    driver), an OUT of another job is refused now, not after the shares are done."""
    check_paths(config.get("inputs", ()), out)
    listing = input_listing(config.get("inputs", ()))
    want = {"stage": stage, "config": config, "inputs": listing}
    try:
        finished = (out / MANIFEST).is_file() and json.loads((out / STAGE_FILE).read_text()) == want
    except (OSError, ValueError):
        finished = False
    if not finished and check:
        with disk_full_resumes(out), exclusive(out):
            _check_stage_file(out, stage, config, listing, overwrite)
    return finished


def _part(out: Path, rank: int, world_size: int) -> Path:
    return out / PARTS / f"rank-{rank:05d}-of-{world_size:05d}"


def run_share(stage: str, items_of: Callable[[int, int], Iterable[Item]], fn: Callable, out: Path, *, config: dict,
              weights: list[int], rank: int, world_size: int, **kwargs) -> Summary:
    """Share `rank` of `world_size` (`split_shares`) through `run_stage` into its part of OUT.
    Its own quarantine never fails it: the join counts the error rate over every share."""
    start, end = split_shares(weights, world_size)[rank]
    return run_stage(stage, items_of(start, end), fn, _part(out, rank, world_size),
                     config={**config, "rank": rank, "world_size": world_size, "share": [start, end]},
                     max_error_rate=1.0, **kwargs)


def join_shares(stage: str, out: Path, world_size: int, *, finished: bool, config: dict, total: int | None,
                overwrite: bool, max_error_rate: float, max_count: int, max_size: int) -> Summary:
    """The parts' results, part after part, through `run_stage` into OUT (nothing to feed
    when OUT is `finished`), then OUT/_parts deleted."""
    import shutil

    parts = [] if finished else [_part(out, r, world_size) for r in range(world_size)]
    joined = (item for part in parts for item in _part_results(part))
    summary = run_stage(stage, joined, lambda results: results, out, config=config, total=total, progress=False,
                        overwrite=overwrite, max_error_rate=max_error_rate, max_count=max_count, max_size=max_size)
    shutil.rmtree(out / PARTS, ignore_errors=True)  # our own staging area: every part is in OUT now
    return summary


def _barrier() -> None:
    import datetime

    import torch.distributed as dist

    ours = not dist.is_initialized()
    if ours:  # torchrun's env:// rendezvous; gloo runs on CPU-only machines too
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))  # shares may take hours
    dist.barrier()
    if ours:
        dist.destroy_process_group()


def _part_results(part: Path) -> Iterator[Item]:
    """A finished part's results, item by item in its input order, as run_stage emitted them."""
    from mmtok.shards import read_jsonl

    n = json.loads((part / MANIFEST).read_text())["totals"]["inputs"]
    samples: dict[int, list] = collections.defaultdict(list)
    for p in (part / STATS_DIR).glob("*.json"):
        st = json.loads(p.read_text())
        for row in st["index"]:
            samples[row["_item"][0]].append((row["_item"][1], st["name"], row))
    quarantined: dict[int, list] = collections.defaultdict(list)
    for rec in read_jsonl(part / QUARANTINE) if (part / QUARANTINE).exists() else []:
        quarantined[rec["index"]].append(Quarantined(rec["input"], rec["reason"], rec.get("counts", True)))
    with contextlib.ExitStack() as stack:
        files: dict[str, Any] = {}
        for i in range(n):
            results = []
            for _, shard, row in sorted(samples.pop(i, []), key=lambda t: t[0]):
                if shard not in files:
                    files[shard] = stack.enter_context(open(part / shard, "rb"))
                f, members = files[shard], {}
                for m in sorted(row["members"], key=lambda m: m["offset"]):  # the order they were written in
                    f.seek(m["offset"])
                    members[m["ext"]] = f.read(m["size"])
                meta = json.loads(members.pop("json"))
                results.append(Sample(row["key"], row["group"], members, meta,
                                      {k: v for k, v in row.items() if k not in _INDEX_COLUMNS}))
            yield Item(f"{part.name}:{i}", results + quarantined.pop(i, []))
