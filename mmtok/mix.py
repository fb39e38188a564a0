"""`balance-mix`: a plan of micro-batches whose text:image token ratio is on target for
every rank at every step.

The plan is a pure function of (token shard manifests, weights, ratio, tolerance,
seq_len, micro_batch, seed) plus how many micro-batches to plan. It is built in three
steps (docs/MIXING.md has the full story):

1. Atoms. A document holding images is an indivisible atom (an image block never splits
   and stays beside its caption), unless it is longer than seq_len: then it is cut into
   atoms at positions outside image blocks. Text-only documents are split freely.
2. Streams. Two pools, image atoms and text documents, each blended from the sources by
   weight: every source is an endless run of epochs (each a fresh permutation), and the
   sources are merged by "virtual time" (tokens so far / weight), the vectorised form of
   a deficit scheduler, so every prefix holds each source in its share.
3. Packing. Micro-batch after micro-batch (mb sequences of seq_len tokens): take the most
   image atoms for which the text needed to reach the ratio still fits, place them
   first-fit into the sequences, then fill the gaps with a run of the text stream cut to
   put the micro-batch within the tolerance of the ratio. Only the first fit walks the
   micro-batches one by one (a short loop over a few atoms each); how many atoms may
   come, the text fills, the cuts and the piece order are computed for all at once.

The micro-batch order does not depend on the world size; rank r at step s reads
micro-batch s*W + r. A longer plan begins with the shorter one's micro-batches.

With a held-out fraction, the documents `mmtok.holdout` picks by their keys' hashes are
left out of the plan and written as token shards under OUT/holdout/.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmtok.loader import TokenCorpus
from mmtok.fs import relative_location
from mmtok.holdout import document_keys, held_out, holdout_parts, write_holdout
from mmtok.mirror import all_files, remote_output
from mmtok.plan import HOLDOUT_DIR, PLAN_FORMAT, parse_layout, write_plan_files

IMAGE, TEXT = 0, 1  # pools


def parse_ratio(text: str) -> tuple[int, int]:
    """`3:1` -> (3, 1) text:image."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not m or int(m[1]) == 0 or int(m[2]) == 0:
        raise ValueError(f"--ratio {text!r}: expected TEXT:IMAGE with two positive integers, e.g. 1:1")
    return int(m[1]), int(m[2])


@dataclass
class Plan:
    meta: dict  # plan.json, its vocab a Vocab (mmtok.plan)
    arrays: dict  # name -> numpy array (mmtok.plan.PLAN_ARRAYS)
    holdout: list = field(default_factory=list)  # (source dir, its held-out document numbers) per source

    @property
    def report(self) -> dict:
        return self.meta["report"]


class _Exhausted(Exception):
    """A stream was estimated too short; the planner retries with longer streams."""


def _expand(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate arange(start, start + count) for each pair, vectorised."""
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))


def _atoms(corpus: TokenCorpus, seq_len: int, keep: np.ndarray) -> dict:
    """Image-bearing documents as atoms (doc, start, len, image tokens), in document order."""
    docs = np.flatnonzero((corpus.n_image > 0) & keep)
    long = docs[corpus.n_tokens[docs] > seq_len]
    if len(long) == 0:
        return {"doc": docs, "start": np.zeros(len(docs), np.int64), "len": corpus.n_tokens[docs], "img": corpus.n_image[docs]}
    vocab = corpus.vocab
    boi, eoi = vocab["<boi>"], vocab["<eoi>"]
    cuts = {}
    for d in long.tolist():
        tokens = corpus.read(d)
        depth = np.concatenate([[0], np.cumsum((tokens == boi).astype(np.int64) - (tokens == eoi))])
        legal = np.flatnonzero(depth == 0)  # cut positions outside image blocks
        spans, start = [], 0
        while start < len(tokens):
            end = legal[np.searchsorted(legal, start + seq_len, "right") - 1]
            if end <= start:
                src = corpus.source[d]
                after = legal[legal > start]  # the next cut lies past the image block's end
                block = int(after[0] - start) if len(after) else len(tokens) - start
                raise ValueError(f"{corpus.dirs[src]}: document {d - corpus.first_doc[src]} has an image block longer "
                                 f"than --seq-len {seq_len}; raise --seq-len to at least {block}")
            spans.append((start, end - start, int(vocab.is_image(tokens[start:end]).sum())))
            start = int(end)
        cuts[d] = spans
    rows = []
    for d in docs.tolist():
        rows += [(d, *s) for s in cuts[d]] if d in cuts else [(d, 0, int(corpus.n_tokens[d]), int(corpus.n_image[d]))]
    a = np.array(rows, dtype=np.int64).reshape(-1, 4)
    return {"doc": a[:, 0], "start": a[:, 1], "len": a[:, 2], "img": a[:, 3]}


def _stream(unit_source: np.ndarray, unit_items: list[np.ndarray] | None, item_len: np.ndarray,
            weights: np.ndarray, need: float, seed: int, pool: int) -> np.ndarray:
    """Item indices of one pool, blended by weight, at least `need` tokens long.

    `unit_source[u]` is the source of unit u (a document); `unit_items` maps units to
    their items (atoms) as (first, count) arrays, or None when units are items.
    """
    order, source_ends = [], []
    active = np.flatnonzero(weights > 0)
    max_item = int(item_len.max()) if len(item_len) else 0
    for s in active.tolist():
        units = np.flatnonzero(unit_source == s)
        if unit_items is None:
            per_epoch = int(item_len[units].sum())
        else:
            first, count = unit_items
            per_epoch = int(item_len[_expand(first[units], count[units])].sum())
        want = need * weights[s] + max_item
        epochs = max(1, math.ceil(want / per_epoch))
        items = []
        for e in range(epochs):
            perm = units[np.random.default_rng([seed, pool, s, e]).permutation(len(units))]
            items.append(perm if unit_items is None else _expand(unit_items[0][perm], unit_items[1][perm]))
        items = np.concatenate(items)
        ends = np.cumsum(item_len[items])
        n = int(np.searchsorted(ends, want)) + 1  # epochs are shuffled whole, but only `want` tokens kept
        order.append(items[:n])
        source_ends.append(ends[:n])
    if len(order) < 2:
        return order[0] if order else np.zeros(0, dtype=np.int64)
    times, horizon = [], math.inf
    for s, ends in zip(active.tolist(), source_ends):
        times.append((ends - np.diff(ends, prepend=0) / 2) / weights[s])
        horizon = min(horizon, ends[-1] / weights[s])  # beyond it a source has no generated items left
    t = np.concatenate(times)
    items = np.concatenate(order)
    keep = t <= horizon
    # each source's times increase, so a stable sort merges them, ties going to the lower source
    return items[keep][np.argsort(t[keep], kind="stable")]


def _pack(A: dict, D: dict, n_mb: int, seq_len: int, micro_batch: int, rho: float, tol: float):
    """Micro-batches from the atom stream A and the text stream D (see module docstring).

    Only the atoms need a walk, micro-batch after micro-batch (first fit depends on where
    the previous micro-batch stopped); the text fill, the cuts and the piece order are then
    computed for all micro-batches at once.
    """
    C = seq_len * micro_batch
    cN = np.concatenate([[0], np.cumsum(A["len"])])
    cI = np.concatenate([[0], np.cumsum(A["img"])])
    cD = np.concatenate([[0], np.cumsum(D["len"])])
    has_text = len(D["len"]) > 0
    lo_f, hi_f = rho * (1 - tol), rho * (1 + tol)
    ia, mb_atom, atom_seq, used = _walk_atoms(A["len"], cN, cI, n_mb, seq_len, micro_batch, lo_f if has_text else None)
    n_img, n_xt = np.diff(cI[mb_atom]), np.diff(cN[mb_atom] - cI[mb_atom])
    left = C - used.sum(axis=1)
    if not has_text:
        fill = np.zeros(n_mb, np.int64)
    else:
        fill = np.where(n_img == 0, left, np.clip(np.floor(n_img * hi_f).astype(np.int64) - n_xt, 0, left))
    tpos = np.concatenate([[0], np.cumsum(fill)])
    if has_text and (cD[-1] - tpos[:-1] < C).any():
        raise _Exhausted
    # text: one run of the text stream, cut at every micro-batch's sequence gaps and at document ends
    bounds = tpos[:-1, None] + np.concatenate([np.zeros((n_mb, 1), np.int64),
                                               np.minimum(np.cumsum(seq_len - used, axis=1), fill[:, None])], axis=1)
    bounds = bounds.ravel()  # non-decreasing: a micro-batch's last bound is the next one's first
    cuts = np.sort(np.concatenate([bounds, cD[1:np.searchsorted(cD, tpos[-1], "right")]]), kind="stable")
    cuts = cuts[np.concatenate([[True], np.diff(cuts) > 0])]
    p0, p1 = cuts[:-1], cuts[1:]
    # a piece's slot is the flat index m * (micro_batch + 1) + s of its (micro-batch, sequence);
    # within a micro-batch, pieces go by sequence: its atoms first, then its text
    slots = micro_batch + 1
    t_slot = np.searchsorted(bounds, p0, "right") - 1
    a_slot = np.repeat(np.arange(n_mb) * slots, np.diff(mb_atom)) + atom_seq
    order = np.argsort(np.concatenate([a_slot * 2, t_slot * 2 + 1]), kind="stable")
    n_pieces = np.diff(mb_atom) + np.bincount(t_slot // slots, minlength=n_mb)
    t_doc = np.searchsorted(cD, p0, "right") - 1

    def merged(atom_part, text_part, dtype):
        return np.concatenate([atom_part, text_part], dtype=dtype)[order]

    return {"mb_ptr": np.concatenate([[0], np.cumsum(n_pieces)]),
            "piece_doc": merged(A["doc"][:ia], D["doc"][t_doc], np.int64),
            "piece_start": merged(A["start"][:ia], p0 - cD[t_doc], np.int64),
            "piece_len": merged(A["len"][:ia], p1 - p0, np.int32),
            "piece_seq": merged(atom_seq, t_slot % slots, np.int16),
            "mb_text": n_xt + fill, "mb_image": n_img}, (ia, int(tpos[-1]))


def _walk_atoms(a_len: np.ndarray, cN: np.ndarray, cI: np.ndarray, n_mb: int, seq_len: int, micro_batch: int,
                lo_f: float | None):
    """Which atoms each micro-batch takes and where they go.

    A micro-batch from atom i on takes the longest run of atoms that fits in it together
    with the text the ratio asks for (at least one atom), as far as first fit places them.
    The run's length is a pair of binary searches (computed for every i at once); only
    first fit walks. Returns the atoms used, the first atom of each micro-batch (n_mb + 1),
    each atom's sequence and the tokens used per sequence (n_mb x micro_batch).
    """
    C = seq_len * micro_batch
    if len(a_len) == 0:
        return 0, np.zeros(n_mb + 1, np.int64), np.zeros(0, np.int64), np.zeros((n_mb, micro_batch), np.int64)
    # fits(n atoms) <=> tokens <= C and images + text needed (ceil(images * lo_f)) <= C; both grow with n
    end = np.searchsorted(cN, cN[:-1] + C, "right") - 1
    if lo_f is not None:
        max_img = int(C / (1 + lo_f)) + 2
        while max_img + math.ceil(max_img * lo_f) > C:
            max_img -= 1
        end = np.minimum(end, np.searchsorted(cI, cI[:-1] + max_img, "right") - 1)
    run = np.maximum(1, end - np.arange(len(a_len)))
    last = int(np.searchsorted(cN, cN[-1] - C, "right")) - 1  # the last atom a micro-batch may start at
    mb_atom, atom_seq, used = [0] * (n_mb + 1), [], []
    ia = 0
    for m in range(n_mb):
        if ia > last:
            raise _Exhausted
        fill = [0] * micro_batch
        for la in a_len[ia:ia + int(run[ia])].tolist():  # first fit, up to the first atom that fits nowhere
            for s in range(micro_batch):
                if fill[s] + la <= seq_len:
                    fill[s] += la
                    atom_seq.append(s)
                    break
            else:
                break
        ia = len(atom_seq)
        mb_atom[m + 1] = ia
        used += fill
    return ia, np.array(mb_atom, np.int64), np.array(atom_seq, np.int64), np.array(used, np.int64).reshape(n_mb, -1)


def plan_mix(dirs: list[str | Path], *, out: str | Path, ratio: tuple[int, int], world_size: int, seq_len: int,
             micro_batch: int, steps: int, seed: int = 0, weights: list[float] | None = None,
             tolerance: float = 0.02, holdout: float = 0.0) -> Plan:
    """Plan `steps` x `world_size` micro-batches; see the module docstring.

    `out` is where the plan will be written (source paths are stored relative to it).
    `holdout`: the share of documents to leave out of the plan (`held_out`).
    """
    _check_plan_args(world_size, seq_len, micro_batch, steps, tolerance, holdout)
    corpus = TokenCorpus(dirs)
    held = held_out(document_keys(corpus.dirs), holdout) if holdout else np.zeros(len(corpus.n_tokens), bool)
    keep = ~held
    w = _source_weights(corpus, keep, weights)
    A = _atoms(corpus, seq_len, keep)
    is_text = np.flatnonzero((corpus.n_image == 0) & keep)
    tok, pool_w = _pool_weights(corpus, A, is_text, w)
    a_rho = ratio[0] / ratio[1]
    n_mb = steps * world_size
    arrays, (ia, tpos), a_stream, d_stream = _pack_streams(corpus, A, is_text, pool_w, a_rho, n_mb, seq_len, micro_batch,
                                                           tolerance, seed)
    report = _report(corpus, arrays, A, a_stream, d_stream, ia, tpos, tok, w, weights is not None, a_rho, tolerance,
                     seq_len * micro_batch, [str(d) for d in dirs])
    order_inputs = {
        "sources": corpus.manifest_sha256, "weights": w.tolist(), "ratio": list(ratio), "tolerance": tolerance,
        "seq_len": seq_len, "micro_batch": micro_batch, "seed": seed,
        **({"holdout": holdout} if holdout else {}),  # absent at 0: older plans keep their order hash
    }
    meta = {
        "format": PLAN_FORMAT,
        "sources": [{"name": str(d), "path": relative_location(d, out), "manifest_sha256": sha,
                     "documents": int(n), "weight": float(ws)}
                    for d, sha, n, ws in zip(dirs, corpus.manifest_sha256, corpus.n_docs, w)],
        "ratio": list(ratio), "tolerance": tolerance, "world_size": world_size, "seq_len": seq_len,
        "micro_batch": micro_batch, "steps": steps, "microbatches": n_mb, "seed": seed,
        "order_sha256": hashlib.sha256(json.dumps(order_inputs, sort_keys=True).encode()).hexdigest(),
        "vocab": corpus.vocab,
        "tokenizer": corpus.tokenizer,  # its full fingerprint: train records it, eval and generate compare it
        "report": report,
    }
    parts = holdout_parts(corpus, dirs, held, holdout, meta)
    return Plan(meta, arrays, parts)


def _check_plan_args(world_size: int, seq_len: int, micro_batch: int, steps: int, tolerance: float,
                     holdout: float) -> None:
    if world_size < 1 or seq_len < 1 or micro_batch < 1 or steps < 1:
        raise ValueError("--world-size, --seq-len, --micro-batch and --steps must be positive")
    if not 0 < tolerance < 1:
        raise ValueError(f"--tolerance {tolerance}: expected a fraction between 0 and 1, e.g. 0.02")
    if not 0 <= holdout < 1:
        raise ValueError(f"--holdout {holdout}: expected a fraction from 0 to below 1, e.g. 0.05")


def _source_weights(corpus: TokenCorpus, keep: np.ndarray, weights: list[float] | None) -> np.ndarray:
    """Each source's share of the mixture: `weights`, or its tokens left in the plan."""
    n_src = len(corpus.dirs)
    if weights is None:
        w = np.array([corpus.n_tokens[(corpus.source == s) & keep].sum() for s in range(n_src)], dtype=np.float64)
    else:
        if len(weights) != n_src or any(x < 0 for x in weights) or sum(weights) <= 0:
            raise ValueError(f"--weights: expected {n_src} non-negative numbers (one per source), got {weights}")
        w = np.array(weights, dtype=np.float64)
    w = w / w.sum()
    for s in range(n_src):
        if w[s] > 0 and not keep[corpus.source == s].any():
            left = " left after --holdout" if corpus.n_docs[s] else ""
            raise ValueError(f"{corpus.dirs[s]}: holds no documents{left} but has a weight; drop it or give it weight 0")
    return w


def _pool_weights(corpus: TokenCorpus, A: dict, is_text: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per pool and source [2, n_src], each pool's source weights): a source's weight
    splits over the pools in the proportion of its own tokens."""
    n_src = len(corpus.dirs)
    tok = np.zeros((2, n_src))
    tok[IMAGE] = np.bincount(corpus.source[A["doc"]], weights=A["len"], minlength=n_src)
    tok[TEXT] = np.bincount(corpus.source[is_text], weights=corpus.n_tokens[is_text], minlength=n_src)
    src_tok = tok.sum(axis=0)
    pool_w = np.where(src_tok > 0, w * tok / np.maximum(src_tok, 1), 0.0)
    pool_w = pool_w / np.maximum(pool_w.sum(axis=1, keepdims=True), 1e-300)
    return tok, pool_w


def _pack_streams(corpus: TokenCorpus, A: dict, is_text: np.ndarray, pool_w: np.ndarray, a_rho: float, n_mb: int,
                  seq_len: int, micro_batch: int, tolerance: float, seed: int):
    """(arrays, packing positions, image-pool stream, text stream): both pools streamed long
    enough for `n_mb` micro-batches (doubled until the packer has enough)."""
    C = seq_len * micro_batch
    img_frac = 1 / (1 + a_rho)
    atom_per_img = A["len"].sum() / max(1, A["img"].sum())
    need = np.array([n_mb * C * img_frac * atom_per_img, n_mb * C * (1 - img_frac)]) * 1.05 + 2 * C
    # atoms of one document are consecutive, so a permutation of documents expands to atoms
    doc_first = np.flatnonzero(np.diff(A["doc"], prepend=-1))
    doc_count = np.diff(np.concatenate([doc_first, [len(A["doc"])]]))
    while True:
        a_items = _stream(corpus.source[A["doc"][doc_first]], [doc_first, doc_count], A["len"], pool_w[IMAGE],
                          need[IMAGE], seed, IMAGE)
        a_stream = {k: v[a_items] for k, v in A.items()}
        d_doc = is_text[_stream(corpus.source[is_text], None, corpus.n_tokens[is_text], pool_w[TEXT], need[TEXT],
                                seed, TEXT)]
        d_stream = {"doc": d_doc, "len": corpus.n_tokens[d_doc]}
        try:
            arrays, positions = _pack(a_stream, d_stream, n_mb, seq_len, micro_batch, a_rho, tolerance * 0.95)
            return arrays, positions, a_stream, d_stream
        except _Exhausted:
            need = need * 2


def balance_mix(dirs: list[str | Path], out: str | Path, *, world_size: int, micro_batch: int, seq_len: int = 4096,
                steps: int | None = None, tokens: int | None = None, ratio: str | tuple[int, int] | None = None,
                experts: str | None = None, weights: list[float] | None = None, tolerance: float = 0.02, seed: int = 0,
                holdout: float = 0.0) -> Plan:
    """`mmtok balance-mix` as a library call: plan (`plan_mix`) and write the plan to `out`.

    The target is `ratio` ("3:1" or (3, 1), text:image) or the ratio of an expert layout
    `experts` ("4t4i"); the length `steps`, or `tokens` (at least this many planned)."""
    if (ratio is None) == (experts is None):
        raise ValueError("give exactly one of --ratio (e.g. 1:1) or --experts (e.g. 4t4i)"
                         + (", not both" if ratio is not None else ""))
    if (steps is None) == (tokens is None):
        raise ValueError("give exactly one of --steps or --tokens" + (", not both" if steps is not None else ""))
    if experts is not None:
        target = parse_layout(experts, "--experts")
    else:
        target = parse_ratio(ratio) if isinstance(ratio, str) else tuple(ratio)
    if tokens is not None:
        steps = -(-tokens // (world_size * micro_batch * seq_len))
    plan = plan_mix(dirs, out=out, ratio=target, world_size=world_size, seq_len=seq_len, micro_batch=micro_batch,
                    steps=steps, seed=seed, weights=weights, tolerance=tolerance, holdout=holdout)
    with remote_output(out, ours=all_files) as local:  # a plan at a URL: written here, then uploaded
        write_plan(plan, local)
    return plan


def ratio_deviation(text: np.ndarray, image: np.ndarray, rho: float) -> np.ndarray:
    """|text/image / target - 1| per micro-batch; inf where there are no image tokens."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(image > 0, np.abs(text / np.maximum(image, 1) / rho - 1), np.inf)


def _report(corpus, arrays, A, a_stream, d_stream, ia, tpos, tok, w, weighted, rho, tol, C, names) -> dict:
    A_len, A_img = A["len"], A["img"]
    n_src = len(names)
    dev = ratio_deviation(arrays["mb_text"], arrays["mb_image"], rho)
    off = int(np.count_nonzero(dev > tol))
    src = corpus.source[arrays["piece_doc"]]
    used = np.bincount(src, weights=arrays["piece_len"], minlength=n_src)
    total = used.sum()
    n_mb = len(arrays["mb_text"])
    # tokens consumed per source and pool, over what one epoch of that pool holds
    consumed = np.zeros((2, n_src))
    consumed[IMAGE] = np.bincount(corpus.source[a_stream["doc"][:ia]], weights=a_stream["len"][:ia], minlength=n_src)
    cD = np.concatenate([[0], np.cumsum(d_stream["len"])])
    full = int(np.searchsorted(cD, tpos, "right")) - 1
    consumed[TEXT] = np.bincount(corpus.source[d_stream["doc"][:full]], weights=d_stream["len"][:full], minlength=n_src)
    if full < len(d_stream["doc"]):
        consumed[TEXT, corpus.source[d_stream["doc"][full]]] += tpos - cD[full]
    epochs = np.where(tok > 0, consumed / np.maximum(tok, 1), 0).max(axis=0)
    shares = used / max(total, 1)
    report = {
        "microbatches": n_mb,
        "max_ratio_deviation": float(dev[np.isfinite(dev)].max()) if np.isfinite(dev).any() else None,
        "off_target_microbatches": off,
        "padding_fraction": float(1 - total / (n_mb * C)) if n_mb else 0.0,
        "source_shares": {n: float(s) for n, s in zip(names, shares)},
        "weights": {n: float(x) for n, x in zip(names, w)},
        "max_share_deviation": float(np.abs(shares - w).max()),
        "epochs": {n: float(e) for n, e in zip(names, epochs)},
        "tokens": int(total),
        "image_tokens": int(arrays["mb_image"].sum()),
        "text_tokens": int(arrays["mb_text"].sum()),
    }
    notes = []
    if off:
        if tok[IMAGE].sum() == 0:
            why = "the sources hold no image tokens"
        elif tok[TEXT].sum() == 0:
            why = "the sources hold no text-only documents to add text"
        elif (A_len + np.maximum(0, A_img * rho - (A_len - A_img)) > C).all():
            why = f"a micro-batch ({C} tokens) cannot hold an image document and the text the ratio asks for"
        else:
            why = "some image documents carry more text than the ratio allows, or need more room than is left"
        notes.append(f"{off} of {n_mb} rank-steps are off the target ratio by more than {tol:.0%}: {why}")
    for name, e in report["epochs"].items():
        if e > 1.0 + 1e-9:
            notes.append(f"{name} repeats {e:.1f} times in the plan (each of its documents is read {e:.1f} times "
                         "on average): add data to it, plan fewer --steps, or ask less of it (--weights, --ratio)")
    if weighted and report["max_share_deviation"] > 0.01:
        notes.append("source shares differ from --weights by more than 1%: the weights and the ratio cannot both "
                     "hold with these sources (the ratio wins)")
    report["notes"] = notes
    return report


def write_plan(plan: Plan, out: str | Path) -> None:
    """The plan directory (`mmtok.plan.write_plan_files`), its held-out shards included."""
    out = Path(out)

    def holdout_shards():
        for src, name, docs in plan.holdout:
            write_holdout(src, docs, out / HOLDOUT_DIR / name, plan.meta["holdout"]["fraction"])

    write_plan_files(plan.meta, plan.arrays, out, holdout_shards)
