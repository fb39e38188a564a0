"""What `mmtok train --model uni-moe --stage align|experts|tune` and `mmtok eval` of a
uni-moe run print. `cli/train_cmds.py` declares the options; the work is in
`trainer/unimoe_prep.py` (through `trainer/launch.py` for train)."""

from __future__ import annotations

from pathlib import Path

from mmtok.cli.common import eval_report


def print_stage(summary: dict, stage: str | None) -> None:
    """The summary line of a trained stage, with what it trained and kept frozen."""
    from rich.console import Console

    con = Console(stderr=True)
    con.print(f"[bold]mmtok train --model uni-moe --stage {stage}[/]: {summary['status']} at step "
              f"{summary['step']}/{summary['steps']} on {summary['world_size']} process(es); "
              f"started from {summary['init']}")
    con.print(f"trained: {summary['trained']}\nfrozen:  {summary['frozen']}")


def eval_unimoe(checkpoint: Path, out: Path | None, batch_size: int, as_json: bool) -> None:
    """Text given each modality and per-layer routing, on the run's held-out pairs."""
    from mmtok.trainer.unimoe_prep import evaluate

    result, out = evaluate(checkpoint, out, batch_size)
    rows = [(m, str(v["tokens"]), f"{v['loss']:.3f}", f"{v['ppl']:.3f}") for m, v in result["text_given"].items()]
    eval_report(result, out, f"mmtok eval: {checkpoint} (uni-moe, stage {result['stage']})",
                ("text given", "tokens", "loss", "perplexity"), rows, as_json)
