"""`train-vq`: train the VQ image tokenizer on the images in shard directories.

`VQJob` is a job of the one training loop (`train.run_job`), with the tokenizer directory as
its output. One process on CPU or one GPU; under torchrun (WORLD_SIZE > 1) each rank reads
its share of the images and gradients are averaged with DistributedDataParallel. Its step
is a GAN step: two optimizers stepping in turn on the VQ and its discriminator at a
constant learning rate, with dead-code restarts between steps; bf16 autocast on a GPU
(`parallel.use_bf16`). The loop's checkpoint manager keeps model + discriminator + dead-code
window, both optimizers, each rank's image position and RNG in OUT/checkpoints/, and its
metrics log is vq_log.jsonl (cut back on resume). A later run with the same options resumes
from the newest checkpoint automatically; SIGINT/SIGTERM saves one after the step in
flight. The image stream is a pure function of (seed, step), so a resumed run sees the same
batches and ends where an uninterrupted one does.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmtok.shards import ShardReader, read_json
from mmtok.tokenizer import IMAGE_EXTS, image_alone
from mmtok.trainer.checkpoint import CKPT_DIR, TRAIN_STATE, checkpoint_step, intact_checkpoint
from mmtok.trainer.job import Cadence, Job, TrainError
from mmtok.trainer.parallel import use_bf16
from mmtok.trainer.train import run_job
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


def enough_images(shard_dirs, n: int) -> bool:
    """Whether the shards hold `n` samples with an image (`image_alone`'s rule), read from
    their indexes until that many are seen (an index without member lists: assumed so)."""
    seen = 0
    for d in shard_dirs:
        index = ShardReader(d).index()
        if "members" not in index.column_names:
            return True
        for start in range(0, index.num_rows, 10_000):
            for members in index.slice(start, 10_000).column("members").to_pylist():
                seen += any(m["ext"] in IMAGE_EXTS for m in members)
                if seen >= n:
                    return True
    return False


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

    def __iter__(self):
        return self

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


class VQJob(Job):
    """train-vq as a job of the one loop (`train.run_job`) on the tokenizer directory: it
    resumes from the newest checkpoint whenever the options match (no --resume), keeps one
    checkpoint, logs to vq_log.jsonl, and writes vq.safetensors + vq.json at the end."""

    name = "train-vq"
    log_file, tensorboard, keep = LOG, False, 1

    def __init__(self, shard_dirs, cfg: VQConfig, opts: VQTrain, cadence: Cadence, device: str | None, restart: bool,
                 memory_check: bool, log):
        self.cfg, self.opts, self.train, self.device = cfg, opts, cadence, device
        self.inputs, self.restart, self.memory_check, self.log = [str(d) for d in shard_dirs], restart, memory_check, log
        self.data = ", ".join(self.inputs)
        self.last = {}  # the latest record

    def _run(self, world: int) -> dict:
        """The settings a checkpoint continues (train_state.json's `vq_run`)."""
        return {"model": self.cfg.to_dict(), **asdict(self.opts), "world_size": world, "inputs": self.inputs}

    def claim(self, out: Path, resume: bool, world: int) -> Path | None:
        if not enough_images(self.inputs, world):  # before the estimate, which would be of nothing
            raise TrainError(f"no images in {self.data}: train-vq needs image or pair samples (at least one per "
                             f"process: {world})")
        _check_out(out, self.cfg, self.restart)
        ckpt = None if self.restart else intact_checkpoint(out)
        if ckpt is not None:
            saved, run = read_json(ckpt / TRAIN_STATE).get("vq_run") or {}, self._run(world)
            if saved != run:
                diff = sorted(k for k in run if saved.get(k) != run[k])
                raise TrainError(f"{out} holds a train-vq checkpoint with other options ({', '.join(diff)}); "
                                 "rerun with the same options to resume, or pass --restart to start again")
            self.log(f"resuming from {ckpt} at step {checkpoint_step(ckpt)}")
        return ckpt

    def make_loader(self, rank: int, world: int, ckpt, start: int, end: int) -> Batches:
        self.batches = Batches(shuffled_images(self.inputs, self.opts.seed, rank, world), self.opts.batch_size,
                               self.cfg.resolution, threads=min(8, os.cpu_count() or 1))
        return self.batches

    def build(self, out: Path, rank: int, world: int, device) -> Trainee:
        trainee, self.perceptual, self.estimate = _build(self.inputs, self.cfg, self.opts, self.train.steps, device,
                                                         rank, self.memory_check, self.log)
        if self.restart and rank == 0:  # --restart: the earlier run's state goes (after the memory check), old format or new
            shutil.rmtree(out / CKPT_DIR, ignore_errors=True)
            for name in OLD_CHECKPOINT:
                (out / name).unlink(missing_ok=True)
        if world > 1:
            dist.barrier()
        self.trainee, self.vq, self.disc, self._device = trainee, trainee.vq, trainee.disc, device
        if world > 1:  # the checkpoint holds the Trainee; the steps run on its DDP-wrapped parts
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            self.vq = DDP(self.vq, device_ids=ids)
            self.disc = DDP(self.disc, device_ids=ids) if self.disc is not None else None
        self._autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(self.opts, device))
        self._rank, self._world, self._interval = rank, world, _fresh(trainee, device)
        return trainee

    def optimizers(self, trainee: Trainee) -> tuple:
        adam = lambda m: torch.optim.Adam(m.parameters(), lr=self.opts.lr, betas=(0.5, 0.9))  # noqa: E731
        return adam(trainee.vq), adam(trainee.disc) if trainee.disc is not None else None

    def checkpoint_state(self, trainee: Trainee, optimizers: tuple, batches: Batches, step: int) -> tuple:
        """The discriminator's optimizer once it has stepped (an unstepped Adam would get a
        stand-in state from DCP, and its first real step another bias correction). Every rank
        keeps the global dead-code window: only which codes it missed matters to a restart."""
        if self._world > 1:
            dist.all_reduce(trainee.window_counts)
        opt, opt_d = optimizers
        return trainee, (opt, opt_d) if opt_d is not None and step > self.opts.disc_start else (opt,), batches

    def step(self, trainee: Trainee, optimizers: tuple, batches: Batches, step: int) -> bool:
        x = to_unit(next(batches).to(self._device, non_blocking=True))
        self._use_disc = self.disc is not None and step >= self.opts.disc_start
        recon, idx, z, rec_loss = _gan_step(self.vq, self.disc, self.perceptual, *optimizers, x, self._use_disc,
                                            self.opts, self._autocast)
        _count(trainee, self._interval, idx, z, recon, x, rec_loss, (step + 1) % self.opts.restart_every == 0,
               self._world)
        return True

    def record(self, step: int, seconds: float, world: int) -> dict:
        m = _interval_metrics(self._interval, step, world > 1)
        m["disc"] = self._use_disc
        m["images_per_s"] = round(self._interval["n"] * self.opts.batch_size * world / seconds, 2)
        if self._rank == 0:
            self.log(self.describe(m))
        self.last, self._interval = m, _fresh(self.trainee, self._device)
        return m

    def describe(self, m: dict) -> str:
        return (f"step {m['step']}: recon {m['recon']:.4f}  PSNR {m['psnr']:.2f} dB  SSIM {m['ssim']:.3f}  "
                f"codes used {m['usage']:.1%}  perplexity {m['perplexity']:.1f}")

    def checkpoint_meta(self, world: int) -> dict:
        return {"vq_run": self._run(world)}

    def summary(self, out: Path, rank: int, step: int, status: str) -> dict:
        if rank == 0 and status == "finished":
            self.trainee.vq.eval().save(out)
            if (out / VOCAB_FILE).exists():
                vocab = Vocab.load(out)
                vocab.image_tokens_per_image = self.cfg.tokens_per_image
                vocab.save(out)
        bad = self.batches.bad
        if bad and rank == 0:
            name, reason = next(iter(bad.items()))
            self.log(f"skipped {len(bad)} images that do not decode, e.g. {name}: {reason}")
        last = {k: v for k, v in self.last.items() if k != "step"}  # the loop's step stands
        return {**last, "skipped_images": len(bad), "out": str(out),
                "memory_estimate_bytes": self.estimate["total"]}


def train_vq(shard_dirs: list[str | Path], out: str | Path, cfg: VQConfig, *, steps: int, batch_size: int = 8,
             lr: float = 1e-4, log_every: int = 100, checkpoint_every: int = 1000, restart_every: int = 100,
             disc_weight: float = 0.1, disc_start: int = 10_000, perceptual_weights: str | None = None,
             perceptual_weight: float = 1.0, seed: int = 0, device: str | None = None, restart: bool = False,
             memory_check: bool = True, progress: bool = False, log=print) -> dict:
    """Train (or resume) and write vq.safetensors + vq.json into `out`; returns the last metrics
    with the loop's status ("interrupted": a checkpoint saved, no tokenizer written).
    Refuses (ValueError, naming settings that fit) when the memory estimate exceeds what the
    device has available, unless `memory_check` is off."""
    opts = VQTrain(batch_size, lr, restart_every, disc_weight, disc_start, perceptual_weights, perceptual_weight, seed)
    job = VQJob(shard_dirs, cfg, opts, Cadence(steps, log_every, checkpoint_every), device, restart, memory_check, log)
    ours = not dist.is_initialized()  # a caller's process group is left to the caller
    try:
        summary = run_job(job, out, live=progress)
    finally:
        if ours and dist.is_initialized():
            dist.destroy_process_group()
    return {k: v for k, v in summary.items() if k != "run"}


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
