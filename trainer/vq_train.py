"""`train-vq`: train the VQ image tokenizer on the images in shard directories.

One process on CPU or one GPU; under torchrun (WORLD_SIZE > 1) each rank reads its share
of the images and gradients are averaged with DistributedDataParallel. It shares the
training loop's pieces: the process-group setup (`parallel.init_distributed`), the bf16
rule (`parallel.use_bf16`: bf16 autocast on a GPU), the one checkpoint manager
(`checkpoint.Checkpointer`: model + discriminator + dead-code window, both optimizers,
each rank's image position and RNG, in OUT/checkpoints/) and the metrics log
(`metrics.Metrics`, to vq_log.jsonl, cut back on resume). A later run with the same options
resumes from the newest checkpoint automatically. The image stream is a pure function of
(seed, step), so a resumed run sees the same batches and ends where an uninterrupted one does.

Its step stays its own and is not a `Job` of `train.run_job`: a GAN step is two optimizers
stepping in turn on a DDP-wrapped VQ and discriminator at a constant learning rate, with
dead-code restarts between steps, where the loop's step is one FSDP2 model, gradient
accumulation, clipping and a cosine schedule; and a tokenizer directory is not a run
directory (no config.json, other files beside it).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmtok import runner
from mmtok.shards import ShardReader, read_json
from mmtok.tokenizer import image_alone
from mmtok.trainer.checkpoint import CKPT_DIR, TRAIN_STATE, Checkpointer, checkpoint_step, intact_checkpoint
from mmtok.trainer.parallel import init_distributed, use_bf16
from mmtok.trainer.metrics import Metrics
from mmtok.trainer.vq_memory import SHUFFLE_BUFFER, fitting_settings, memory_estimate
from mmtok.vocab import VOCAB_FILE, Vocab
from mmtok.vq import PatchDiscriminator, PerceptualLoss, VQConfig, VQModel, load_image, to_unit

LOG = "vq_log.jsonl"
# The checkpoint files of mmtok before train-vq used the one checkpoint manager: never read.
OLD_CHECKPOINT = ("vq_ckpt.json", "vq_ckpt.safetensors")


def iter_images(shard_dirs: list[str | Path]) -> Iterator[tuple[str, bytes]]:
    """(name, encoded image) for every image and image-caption pair in the directories."""
    for d in shard_dirs:
        reader = ShardReader(d)
        for s in reader:
            image = image_alone(s.members)
            if image is not None:
                yield f"{d}/{s.shard}:{s.key}", next(iter(image.values()))


def shuffled_images(shard_dirs, seed: int, rank: int = 0, world: int = 1, buffer: int = SHUFFLE_BUFFER) -> Iterator[tuple[str, bytes]]:
    """Endless (name, bytes): epochs through a seeded shuffle buffer; rank r keeps the images
    at positions r, r + world, ..."""
    epoch = 0
    while True:
        rng = random.Random(f"{seed}:{epoch}")
        pool, mine = [], 0
        for pos, entry in enumerate(iter_images(shard_dirs)):
            if pos % world != rank:
                continue
            mine += 1
            pool.append(entry)
            if len(pool) >= buffer:
                i = rng.randrange(len(pool))
                pool[i], pool[-1] = pool[-1], pool[i]
                yield pool.pop()
        if not mine:
            raise ValueError(f"no images for rank {rank} of {world} in {', '.join(map(str, shard_dirs))}: "
                             "train-vq needs image or pair samples (at least one per rank)")
        rng.shuffle(pool)
        yield from pool
        epoch += 1


class Batches:
    """Decoded uint8 batches [batch, 3, R, R] from the image stream, decoded by a thread pool (PIL
    releases the GIL) in stream order. Its state is `consumed`, the stream entries taken (bad
    ones too), so a resumed run skips exactly those without decoding (the loader contract
    the checkpoint manager saves per rank)."""

    def __init__(self, entries: Iterator, batch: int, resolution: int, threads: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.entries, self.batch, self.resolution = entries, batch, resolution
        self.consumed, self.bad = 0, {}
        self.pool = ThreadPoolExecutor(threads)

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        for _ in range(state["consumed"] - self.consumed):  # a fresh stream: skip to the saved position
            next(self.entries)
        self.consumed = state["consumed"]

    def _load(self, entry):
        name, data = entry
        try:
            return load_image(data, self.resolution)
        except Exception as e:  # any decoder failure: skip that image, keep training
            self.bad[name] = f"{type(e).__name__}: {e}"
            return None

    def __next__(self) -> torch.Tensor:
        images, tried = [], 0
        while len(images) < self.batch:
            entries = [next(self.entries) for _ in range(self.batch - len(images))]
            self.consumed += len(entries)
            images += [x for x in self.pool.map(self._load, entries) if x is not None]
            tried += len(entries)
            if not images and tried >= 1000:
                raise ValueError(f"{tried} images in a row do not decode, e.g. {next(iter(self.bad.items()))}")
        return torch.from_numpy(np.stack(images))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(4.0 / mse)


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM per image (Gaussian window 11, sigma 1.5, on [0, 1] images)."""
    x, y = (x.float() + 1) / 2, (y.float() + 1) / 2
    size = min(11, x.shape[-1], x.shape[-2])
    g = torch.exp(-((torch.arange(size, dtype=torch.float32) - (size - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).to(x.device).expand(x.shape[1], 1, size, size)

    def blur(t):
        return F.conv2d(t, w, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)




@dataclass(frozen=True)
class VQTrain:
    """train-vq's options that decide what a checkpoint continues (`--steps` may grow on
    resume, and the log and checkpoint cadence may change)."""

    batch_size: int
    lr: float
    restart_every: int
    disc_weight: float
    disc_start: int
    perceptual_weights: str | None
    perceptual_weight: float
    seed: int
    mixed_precision: str = "auto"  # parallel.use_bf16's rule: bf16 autocast on a GPU


class Trainee(torch.nn.Module):
    """What a checkpoint holds beside the optimizers, as one module for the checkpoint
    manager: the VQ, its discriminator (None when --disc-weight is 0) and the dead-code
    window's counts (a restart depends on the partial window)."""

    def __init__(self, cfg: VQConfig, disc_weight: float):
        super().__init__()
        self.vq = VQModel(cfg)
        self.disc = PatchDiscriminator() if disc_weight > 0 else None
        self.register_buffer("window_counts", torch.zeros(cfg.codebook_size, dtype=torch.long))


def train_vq(shard_dirs: list[str | Path], out: str | Path, cfg: VQConfig, *, steps: int, batch_size: int = 8,
             lr: float = 1e-4, log_every: int = 100, checkpoint_every: int = 1000, restart_every: int = 100,
             disc_weight: float = 0.1, disc_start: int = 10_000, perceptual_weights: str | None = None,
             perceptual_weight: float = 1.0, seed: int = 0, device: str | None = None, restart: bool = False,
             memory_check: bool = True, progress: bool = False, log=print) -> dict:
    """Train (or resume) and write vq.safetensors + vq.json into `out`; returns the last metrics.
    Refuses (ValueError, naming settings that fit) when the memory estimate exceeds what the
    device has available, unless `memory_check` is off."""
    out = Path(out)
    opts = VQTrain(batch_size, lr, restart_every, disc_weight, disc_start, perceptual_weights, perceptual_weight, seed)
    _check_out(out, cfg, restart)
    rank, world, device = init_distributed(device)
    try:
        trainee, perceptual, est = _build(shard_dirs, cfg, opts, steps, device, rank, memory_check, log)
        if restart and rank == 0:  # --restart: the earlier run's state goes, old format or new
            shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
            for name in OLD_CHECKPOINT:
                (out / name).unlink(missing_ok=True)
        if world > 1:
            dist.barrier()
        run = {"model": cfg.to_dict(), **asdict(opts), "world_size": world, "inputs": [str(d) for d in shard_dirs]}
        metrics, step, bad = _train(out, trainee, perceptual, opts, run, steps, log_every, checkpoint_every,
                                    rank, world, device, progress, log)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        trainee.vq.eval().save(out)
        if (out / VOCAB_FILE).exists():
            vocab = Vocab.load(out)
            vocab.image_tokens_per_image = cfg.tokens_per_image
            vocab.save(out)
        if bad:
            name, reason = next(iter(bad.items()))
            log(f"skipped {len(bad)} images that do not decode, e.g. {name}: {reason}")
    return {**metrics, "step": step, "skipped_images": len(bad), "out": str(out), "memory_estimate_bytes": est["total"]}


def _check_out(out: Path, cfg: VQConfig, restart: bool) -> None:
    """Refuse an `out` whose vocabulary does not fit `cfg`, or that holds an old-format
    checkpoint (unless --restart, which trains from scratch)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / VOCAB_FILE).exists():
        vocab = Vocab.load(out)
        if vocab.text_tokenizer:  # an imported tokenizer (mmtok import-tokenizer): its VQ is not replaced
            raise ValueError(f"{out} holds an imported tokenizer; train into another --out")
        if vocab.n_image_codes != cfg.codebook_size:
            raise ValueError(f"{out}/{VOCAB_FILE} reserves {vocab.n_image_codes} image codes but --codebook-size is "
                             f"{cfg.codebook_size}; use --codebook-size {vocab.n_image_codes} or another --out")
    old = [name for name in OLD_CHECKPOINT if (out / name).exists()]
    if old and not restart:
        raise ValueError(f"{out / old[0]} is a train-vq checkpoint in the format of an earlier mmtok, which this one "
                         f"does not read; finish that run with the mmtok that wrote it, or pass --restart to train "
                         f"again from scratch (it deletes {' and '.join(old)})")


def _build(shard_dirs, cfg: VQConfig, opts: VQTrain, steps: int, device: torch.device, rank: int, memory_check: bool,
           log) -> tuple[Trainee, PerceptualLoss | None, dict]:
    """The models on `device`, after the memory estimate allowed them there."""
    torch.manual_seed(opts.seed)
    trainee = Trainee(cfg, opts.disc_weight)
    perceptual = PerceptualLoss(opts.perceptual_weights) if opts.perceptual_weights else None
    # before anything large is allocated: a run that cannot fit is refused, not killed by the kernel
    disc = trainee.disc if steps > opts.disc_start else None
    est = memory_estimate(trainee.vq, disc, perceptual, opts.batch_size, shard_dirs, str(device))
    if rank == 0:
        log(f"train-vq: {sum(p.numel() for p in trainee.vq.parameters()) / 1e6:.1f}M parameters, {cfg.resolution} px, "
            f"batch {opts.batch_size}, {steps} steps on {device}; estimated peak memory {est['total'] / 2**30:.1f} GiB "
            f"per process, {est['available'] / 2**30:.1f} GiB available (lower with --batch-size or --resolution)")
    if memory_check and est["needed"] > est["available"]:
        raise ValueError(f"train-vq would need about {est['needed'] / 2**30:.1f} GiB of {est['where']} memory (estimate) but "
                         f"{est['available'] / 2**30:.1f} GiB is available; {fitting_settings(est, cfg, opts.batch_size)}, "
                         "or pass --no-memory-check to try anyway")
    torch.manual_seed(opts.seed + 1)  # the dead-code restarts' stream (the checkpoint manager keeps its state)
    return trainee.to(device), perceptual.to(device) if perceptual is not None else None, est


def _optimizers(trainee: Trainee, opts: VQTrain) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer | None]:
    adam = lambda m: torch.optim.Adam(m.parameters(), lr=opts.lr, betas=(0.5, 0.9))  # noqa: E731
    return adam(trainee.vq), adam(trainee.disc) if trainee.disc is not None else None


def _saved(opt, opt_d, step: int, opts: VQTrain) -> tuple:
    """The optimizers a checkpoint at `step` holds: the discriminator's once it has stepped
    (an unstepped Adam would get a stand-in state from DCP, and its first real step another
    bias correction)."""
    return (opt, opt_d) if opt_d is not None and step > opts.disc_start else (opt,)


def _resume(out: Path, ckptr: Checkpointer, trainee: Trainee, opt, opt_d, batches: Batches, opts: VQTrain,
            run: dict, log) -> int:
    """The step of `out`'s newest checkpoint, loaded (0 without one); other options are refused."""
    ckpt = intact_checkpoint(out)
    if ckpt is None:
        return 0
    saved = read_json(ckpt / TRAIN_STATE)
    if saved.get("vq_run") != run:
        diff = sorted(k for k in run if (saved.get("vq_run") or {}).get(k) != run[k])
        raise ValueError(f"{out} holds a train-vq checkpoint with other options ({', '.join(diff)}); "
                         "rerun with the same options to resume, or pass --restart to start again")
    step = ckptr.load(ckpt, trainee, _saved(opt, opt_d, checkpoint_step(ckpt), opts), batches)
    log(f"resuming from {ckpt} at step {step}")
    return step


def _train(out: Path, trainee: Trainee, perceptual, opts: VQTrain, run: dict, steps: int, log_every: int,
           checkpoint_every: int, rank: int, world: int, device: torch.device, progress: bool,
           log) -> tuple[dict, int, dict]:
    """The GAN loop from the newest checkpoint to `steps`: (last metrics, step, undecodable images)."""
    opt, opt_d = _optimizers(trainee, opts)
    batches = Batches(shuffled_images(run["inputs"], opts.seed, rank, world), opts.batch_size,
                      trainee.vq.cfg.resolution, threads=min(8, os.cpu_count() or 1))
    ckptr = Checkpointer(out, rank, world, keep=1)
    step = _resume(out, ckptr, trainee, opt, opt_d, batches, opts, run, log)
    log_file = Metrics(out, rank, step, name=LOG, tensorboard=False)
    vq, disc = trainee.vq, trainee.disc
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        vq, disc = DDP(vq, device_ids=ids), DDP(disc, device_ids=ids) if disc is not None else None
    bf16 = use_bf16(opts, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    step_fn = lambda x, use_disc: _gan_step(vq, disc, perceptual, opt, opt_d, x, use_disc, opts, autocast)  # noqa: E731
    interval, metrics, t0 = _fresh(trainee, device), {}, time.perf_counter()
    with runner.progress_bar("train-vq", steps, step, progress and rank == 0) as bar:
        while step < steps:
            x = to_unit(next(batches).to(device, non_blocking=True))
            use_disc = disc is not None and step >= opts.disc_start
            recon, idx, z, rec_loss = step_fn(x, use_disc)
            step += 1
            bar.advance()
            _count(trainee, interval, idx, z, recon, x, rec_loss, step % opts.restart_every == 0, world)
            if step % log_every == 0 or step == steps:
                metrics = _interval_metrics(interval, step, world > 1)
                metrics["disc"] = use_disc
                metrics["images_per_s"] = round(interval["n"] * opts.batch_size * world / (time.perf_counter() - t0), 2)
                if rank == 0:
                    log(f"step {step}: recon {metrics['recon']:.4f}  PSNR {metrics['psnr']:.2f} dB  SSIM "
                        f"{metrics['ssim']:.3f}  codes used {metrics['usage']:.1%}  perplexity {metrics['perplexity']:.1f}")
                log_file.write(metrics)
                interval, t0 = _fresh(trainee, device), time.perf_counter()
            if step % checkpoint_every == 0 or step == steps:
                if world > 1:  # every rank keeps the global window: only which codes it missed matters to a restart
                    dist.all_reduce(trainee.window_counts)
                ckptr.save(step, trainee, _saved(opt, opt_d, step, opts), batches, {"vq_run": run})
    log_file.close()
    return metrics, step, batches.bad


def _gan_step(vq, disc, perceptual, opt, opt_d, x: torch.Tensor, use_disc: bool, opts: VQTrain, autocast):
    """One generator step, then (from --disc-start) one discriminator step; returns the
    reconstruction, codes, encoder outputs and L1 loss."""
    with autocast:
        recon, idx, qloss, z = vq(x)
        rec_loss = (recon.float() - x).abs().mean()
        loss = rec_loss + qloss
        if perceptual is not None:
            loss = loss + opts.perceptual_weight * perceptual(recon.float(), x)
        if use_disc:
            loss = loss - opts.disc_weight * disc(recon).float().mean()  # hinge generator loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if use_disc:
        with autocast:  # real and fake in one forward (one DDP reduction)
            real, fake = disc(torch.cat([x, recon.detach()])).float().chunk(2)
            d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
    return recon, idx, z, rec_loss


def _fresh(trainee: Trainee, device) -> dict:
    return {"n": 0, "sums": torch.zeros(3, device=device), "counts": torch.zeros_like(trainee.window_counts)}


@torch.no_grad()
def _count(trainee: Trainee, interval: dict, idx, z, recon, x, rec_loss, restart: bool, world: int) -> None:
    """A step's code counts and metric sums (on the device: no host sync per step); at the
    window's end, dead codes restarted."""
    counts = torch.bincount(idx.flatten(), minlength=trainee.vq.cfg.codebook_size)
    trainee.window_counts += counts
    interval["counts"] += counts
    interval["n"] += 1
    interval["sums"] += torch.stack([rec_loss.detach().float(), psnr(recon, x).mean(), ssim(recon, x).mean()])
    if restart:
        _restart_dead(trainee.vq, trainee.window_counts, z, world > 1)
        trainee.window_counts.zero_()

def _interval_metrics(interval: dict, step: int, distributed: bool) -> dict:
    sums = torch.cat([interval["sums"].double(), torch.tensor([interval["n"]], dtype=torch.float64, device=interval["sums"].device)])
    counts = interval["counts"].clone()
    if distributed:
        dist.all_reduce(sums)
        dist.all_reduce(counts)
    sums = sums.cpu()
    n = max(sums[3].item(), 1)
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"step": step, "recon": sums[0].item() / n, "psnr": sums[1].item() / n, "ssim": sums[2].item() / n,
            "usage": (counts > 0).float().mean().item(), "perplexity": math.exp(entropy)}


@torch.no_grad()
def _restart_dead(model: VQModel, window_counts: torch.Tensor, z: torch.Tensor, distributed: bool) -> None:
    """Codes unused for a whole window move onto current encoder outputs (drawn from the
    global RNG, which the checkpoint manager keeps). Under DDP the counts are summed over
    ranks and rank 0's new codebook is broadcast."""
    if distributed:
        dist.all_reduce(window_counts)
    model.quantizer.restart(window_counts == 0, z, None)
    if distributed:
        dist.broadcast(model.quantizer.codebook.data, 0)
