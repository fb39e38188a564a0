"""`mmtok upcycle` and `mmtok generate`: MoMa's upcycling of a 1t1i run into NtMi experts,
and mixed-modal sampling with causal routing. torch is imported inside the commands."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from mmtok.cli.common import JSON_OUT, QUIET, fail, friendly_errors, positive, pulled, renamed
from mmtok.cli.token_cmds import DEVICE



def register(app: typer.Typer) -> None:
    app.command(no_args_is_help=True)(upcycle)
    app.command(no_args_is_help=True)(generate)


@friendly_errors
def upcycle(
    run: Path = typer.Argument(..., file_okay=False, help="A trained 1t1i MoMa (or dense) run directory."),
    experts: str = typer.Option(..., "--experts", help="The new expert layout, NtMi (for example 4t4i)."),
    out: Path = typer.Option(..., "--out", "-o", file_okay=False, help="The new run directory (a checkpoint at step 0)."),
    router_noise: str = typer.Option("gumbel", "--router-noise", help="gumbel (MoMa's choice) or none, "
                                     "for the upcycled training."),
    seed: int = typer.Option(0, "--seed", help="Seed of the routers' random parts."),
    as_json: bool = JSON_OUT,
):
    """Start an NtMi run from a trained 1t1i (or dense) one: experts copy their modality's FFN
    and routers its router (a dense run's start fresh), the LR schedule restarts and the
    data position carries over."""
    from mmtok.trainer.upcycle import upcycle as run_upcycle

    summary = run_upcycle(run, experts, out, router_noise=router_noise, seed=seed)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        return
    from rich.console import Console

    Console(stderr=True).print(
        f"upcycled {run} (step {summary['parent_step']}) to {summary['model']} {experts} in {out}; continue with\n"
        f"  mmtok train --plan PLAN --out {out} --model {summary['model']} --experts {experts} "
        f"--router-noise {router_noise} --steps N --resume")


@friendly_errors
def generate(
    run: Optional[str] = typer.Argument(None, metavar="RUN", help="A run directory or an `mmtok export` directory (a URL is "
                                       "pulled into the cache first)."),
    old_checkpoint: Optional[str] = typer.Option(None, "--checkpoint", hidden=True, help="Old spelling of the RUN argument."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="The tokenizer directory (or URL) the model "
                                            "was trained with (default: the one `mmtok export --tokenizer` bundled)."),
    prompt: str = typer.Option("", "--prompt", help="Text to continue."),
    image: Optional[Path] = typer.Option(None, "--image", help="An image placed before the prompt text."),
    generate_image: bool = typer.Option(False, "--generate-image", help="End the prompt with [begin-image]: "
                                        "the model draws an image next."),
    out: Path = typer.Option(Path("generated"), "--out", "-o", file_okay=False, help="Directory for generation.json and PNGs."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Cap on new tokens."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", callback=positive, max=1.0, help="Nucleus sampling mass."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    device: Optional[str] = DEVICE,
    cache: bool = typer.Option(True, "--kv-cache/--no-kv-cache", help="Decode with a KV cache (one position per step)."),
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
):
    """Sample text and images from a trained model with causal routing; images are decoded
    through the tokenizer's VQ decoder to PNG.

    Example: mmtok generate run/ --tokenizer tok/ --prompt "a red square" --generate-image --out gen/
    """
    from mmtok.trainer.generate import Sampling, generate_to_files

    given = renamed(run, old_checkpoint, "RUN", "--checkpoint")
    if given is None:
        fail("give RUN, the run (or `mmtok export`) directory to sample from")
    if image is not None and not image.is_file():
        raise FileNotFoundError(f"--image {image}: no such file")
    with contextlib.ExitStack() as stack:  # URLs: pulled into the cache for the command's length
        checkpoint, tok = pulled(stack, given), pulled(stack, tokenizer)
        if tok is None:  # an export that bundled its tokenizer needs none beside it
            tok = checkpoint / "tokenizer"
            if not (tok / "vocab.json").exists():
                fail(f"give --tokenizer: {given} bundles none (`mmtok export --tokenizer TOKDIR` bundles it)")
        result = generate_to_files(str(checkpoint), str(tok), str(out), prompt, str(image) if image else None,
                                   Sampling(max_tokens, temperature, top_p, seed), generate_image, device, cache,
                                   progress=not quiet and not as_json)
    from rich.console import Console

    c = Console(stderr=True)
    for note in result["notes"]:  # stderr, even with --json: stdout stays the JSON alone
        c.print(f"warning: {note}", markup=False, highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1, sort_keys=True) + "\n")
        return
    c.print(result["text"], markup=False, highlight=False)
    c.print(f"{result['new_tokens']} tokens ({result['tokens_per_s']:.1f}/s), stopped at {result['stopped']}; "
            f"images: {', '.join(result['images']) or 'none'}; {out}/generation.json")
