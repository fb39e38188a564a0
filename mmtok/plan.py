"""The plan format: a `balance-mix` plan directory, written by `mmtok.mix`, read by
`mmtok.loader` (and `mmtok inspect`). docs/MIXING.md describes the fields.

    PLAN/plan.json      metadata (PLAN_KEYS; `sources` with PLAN_SOURCE_KEYS), written last:
                        a directory with plan.json is a finished plan
    PLAN/<array>.npy    one 1-D integer array per PLAN_ARRAYS name
    PLAN/holdout/<src>/ held-out documents as token shards (when planned with a holdout)

In memory a plan's metadata is the plan.json object except `vocab`, which is a parsed
`mmtok.vocab.Vocab` (checked when read, so a bad vocabulary fails here, naming the file).
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from mmtok.fs import as_location
from mmtok.shards import ShardError, atomic_write, npy_bytes, read_record, require_keys
from mmtok.vocab import Vocab, VocabError

PLAN_FORMAT = "mmtok-plan/1"
PLAN_FILE = "plan.json"
HOLDOUT_DIR = "holdout"
PLAN_ARRAYS = ("mb_ptr", "piece_doc", "piece_start", "piece_len", "piece_seq", "mb_text", "mb_image")
PLAN_KEYS = ("format", "sources", "ratio", "world_size", "seq_len", "micro_batch", "steps", "microbatches", "seed",
             "order_sha256", "vocab", "report")
PLAN_SOURCE_KEYS = ("name", "path", "manifest_sha256", "documents", "weight")


def read_plan_meta(plan_dir: str | Path) -> dict:
    """plan.json, checked for the keys readers use, with `vocab` parsed into a Vocab. A plan
    without plan.json is unfinished. `plan_dir` may be a URL (mmtok.fs)."""
    plan_dir = as_location(plan_dir)
    plan, path = read_record(plan_dir, PLAN_FILE, "run `mmtok balance-mix` to make a plan",
                             "a plan directory (`mmtok balance-mix --out`)", "plan")
    require_keys(plan, PLAN_KEYS, path)
    require_keys(plan["vocab"], ("vocab_size", "image_range", "specials"), f"{path} (vocab)")
    try:
        plan["vocab"] = Vocab.from_dict(plan["vocab"], f"{path} (vocab)")
    except VocabError as e:
        raise ShardError(f"{e}; run `mmtok balance-mix` again on shards from `mmtok tokenize`") from None
    if not isinstance(plan["sources"], list):
        raise ShardError(f"{path}: `sources` is not a list; run `mmtok balance-mix` again")
    for i, s in enumerate(plan["sources"]):
        require_keys(s, PLAN_SOURCE_KEYS, f"{path} (sources[{i}])")
    return plan


def read_plan(plan_dir: str | Path) -> tuple[dict, dict]:
    """plan.json (as `read_plan_meta`) and its arrays (memory-mapped; read whole from a URL)."""
    plan_dir = as_location(plan_dir)
    plan = read_plan_meta(plan_dir)
    arrays = {}
    for name in PLAN_ARRAYS:
        path = plan_dir / f"{name}.npy"
        try:
            if isinstance(path, Path):
                arrays[name] = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                arrays[name] = np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ShardError(f"{plan_dir / (name + '.npy')}: missing or corrupt plan array ({e})") from None
    return plan, arrays


def write_plan_files(meta: dict, arrays: dict, out: str | Path, parts: Callable[[], None] | None = None) -> None:
    """Arrays first, then `parts()` (the held-out shards), plan.json last: a directory with
    plan.json is a finished plan."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).unlink(missing_ok=True)
    for name in PLAN_ARRAYS:
        atomic_write(out / f"{name}.npy", npy_bytes(arrays[name]))
    if parts is not None:
        parts()
    record = {**meta, "vocab": meta["vocab"].to_dict()}
    atomic_write(out / PLAN_FILE, json.dumps(record, sort_keys=True, indent=1).encode())


def check_plan_arrays(plan: dict, arrays: dict, n_tokens: np.ndarray, plan_dir: Path) -> None:
    """Refuse plan arrays whose values do not fit the plan and its sources' document lengths
    `n_tokens` (an edited or damaged plan), naming the array, before a loader worker trips
    over them."""
    a = {k: np.asarray(v) for k, v in arrays.items()}
    n_mb, mb, seq_len = int(plan["microbatches"]), int(plan["micro_batch"]), int(plan["seq_len"])
    n_pieces = len(a["piece_doc"])

    def bad(name: str, what: str):
        raise ShardError(f"{plan_dir / (name + '.npy')}: {what}; the plan is damaged: run `mmtok balance-mix` again")

    for name in PLAN_ARRAYS:
        if a[name].ndim != 1 or a[name].dtype.kind not in "iu":
            bad(name, f"expected a 1-D integer array, found {a[name].dtype} {a[name].shape}")
    for name, n in (("mb_ptr", n_mb + 1), ("mb_text", n_mb), ("mb_image", n_mb), ("piece_start", n_pieces),
                    ("piece_len", n_pieces), ("piece_seq", n_pieces)):
        if len(a[name]) != n:
            bad(name, f"{len(a[name])} entries, expected {n}")
    ptr = a["mb_ptr"].astype(np.int64)
    if ptr[0] != 0 or ptr[-1] != n_pieces or (np.diff(ptr) < 0).any():
        bad("mb_ptr", f"not a non-decreasing run from 0 to {n_pieces}")
    doc, start, length, seq = (a[k].astype(np.int64) for k in ("piece_doc", "piece_start", "piece_len", "piece_seq"))
    for name, values, lo, hi in (("piece_doc", doc, 0, len(n_tokens)), ("piece_seq", seq, 0, mb),
                                 ("piece_start", start, 0, None), ("piece_len", length, 1, seq_len + 1)):
        out = (values < lo) | (values >= hi if hi is not None else False)
        if out.any():
            i = int(np.argmax(out))
            bad(name, f"value {int(values[i])} at position {i} is outside [{lo}, {hi if hi is not None else 'inf'})")
    past = start + length > n_tokens[doc]
    if past.any():
        i = int(np.argmax(past))
        bad("piece_len", f"piece {i} ends at token {int(start[i] + length[i])} of document {int(doc[i])}, "
                         f"which has {int(n_tokens[doc[i]])}")
    fill = np.bincount(np.repeat(np.arange(n_mb), np.diff(ptr)) * mb + seq, weights=length, minlength=n_mb * mb)
    if (fill > seq_len).any():
        i = int(np.argmax(fill > seq_len))
        bad("piece_len", f"micro-batch {i // mb} sequence {i % mb} holds {int(fill[i])} tokens, over --seq-len {seq_len}")


def parse_layout(layout: str, name: str = "expert layout") -> tuple[int, int]:
    """`4t4i` -> (4 text experts, 4 image experts): the one parser of an NtMi layout (the
    planner's --experts ratio, the model config, upcycling). `name` is what the error names."""
    m = re.fullmatch(r"\s*(\d+)t(\d+)i\s*", layout or "")
    if not m or int(m[1]) < 1 or int(m[2]) < 1:
        raise ValueError(f"{name} {layout!r} is not of the form NtMi with N, M >= 1 (for example 4t4i or 1t1i)")
    return int(m[1]), int(m[2])
