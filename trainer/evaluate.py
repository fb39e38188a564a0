"""`mmtok eval`: held-out perplexity (overall, text, image), conditional perplexity on
image-caption pairs, and expert utilisation, with a JSON file, a markdown report and plots.

Documents are cut into windows of the model's sequence length (positions restart at each
window, as in training) and batched. Perplexity = exp(mean negative log-likelihood over
the predicted tokens); a token counts as image when the *predicted* token is an image code.

Pairs (modality `pair`) are scored by their layout: in an image-first pair
(`<boi> codes <eoi>` before the caption) the caption tokens are scored given the image
(image->text); in a caption-first pair the image codes are scored given the caption
(text->image). `mmtok tokenize` orders pairs image-first half the time, so both appear.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from mmtok.trainer.context import image_mask
from mmtok.trainer.model import Decoder, expert_load, token_nll
from mmtok.trainer.train import TrainError


def check_vocab(corpus_vocab: dict, model_cfg, where: str) -> None:
    have = (int(corpus_vocab["vocab_size"]), tuple(corpus_vocab["image_range"]))
    want = (model_cfg.vocab_size, tuple(model_cfg.image_range))
    if have != want:
        raise TrainError(f"{where}: tokenized with vocab_size {have[0]}, image_range {list(have[1])}, but the model has "
                         f"vocab_size {want[0]}, image_range {list(want[1])}; evaluate on data from the model's tokenizer")


def check_tokenizer(fingerprint: str | None, model_cfg, where: str) -> None:
    """Refuse data or a tokenizer whose full fingerprint (BPE model and VQ included) differs from
    the one the model was trained with; an equal vocabulary layout is not enough. Skipped
    where either side did not record one."""
    if fingerprint and model_cfg.tokenizer and fingerprint != model_cfg.tokenizer:
        raise TrainError(f"{where}: made with another tokenizer than the model was trained with (fingerprint "
                         f"{fingerprint[:12]}, the model's {model_cfg.tokenizer[:12]}; same vocabulary layout, but another "
                         "BPE model or VQ); use the model's tokenizer directory")


def pair_roles(tokens: np.ndarray, vocab: dict) -> np.ndarray:
    """For each target position i (predicting tokens[i+1]): 1 = caption given image,
    2 = image code given caption, 0 = neither."""
    boi, eoi = vocab["specials"]["<boi>"], vocab["specials"]["<eoi>"]
    lo, hi = vocab["image_range"]
    roles = np.zeros(len(tokens) - 1, np.int8)
    starts, ends = np.flatnonzero(tokens == boi), np.flatnonzero(tokens == eoi)
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        return roles  # not a single-image pair: not scored conditionally
    nxt = tokens[1:]
    is_code = (nxt >= lo) & (nxt < hi)
    text_before = np.any(~np.isin(tokens[:starts[0]], list(vocab["specials"].values())))
    if text_before:
        roles[is_code] = 2
    else:
        after = np.arange(len(nxt)) + 1 > ends[0]
        is_special = np.isin(nxt, list(vocab["specials"].values()))
        roles[after & ~is_special & ~is_code] = 1
    return roles


def windows(tokens: np.ndarray, seq_len: int, roles: np.ndarray | None):
    """(ids, targets, roles) windows of one document; no target after its last token."""
    targets = np.append(tokens[1:].astype(np.int64), -100)
    roles = np.zeros(len(tokens), np.int8) if roles is None else np.append(roles, 0)
    for s in range(0, len(tokens), seq_len):
        yield tokens[s:s + seq_len].astype(np.int64), targets[s:s + seq_len], roles[s:s + seq_len]


def batches(docs, seq_len: int, batch_size: int):
    rows = []
    for row in docs:
        rows.append(row)
        if len(rows) == batch_size:
            yield _stack(rows, seq_len)
            rows = []
    if rows:
        yield _stack(rows, seq_len)


def _stack(rows, seq_len):
    b = len(rows)
    ids = torch.zeros(b, seq_len, dtype=torch.long)
    targets = torch.full((b, seq_len), -100, dtype=torch.long)
    roles = torch.zeros(b, seq_len, dtype=torch.int8)
    doc_ids = torch.zeros(b, seq_len, dtype=torch.int32)
    positions = torch.zeros(b, seq_len, dtype=torch.int32)
    for i, (x, t, r) in enumerate(rows):
        n = len(x)
        ids[i, :n], targets[i, :n], roles[i, :n] = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(r)
        doc_ids[i, :n] = 1
        positions[i, :n] = torch.arange(n, dtype=torch.int32)
    return {"input_ids": ids, "targets": targets, "roles": roles, "doc_ids": doc_ids, "positions": positions}


@torch.no_grad()
def score(model: Decoder, batch_iter, routing: str = "batch") -> dict:
    """Sums of NLL and counts by kind, and expert load, over all batches. In batch routing,
    also how often the auxiliary routers agree with the batch routers (`aux_agreement`: the
    share; `aux_routing`: that share with its trivial rate, precision and recall)."""
    from mmtok.trainer.aux_routers import agreement_summary, aux_agreement

    cfg = model.cfg
    lo, hi = cfg.image_range
    sums = {k: 0.0 for k in ("all", "text", "image", "i2t", "t2i")}
    counts = dict.fromkeys(sums, 0)
    load, agree = {}, {}
    for b in batch_iter:
        logits, stats = model(b["input_ids"], b["positions"], b["doc_ids"], routing)
        for kind, got in aux_agreement(stats).items():
            agree[kind] = {k: agree.get(kind, {}).get(k, 0.0) + v for k, v in got.items()}
        t = b["targets"]
        valid = t != -100
        nll = token_nll(logits, t)[0]
        image = valid & image_mask(t, (lo, hi))
        for name, mask in (("all", valid), ("text", valid & ~image), ("image", image),
                           ("i2t", b["roles"] == 1), ("t2i", b["roles"] == 2)):
            sums[name] += float(nll[mask].double().sum())
            counts[name] += int(mask.sum())
        for group, s in expert_load(stats).items():
            acc = load.setdefault(group, {"load": 0, "unrouted": 0.0, "tokens": 0.0})
            acc["load"] = acc["load"] + s["load"].double()
            acc["unrouted"] += float(s["unrouted"])
            acc["tokens"] += float(s["tokens"])
    out = {}
    for name in sums:
        loss = sums[name] / counts[name] if counts[name] else None
        out[name] = {"tokens": counts[name], "loss": loss, "ppl": math.exp(loss) if loss is not None else None}
    # share: of the group's routed slots; taken: of the group's tokens (expert choice takes
    # its capacity, so only `taken` at other capacity factors and `unrouted` vary)
    out["expert_load"] = {g: {"share": (v["load"] / v["load"].sum().clamp(min=1)).tolist(),
                              "taken": (v["load"] / max(v["tokens"], 1.0)).tolist(),
                              "unrouted": v["unrouted"] / max(v["tokens"], 1.0)} for g, v in load.items()}
    if routing == "batch" and agree:
        out["aux_routing"] = {k: agreement_summary(got) for k, got in agree.items()}
        out["aux_agreement"] = {k: v["agreement"] for k, v in out["aux_routing"].items()}
    return out


def evaluate(model_path: str, data: list[str], pairs: list[str], batch_size: int = 4, max_docs: int | None = None,
             seq_len: int | None = None, progress: bool = False) -> dict:
    from mmtok.loader import TokenCorpus
    from mmtok.trainer.export import load_model

    model, cfg = load_model(model_path)
    seq_len = seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise TrainError(f"--seq-len {seq_len} is longer than the model's {cfg.max_seq_len}")
    corpora = {}
    for kind, dirs in (("data", data), ("pairs", pairs)):
        if dirs:
            corpus = TokenCorpus(dirs)
            check_vocab(corpus.vocab.to_dict(), cfg, ", ".join(dirs))  # TokenCorpus.vocab is a Vocab
            check_tokenizer(corpus.tokenizer, cfg, ", ".join(dirs))
            corpus.check()
            corpora[kind] = corpus

    def n_docs(corpus) -> int:
        return corpus.n_tokens.shape[0] if max_docs is None else min(max_docs, corpus.n_tokens.shape[0])

    def scored(name, corpus, with_roles, routing="batch"):
        """`score` over one corpus behind a progress bar whose total is its batch count."""
        from mmtok.runner import progress_bar

        n_windows = int(np.ceil(corpus.n_tokens[:n_docs(corpus)] / seq_len).sum())
        with progress_bar(name, -(-n_windows // batch_size), 0, progress) as bar:
            def counted():
                for b in batches(docs(corpus, with_roles), seq_len, batch_size):
                    yield b
                    bar.advance()
            return score(model, counted(), routing)

    def docs(corpus, with_roles):
        n, vocab = n_docs(corpus), corpus.vocab.to_dict()
        for d in range(n):
            tokens = corpus.read(d).astype(np.int64)
            yield from windows(tokens, seq_len, pair_roles(tokens, vocab) if with_roles else None)

    result = {"model": str(model_path), "seq_len": seq_len, "config": {"model": cfg.model, "experts": cfg.experts}}
    result.update(overlap_notes(model_path, corpora, max_docs))
    if "data" in corpora:
        result["heldout"] = scored("eval held-out", corpora["data"], False)
        if "aux_agreement" in result["heldout"]:  # expert-choice model: perplexity with causal routing too
            result["heldout_causal"] = scored("eval held-out, causal routing", corpora["data"], False, "causal")
            result["causal_gap"] = causal_gap(result["heldout"], result["heldout_causal"])
    if "pairs" in corpora:
        s = scored("eval pairs", corpora["pairs"], True)
        result["pairs"] = {"image_to_text": s["i2t"], "text_to_image": s["t2i"], "expert_load": s["expert_load"]}
    return result


def causal_gap(batch: dict, causal: dict) -> dict:
    """Held-out loss (nats/token) with causal routing minus with batch routing, by kind: what
    decoding with the auxiliary routers costs against the routing the model trained with."""
    return {k: causal[k]["loss"] - batch[k]["loss"] for k in ("all", "text", "image")
            if batch[k]["loss"] is not None and causal[k]["loss"] is not None}


def _training_plan(model_path: str | Path) -> str | None:
    """The plan a run (or the run an export came from) trained on; None where not recorded."""
    from mmtok.shards import read_json

    cfg = Path(model_path) / "config.json"
    meta = read_json(cfg) if cfg.exists() else {}
    if "source_run" in meta:  # an export
        cfg = Path(meta["source_run"]) / "config.json"
        meta = read_json(cfg) if cfg.exists() else {}
    return meta.get("plan") or None


def overlap_notes(model_path: str | Path, corpora: dict, max_docs: int | None) -> dict:
    """`overlap` (documents scored that the run trained on, by input) and `notes` warning of
    it: perplexity on training documents is not a held-out measure."""
    from mmtok.holdout import plan_overlap
    from mmtok.shards import ShardError

    plan = _training_plan(model_path)
    if not plan or not corpora:
        return {}
    out, notes = {}, []
    for kind, corpus in corpora.items():
        n = len(corpus.n_tokens) if max_docs is None else min(max_docs, len(corpus.n_tokens))
        try:
            hits = plan_overlap(plan, corpus, n)
        except (ShardError, OSError, ValueError) as e:
            notes.append(f"could not check --{kind} against the training plan {plan} ({e})")
            continue
        out[kind] = {"documents": n, "in_training_plan": hits, "plan": plan}
        if hits:
            notes.append(f"{hits} of the {n} --{kind} documents are in the run's training plan {plan}: their perplexity "
                         "is not held out; evaluate on data left out of training (balance-mix --holdout writes "
                         "PLAN/holdout/)")
    return {"overlap": out, "notes": notes}


def write_report(result: dict, out: str | Path, metrics_jsonl: Path | None) -> list[str]:
    """eval.json, eval.md and plots (training curves, expert load); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmtok.shards import atomic_write, read_jsonl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "eval.json", out / "eval.md"]
    atomic_write(files[0], json.dumps(result, indent=1, sort_keys=True).encode())
    lines = [f"# Evaluation of {result['model']}", "", "| measure | tokens | loss | perplexity |", "| --- | --- | --- | --- |"]
    for label, m in summary_rows(result):
        lines.append(f"| {label} | {m['tokens']} | {_f(m['loss'])} | {_f(m['ppl'])} |")
    lines += aux_lines(result)
    load = (result.get("heldout") or result.get("pairs") or {}).get("expert_load", {})
    if load:
        lines += ["", "## Expert utilisation (share of routed tokens per expert)", ""]
        for g, v in load.items():
            lines.append(f"- {g}: {', '.join(f'{x:.3f}' for x in v['share'])}; tokens reaching no expert: {v['unrouted']:.1%}")
        fig = expert_load_figure(load)
        fig.savefig(out / "expert_load.png"), plt.close(fig)
        files.append(out / "expert_load.png")
    if metrics_jsonl and metrics_jsonl.exists():
        recs = [r for r in read_jsonl(metrics_jsonl) if "step" in r]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key in ("loss", "text_loss", "image_loss"):
            ax.plot([r["step"] for r in recs], [r.get(key) for r in recs], label=key)
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend()
        fig.tight_layout(), fig.savefig(out / "training_curves.png"), plt.close(fig)
        files.append(out / "training_curves.png")
        lines += ["", "![training curves](training_curves.png)"]
    if load:
        lines += ["", "![expert load](expert_load.png)"]
    atomic_write(files[1], ("\n".join(lines) + "\n").encode())
    return [str(f) for f in files]


def aux_lines(result: dict) -> list[str]:
    """eval.md's auxiliary-router section: agreement beside the trivial rate, precision and
    recall of "selected", and the causal routing's loss gap."""
    routing = result.get("heldout", {}).get("aux_routing")
    if not routing:
        return []
    lines = ["", "## Auxiliary routers against the batch routers (held-out)", "",
             "| router | agreement | always \"not selected\" | precision | recall |", "| --- | --- | --- | --- | --- |"]

    def pct(x):
        return "-" if x is None else f"{x:.1%}"

    for k, v in routing.items():
        lines.append(f"| {k} | {pct(v['agreement'])} | {pct(v['trivial'])} | {pct(v['precision'])} | {pct(v['recall'])} |")
    gap = result.get("causal_gap", {})
    if gap:
        lines += ["", "Causal routing minus batch routing, held-out loss (nats/token): " +
                  ", ".join(f"{k} {v:+.4f}" for k, v in gap.items())]
    return lines


def load_bars(load: dict) -> list[tuple[str, str, float]]:
    """What expert_load.png plots: (group, label, share of the group's tokens) per expert,
    experts numbered 0.. within their group, then the share that reached no expert."""
    bars = []
    for g, v in load.items():
        bars += [(g, f"{g} {e}", x) for e, x in enumerate(v.get("taken", v["share"]))]
        bars.append((g, f"{g} none", v["unrouted"]))
    return bars


def expert_load_figure(load: dict):
    """Bars per expert, grouped by modality: the share of that modality's tokens the expert
    took, and (hatched) the share no expert took."""
    import matplotlib.pyplot as plt

    bars = load_bars(load)
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(bars) + 1.5), 3.2))
    colours = {g: f"C{i}" for i, g in enumerate(load)}
    for x, (g, label, share) in enumerate(bars):
        none = label.endswith(" none")
        ax.bar(x, share, color="white" if none else colours[g], edgecolor=colours[g], hatch="//" if none else None)
    ax.set_xticks(range(len(bars)), [b[1] for b in bars], rotation=45, ha="right")
    ax.set_ylabel("share of the modality's tokens"), ax.set_ylim(0, max(1.0, max(b[2] for b in bars) * 1.1))
    ax.set_title("tokens each expert took; 'none': reached no expert", fontsize=9)
    fig.tight_layout()
    return fig


def summary_rows(result: dict) -> list[tuple[str, dict]]:
    rows = []
    if "heldout" in result:
        h = result["heldout"]
        rows += [("held-out, all tokens", h["all"]), ("held-out, text tokens", h["text"]), ("held-out, image tokens", h["image"])]
    if "heldout_causal" in result:
        h = result["heldout_causal"]
        rows += [("held-out, causal routing, all", h["all"]), ("held-out, causal routing, text", h["text"]),
                 ("held-out, causal routing, image", h["image"])]
    if "pairs" in result:
        rows += [("caption given image (image->text)", result["pairs"]["image_to_text"]),
                 ("image given caption (text->image)", result["pairs"]["text_to_image"])]
    return rows


def _f(x) -> str:
    return "-" if x is None else f"{x:.4f}"
