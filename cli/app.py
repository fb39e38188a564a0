"""The `mmtok` command. Each topic module registers its commands; heavy libraries
(torch, webdataset, PIL, pyarrow) are imported inside the commands, so `mmtok --help`
stays fast."""

from __future__ import annotations

import inspect
import re
import shutil
import sys

import typer

from mmtok.cli import data_cmds, interop_cmds, media_cmds, mix_cmds, moma_cmds, token_cmds, train_cmds

app = typer.Typer(
    name="mmtok",
    help="Data, tokenization and training stack for early-fusion multimodal MoE models.\n\n"
    "Every stage reads shards and writes shards: shard -> extract-keyframes / extract-audio -> "
    "train-bpe / train-vq -> tokenize-images / tokenize -> balance-mix -> train -> eval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

for module in (data_cmds, media_cmds, mix_cmds, token_cmds, interop_cmds, train_cmds, moma_cmds):
    module.register(app)


def _keep_angle_brackets(text: str | None) -> str | None:
    """Markdown help (rich_markup_mode) drops `<boi>` as an HTML tag: escape every `<` outside
    code spans (where a backslash would show). Idempotent: shared options are seen twice."""
    if not text:
        return text
    parts = text.split("`")
    parts[::2] = [re.sub(r"(?<!\\)<", r"\\<", p) for p in parts[::2]]
    return "`".join(parts)


for _cmd in app.registered_commands:
    _cmd.callback.__doc__ = _keep_angle_brackets(_cmd.callback.__doc__)
    _cmd.help = _keep_angle_brackets(_cmd.help)
    for _p in inspect.signature(_cmd.callback).parameters.values():
        if isinstance(_p.default, typer.models.ParameterInfo):
            _p.default.help = _keep_angle_brackets(_p.default.help)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"mmtok {version('mmtok')}")
        raise typer.Exit()


@app.callback()
def _root(_: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print mmtok's version and exit.")) -> None:
    """Data, tokenization and training stack for early-fusion multimodal MoE models."""


def main() -> None:
    import warnings

    # torch.distributed.checkpoint warns when a single process loads a checkpoint, which
    # is exactly what eval, export and generate mean to do.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if category.__module__.startswith("mmtok."):  # ours are for users: no file and line
            sys.stderr.write(f"warning: {message}\n")
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    # rich's option tables squeeze names and help into stubs ("--max-member-byt…") under
    # ~100 columns; click's plain layout wraps them whole there. A pipe keeps rich's.
    if shutil.get_terminal_size(fallback=(120, 24)).columns < 100:
        app.rich_markup_mode = None
    app()


if __name__ == "__main__":
    main()
