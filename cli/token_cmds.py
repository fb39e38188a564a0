"""`mmtok train-bpe`, `train-vq`, `tokenize-images`, `tokenize`, `detokenize`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mmtok.cli.common import (BACKEND, JSON_OUT, MAX_ERROR_RATE, OVERWRITE, QUIET, WORKERS, Exit, check_inputs,
                              fail, friendly_errors, not_a_file, positive, report)

SHARDS = typer.Argument(..., file_okay=False, help="Shard directories written by `mmtok shard`.")
TOKENIZER = typer.Option(..., "--tokenizer", "-t", help="Tokenizer directory (train-bpe + train-vq output), or a URL "
                         "(s3://...): each process pulls it into the cache (docs/REMOTE.md).")
DEVICE = typer.Option("auto", "--device", callback=lambda v: None if v == "auto" else v,
                      help="torch device: auto (cuda when present, else cpu), cpu, cuda or cuda:N.")
NPROC = typer.Option(1, "--nproc", min=1, help="Processes on this machine (torchrun), each on its share of the input "
                     "shards (and its own GPU); the output is byte for byte one process's. Or launch `torchrun ... "
                     "mmtok tokenize...` yourself for several machines (OUT on a shared filesystem).")
ACTORS = typer.Option(None, "--actors", min=1, help="With --backend ray: Ray actors, each loading the tokenizer once "
                      "and encoding its share of the input shards (default: one per GPU of the cluster; on a cluster "
                      "without GPUs, --workers, one CPU each). OUT on a filesystem every node sees.")


def _ranks(nproc: int, backend: str, actors: Optional[int], device: Optional[str], out: str,
           local: Path) -> tuple[bool, int, int, Optional[str]]:
    """(relaunched, rank, world size, device): with --nproc > 1 outside torchrun, this command
    was rerun under torchrun, writing `local` (OUT, or the staged copy of a URL OUT), and is
    done; under torchrun each rank takes GPU LOCAL_RANK."""
    from mmtok.actors import check_placement
    from mmtok.tokenize import world

    rank, world_size = world()
    check_placement(backend, actors, world_size)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        if backend != "local":
            fail("--nproc runs processes on this machine; with --backend ray use --actors N")
        from mmtok.cli.train_cmds import _relaunch

        _relaunch(nproc, out=(out, local))
        return True, 0, 1, device
    if world_size > 1 and device in (None, "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return False, rank, world_size, device


def register(app: typer.Typer) -> None:
    app.command("train-bpe", no_args_is_help=True)(train_bpe)
    app.command("train-vq", no_args_is_help=True)(train_vq)
    app.command("tokenize-images", no_args_is_help=True)(tokenize_images)
    app.command("tokenize", no_args_is_help=True)(tokenize)
    app.command("detokenize", no_args_is_help=True)(detokenize)
    app.command("decode", no_args_is_help=True, hidden=True)(detokenize)


def _log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message, highlight=False)


def _print(result: dict, as_json: bool, title: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=1, sort_keys=True) + "\n")
    else:
        _log(f"[bold]{title}[/]: " + ", ".join(f"{k} {v}" for k, v in result.items() if not isinstance(v, dict)))


@friendly_errors
def train_bpe(
    inputs: List[str] = SHARDS,
    out: str = typer.Option(..., "--out", "-o", help="Tokenizer directory to write (bpe.model, vocab.json), or a URL."),
    vocab_size: int = typer.Option(65536, "--vocab-size", min=1, help="All ids: specials + text pieces + image codes."),
    image_codes: int = typer.Option(8192, "--image-codes", min=1, help="Ids reserved for image codes (= VQ codebook size)."),
    resolution: int = typer.Option(512, "--resolution", min=1, help="VQ input size, for codes per image (a trained VQ in OUT wins)."),
    downsample: int = typer.Option(16, "--downsample", min=1, help="VQ downsampling factor, for codes per image."),
    input_sentence_size: int = typer.Option(10_000_000, "--input-sentence-size", min=1,
                                            help="Lines sampled for training (sentencepiece's sampling); bounds memory."),
    seed: int = typer.Option(0, "--seed", help="Seed of the line sampling."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Trainer threads (default: all cores)."),
    as_json: bool = JSON_OUT,
) -> None:
    """Train a SentencePiece BPE on the text in shards and lay out the unified vocabulary.

    Text comes from text samples, captions of pairs and text segments of documents.
    The id space is exactly --vocab-size: 16 specials, text pieces, --image-codes image ids.

    Example: mmtok train-bpe shards/ --out tok/ --vocab-size 65536 --image-codes 8192
    """
    from mmtok.bpe import train_bpe as run

    inputs = check_inputs(inputs, shard_dirs=True)
    with _tokenizer_out(out) as local:
        result = run(inputs, local, vocab_size=vocab_size, image_codes=image_codes,
                     image_tokens_per_image=(resolution // downsample) ** 2, input_sentence_size=input_sentence_size,
                     seed=seed, threads=threads, log=_log)
    _print(_named(result, out), as_json, "train-bpe")


@friendly_errors
def train_vq(
    inputs: List[str] = SHARDS,
    out: str = typer.Option(..., "--out", "-o", help="Tokenizer directory (vq.safetensors, vq.json, checkpoints, log), "
                            "or a URL."),
    steps: int = typer.Option(..., "--steps", min=1, help="Total optimizer steps (a resumed run continues to it)."),
    codebook_size: int = typer.Option(8192, "--codebook-size", min=2, help="Codes in the codebook."),
    resolution: int = typer.Option(512, "--resolution", min=1, help="Images are resized and centre-cropped to this."),
    downsample: int = typer.Option(16, "--downsample", min=2, help="Spatial downsampling (power of two): codes per image = (resolution/downsample)^2."),
    code_dim: int = typer.Option(8, "--code-dim", min=1, help="Dimension of the l2-normalised codes."),
    channels: int = typer.Option(128, "--channels", min=1, help="Base channels of encoder and decoder."),
    res_blocks: int = typer.Option(2, "--res-blocks", min=1, help="Residual blocks per resolution level."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per step per process."),
    lr: float = typer.Option(1e-4, "--lr", callback=positive, help="Adam learning rate."),
    log_every: int = typer.Option(100, "--log-every", min=1, help="Steps per logged interval."),
    checkpoint_every: int = typer.Option(1000, "--checkpoint-every", min=1, help="Steps between checkpoints."),
    restart_every: int = typer.Option(100, "--restart-every", min=1, help="Codes unused for this many steps are restarted."),
    disc_weight: float = typer.Option(0.1, "--disc-weight", min=0.0, help="Patch discriminator weight (0 turns it off)."),
    disc_start: int = typer.Option(10_000, "--disc-start", min=0, help="Step at which the discriminator is switched on."),
    perceptual_weights: Optional[Path] = typer.Option(None, "--perceptual-weights", exists=True, dir_okay=False,
                                                      help="torchvision VGG16 weights (.safetensors or .pth) for a perceptual loss; off without them."),
    perceptual_weight: float = typer.Option(1.0, "--perceptual-weight", min=0.0, help="Weight of the perceptual loss."),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = DEVICE,
    restart: bool = typer.Option(False, "--restart", help="Ignore a checkpoint in OUT and start again."),
    memory_check: bool = typer.Option(True, "--memory-check/--no-memory-check",
                                      help="Refuse to start when the memory estimate (printed first) is over the "
                                      "memory available (RAM on CPU, free GPU memory on CUDA)."),
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
) -> None:
    """Train the VQ image tokenizer on the images and pairs in shards.

    Resumes automatically from OUT/checkpoints/ when OUT holds a checkpoint of the
    same options. Under torchrun each process trains on its share of the images (DDP).

    Example: mmtok train-vq shards/ --out tok/ --steps 100000 --resolution 512 --downsample 16
    """
    from mmtok.vq import VQConfig
    from mmtok.trainer.vq_train import train_vq as run

    inputs = check_inputs(inputs, shard_dirs=True)
    cfg = VQConfig(resolution=resolution, downsample=downsample, codebook_size=codebook_size, code_dim=code_dim,
                   channels=channels, res_blocks=res_blocks)
    with _tokenizer_out(out) as local:
        result = run(inputs, local, cfg, steps=steps, batch_size=batch_size, lr=lr, log_every=log_every,
                     checkpoint_every=checkpoint_every, restart_every=restart_every, disc_weight=disc_weight,
                     disc_start=disc_start, perceptual_weights=str(perceptual_weights) if perceptual_weights else None,
                     perceptual_weight=perceptual_weight, seed=seed, device=device, restart=restart,
                     memory_check=memory_check, progress=not quiet and not as_json, log=_log)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        _print(_named(result, out), as_json, "train-vq")
    if result["status"] == "interrupted":
        fail(f"interrupted at step {result['step']}; checkpoint saved; rerun the same command to resume",
             Exit.INTERRUPTED)


@friendly_errors
def tokenize_images(
    inputs: List[str] = SHARDS,
    tokenizer: str = TOKENIZER,
    out: str = typer.Option(..., "--out", "-o", help="Output shard directory of codes, or a URL (s3://...)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder batch."),
    device: Optional[str] = DEVICE,
    workers: int = WORKERS,
    backend: str = BACKEND,
    nproc: int = NPROC,
    actors: Optional[int] = ACTORS,
    max_error_rate: float = MAX_ERROR_RATE,
    overwrite: bool = OVERWRITE,
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
) -> None:
    """Encode the images and pairs of shards into VQ codes (bf16 on CUDA), for `tokenize --codes`.

    Example: mmtok tokenize-images shards/ --tokenizer tok/ --out codes/ --batch-size 64 --nproc 8

    On a Ray cluster (one actor per GPU): mmtok tokenize-images /shared/shards -t /shared/tok --out /shared/codes --backend ray
    """
    from mmtok.tokenize import tokenize_images as run

    inputs = check_inputs(inputs, out, shard_dirs=True)
    with _remote_out(out, backend) as local:
        relaunched, rank, world_size, device = _ranks(nproc, backend, actors, device, out, local)
        if relaunched:
            return
        tok = _load_tokenizer(tokenizer, device)
        summary = run(inputs, tok, local, batch_size=batch_size, workers=workers, backend=backend, actors=actors,
                      max_error_rate=max_error_rate, progress=not quiet and not as_json, overwrite=overwrite,
                      rank=rank, world_size=world_size)
    if summary is not None:  # rank 0 joined the shares and reports; the other ranks are done
        report(_named(summary, out), as_json)


def _load_tokenizer(tokenizer: str, device: Optional[str]):
    from mmtok.tokenize import Tokenizer

    not_a_file(tokenizer)
    return Tokenizer.load(tokenizer, device)


def _tokenizer_out(out: str):
    """The tokenizer directory to write for `out`: itself, or for a URL a local copy mirrored
    to it (pulled first, so train-vq resumes from the bucket's checkpoints); refused under
    torchrun, where each process would mirror a copy of its own."""
    from mmtok.fs import is_url
    from mmtok.mirror import all_files, remote_output

    not_a_file(out)
    if is_url(out) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"--out {out}: a URL is written by one process; train into a shared filesystem under "
                         "torchrun and copy the tokenizer to the bucket")
    return remote_output(out, ours=all_files)


def _remote_out(out: str, backend: str):
    """`remote_output(out)`: a URL is staged in a local directory mirrored to it; refused at
    once under your own torchrun or with Ray actors (each process or node would mirror its
    own copy, and the join needs every part in one directory). `--nproc` works: this process
    mirrors, and the processes it starts write the one copy (`_ranks`)."""
    from mmtok.fs import is_url
    from mmtok.mirror import remote_output
    from mmtok.tokenize import world

    if is_url(out) and (world()[1] > 1 or backend == "ray"):
        raise ValueError(f"--out {out}: a URL is written from one machine; use --nproc rather than your own torchrun, "
                         "leave out --backend ray, or write to a shared filesystem and copy it to the bucket")
    return remote_output(out)


def _named(summary, out: str):
    """The summary (a stage's, or a trainer's dict) naming the URL it wrote, not its staging
    directory."""
    from mmtok.cli.train_cmds import OUT_AS
    from mmtok.fs import is_url

    out = os.environ.get(OUT_AS) or out  # a process --nproc started writes the copy of this URL
    if is_url(out):
        if isinstance(summary, dict):
            return {**summary, "out": out}
        summary.out = out
    return summary


@friendly_errors
def tokenize(
    inputs: List[str] = SHARDS,
    tokenizer: str = TOKENIZER,
    out: str = typer.Option(..., "--out", "-o", help="Output token shard directory, or a URL (s3://...)."),
    codes: List[str] = typer.Option([], "--codes", help="Reuse image codes written by `tokenize-images` (repeat for "
                                    "several directories; read in place, also at a URL)."),
    seed: int = typer.Option(0, "--seed", help="Decides which pairs are image-first (half of them)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Documents per batch (their images are encoded together)."),
    device: Optional[str] = DEVICE,
    workers: int = WORKERS,
    backend: str = BACKEND,
    nproc: int = NPROC,
    actors: Optional[int] = ACTORS,
    max_error_rate: float = MAX_ERROR_RATE,
    overwrite: bool = OVERWRITE,
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
) -> None:
    """Turn text, image-caption pairs, images and interleaved documents into unified token shards.

    Each document: text ids, <boi> + image codes + <eoi> per image, and <eod>; its
    counts of text and image tokens go into index.parquet for mixing.

    Example: mmtok tokenize shards/ --tokenizer tok/ --out tokens/ --codes codes/
    """
    from mmtok.tokenize import tokenize as run

    from mmtok.fs import as_location

    inputs = check_inputs(inputs, out, shard_dirs=True)
    codes = [as_location(c) for c in codes]
    for c in codes:
        if not (c.is_dir() if isinstance(c, Path) else (c / "manifest.json").exists()):
            raise FileNotFoundError(f"--codes {c} is not a directory")
    with _remote_out(out, backend) as local:
        relaunched, rank, world_size, device = _ranks(nproc, backend, actors, device, out, local)
        if relaunched:
            return
        tok = _load_tokenizer(tokenizer, device)
        summary, skipped = run(inputs, tok, local, codes_dir=codes, seed=seed, batch_size=batch_size, workers=workers,
                               backend=backend, actors=actors, max_error_rate=max_error_rate, progress=not quiet and not as_json,
                               overwrite=overwrite, rank=rank, world_size=world_size)
    if summary is None:
        return
    if skipped and not as_json:
        _log("left out (not text, pair, image or doc): " + ", ".join(f"{g} {n}" for g, n in sorted(skipped.items())))
    report(_named(summary, out), as_json)


@friendly_errors
def detokenize(
    tokens: str = typer.Argument(..., help="Token shard directory written by `mmtok tokenize`."),
    tokenizer: str = TOKENIZER,
    out: Path = typer.Option(..., "--out", "-o", help="Directory for KEY.json, KEY.txt and KEY-N.png per document."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Decode only the first N documents."),
    device: Optional[str] = DEVICE,
    overwrite: bool = OVERWRITE,
    as_json: bool = JSON_OUT,
    quiet: bool = QUIET,
) -> None:
    """Decode token shards back to text and PNG images (through the VQ decoder).

    Every file is written atomically and <key>.json last, so a rerun into the same OUT
    skips finished documents; --overwrite redoes them (and clears an OUT made from other
    tokens or another tokenizer, which is refused otherwise).

    Example: mmtok detokenize tokens/ --tokenizer tok/ --out decoded/ --limit 10
    """
    from mmtok.detokenize import detokenize as run

    tokens = check_inputs([tokens], out, shard_dirs=True)[0]
    result = run(tokens, _load_tokenizer(tokenizer, device), out, limit=limit, overwrite=overwrite,
                 progress=not quiet and not as_json)
    _print(result, as_json, "detokenize")
