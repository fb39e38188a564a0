"""`mmtok import-tokenizer`: the field's tokenizers as mmtok tokenizer directories."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from mmtok.cli.common import JSON_OUT, fail, friendly_errors

KINDS = ("chameleon",)


def register(app: typer.Typer) -> None:
    app.command("import-tokenizer", no_args_is_help=True)(import_tokenizer)


@friendly_errors
def import_tokenizer(
    kind: str = typer.Argument(..., help="Which tokenizer: chameleon."),
    src: Path = typer.Argument(..., help="Meta's release directory (tokenizer/vqgan.yaml, vqgan.ckpt, text_tokenizer.json) "
                                         "or a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json)."),
    out: Path = typer.Option(..., "--out", "-o", file_okay=False, help="Tokenizer directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the tokenizer files if OUT already holds a tokenizer."),
    as_json: bool = JSON_OUT,
) -> None:
    """Import Chameleon's tokenizer (text BPE + VQ-GAN) as an mmtok tokenizer directory.

    The ids stay Chameleon's own, so token shards are id-compatible with Chameleon
    checkpoints; `tokenize-images`, `tokenize`, `detokenize` and `generate` use the
    directory unchanged. Nothing is unpickled but tensors (`vqgan.ckpt` is read with
    torch.load(weights_only=True)). Needs `pip install 'mmtok[chameleon]'`.
    """
    if kind not in KINDS:
        fail(f"unknown tokenizer kind {kind!r}; supported: {', '.join(KINDS)} (LlamaGen's VQ-16 is not: see docs/TOKENIZERS.md)")
    if not src.is_dir():
        fail(f"{src} is not a directory")
    from mmtok.chameleon import import_chameleon

    result = import_chameleon(src, out, overwrite=overwrite)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1, sort_keys=True) + "\n")
    else:
        from rich.console import Console

        Console(stderr=True).print("[bold]import-tokenizer[/]: " + ", ".join(f"{k} {v}" for k, v in result.items()),
                                   highlight=False)
