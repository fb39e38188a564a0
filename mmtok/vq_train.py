"""`train-vq`: train the VQ image tokenizer on the images in shard directories.

One process on CPU or one GPU; under torchrun (WORLD_SIZE > 1) each rank reads its share
of the images and gradients are averaged with DistributedDataParallel. Every
`--checkpoint-every` steps the full training state (model, discriminator, optimizers,
restart RNG, step) goes to `vq_ckpt.safetensors` + `vq_ckpt.json` in the output
directory; a later run with the same options resumes from it automatically. The image
stream is a pure function of (seed, step), so a resumed run sees the same batches.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mmtok.shards import ShardReader, atomic_write
from mmtok.tokenize import image_alone
from mmtok.vocab import VOCAB_FILE, Vocab
from mmtok.vq import PatchDiscriminator, PerceptualLoss, VQConfig, VQModel, load_image, to_unit

CKPT = "vq_ckpt.safetensors"
CKPT_META = "vq_ckpt.json"
LOG = "vq_log.jsonl"


def iter_images(shard_dirs: list[str | Path]) -> Iterator[tuple[str, bytes]]:
    """(name, encoded image) for every image and image-caption pair in the directories."""
    for d in shard_dirs:
        reader = ShardReader(d)
        for s in reader:
            image = image_alone(s.members)
            if image is not None:
                yield f"{d}/{s.shard}:{s.key}", next(iter(image.values()))


def shuffled_images(shard_dirs, seed: int, rank: int = 0, world: int = 1, buffer: int = 1000) -> Iterator[tuple[str, bytes]]:
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
    releases the GIL) in stream order. `consumed` counts the stream entries taken (bad
    ones too), so a resumed run skips exactly those without decoding."""

    def __init__(self, entries: Iterator, batch: int, resolution: int, skip: int = 0, threads: int = 4):
        from concurrent.futures import ThreadPoolExecutor

        self.entries, self.batch, self.resolution = entries, batch, resolution
        self.consumed, self.bad = skip, {}
        self.pool = ThreadPoolExecutor(threads)
        for _ in range(skip):
            next(self.entries)

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


def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer, tensors: dict) -> dict:
    """Optimizer state as flat tensors (for safetensors) plus its JSON-able rest."""
    sd = opt.state_dict()
    for pid, st in sd["state"].items():
        for name, t in st.items():
            tensors[f"{prefix}.{pid}.{name}"] = torch.as_tensor(t).detach().cpu().contiguous()
    return {"param_groups": sd["param_groups"]}


def _unflatten_optimizer(prefix: str, meta: dict, tensors: dict) -> dict:
    state: dict = {}
    for k, t in tensors.items():
        if k.startswith(prefix + "."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def train_vq(shard_dirs: list[str | Path], out: str | Path, cfg: VQConfig, *, steps: int, batch_size: int = 8,
             lr: float = 1e-4, log_every: int = 100, checkpoint_every: int = 1000, restart_every: int = 100,
             disc_weight: float = 0.1, disc_start: int = 10_000, perceptual_weights: str | None = None,
             perceptual_weight: float = 1.0, seed: int = 0, device: str | None = None, restart: bool = False,
             log=print) -> dict:
    """Train (or resume) and write vq.safetensors + vq.json into `out`; returns the last metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / VOCAB_FILE).exists():
        vocab = Vocab.load(out)
        if vocab.text_tokenizer:  # an imported tokenizer (mmtok import-tokenizer): its VQ is not replaced
            raise ValueError(f"{out} holds an imported tokenizer; train into another --out")
        if vocab.n_image_codes != cfg.codebook_size:
            raise ValueError(f"{out}/{VOCAB_FILE} reserves {vocab.n_image_codes} image codes but --codebook-size is "
                             f"{cfg.codebook_size}; use --codebook-size {vocab.n_image_codes} or another --out")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    distributed = world > 1
    if device is None:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)

    run = {"model": cfg.to_dict(), "batch_size": batch_size, "lr": lr, "restart_every": restart_every,
           "disc_weight": disc_weight, "disc_start": disc_start, "perceptual_weights": perceptual_weights,
           "perceptual_weight": perceptual_weight, "seed": seed, "world_size": world,
           "inputs": [str(d) for d in shard_dirs]}
    torch.manual_seed(seed)
    model = VQModel(cfg).to(device)
    disc = PatchDiscriminator().to(device) if disc_weight > 0 else None
    perceptual = PerceptualLoss(perceptual_weights).to(device) if perceptual_weights else None
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.9)) if disc else None
    gen = torch.Generator().manual_seed(seed + 1)

    window_counts = torch.zeros(cfg.codebook_size, dtype=torch.long, device=device)
    step, consumed = 0, 0
    if (out / CKPT_META).exists() and not restart:
        step, consumed = _load_checkpoint(out, run, model, disc, opt, opt_d, gen, window_counts)
        log(f"resuming from {out / CKPT} at step {step}")
    log_path = out / LOG
    if rank == 0:
        _truncate_log(log_path, step)

    ddp_model, ddp_disc = model, disc
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.device(device).index] if device.startswith("cuda") else None
        ddp_model = DDP(model, device_ids=ids)
        ddp_disc = DDP(disc, device_ids=ids) if disc else None

    batches = Batches(shuffled_images(shard_dirs, seed, rank, world), batch_size, cfg.resolution, skip=consumed,
                      threads=min(8, os.cpu_count() or 1))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    def fresh() -> dict:
        return {"n": 0, "sums": torch.zeros(3, device=device), "counts": torch.zeros_like(window_counts)}

    interval, metrics = fresh(), {}
    t0 = time.perf_counter()
    while step < steps:
        x = to_unit(next(batches).to(device, non_blocking=True))
        use_disc = disc is not None and step >= disc_start
        with autocast:
            recon, idx, qloss, z = ddp_model(x)
            rec_loss = (recon.float() - x).abs().mean()
            loss = rec_loss + qloss
            if perceptual is not None:
                loss = loss + perceptual_weight * perceptual(recon.float(), x)
            if use_disc:
                loss = loss - disc_weight * ddp_disc(recon).float().mean()  # hinge generator loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if use_disc:
            with autocast:  # real and fake in one forward (one DDP reduction)
                real, fake = ddp_disc(torch.cat([x, recon.detach()])).float().chunk(2)
                d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        step += 1

        with torch.no_grad():
            counts = torch.bincount(idx.flatten(), minlength=cfg.codebook_size)
            window_counts += counts
            interval["counts"] += counts
            interval["n"] += 1
            # summed on the device: no host sync per step
            interval["sums"] += torch.stack([rec_loss.detach().float(), psnr(recon, x).mean(), ssim(recon, x).mean()])
            if step % restart_every == 0:
                _restart_dead(model, window_counts, z, gen, distributed)
                window_counts.zero_()

        if step % log_every == 0 or step == steps:
            metrics = _interval_metrics(interval, step, distributed)
            metrics["disc"] = use_disc
            metrics["images_per_s"] = round(interval["n"] * batch_size * world / (time.perf_counter() - t0), 2)
            if rank == 0:
                log(f"step {step}: recon {metrics['recon']:.4f}  PSNR {metrics['psnr']:.2f} dB  "
                    f"SSIM {metrics['ssim']:.3f}  codes used {metrics['usage']:.1%}  perplexity {metrics['perplexity']:.1f}")
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics, sort_keys=True) + "\n")
            interval = fresh()
            t0 = time.perf_counter()
        if step % checkpoint_every == 0 or step == steps:
            if distributed:  # the checkpoint keeps the global counts: gather them onto rank 0
                import torch.distributed as dist

                dist.all_reduce(window_counts)
                if rank != 0:
                    window_counts.zero_()
            if rank == 0:
                _save_checkpoint(out, run, step, batches.consumed, model, disc, opt, opt_d, gen, window_counts)

    if rank == 0:
        model.eval().save(out)
        if (out / VOCAB_FILE).exists():
            vocab = Vocab.load(out)
            vocab.image_tokens_per_image = cfg.tokens_per_image
            vocab.save(out)
    if batches.bad and rank == 0:
        name, reason = next(iter(batches.bad.items()))
        log(f"skipped {len(batches.bad)} images that do not decode, e.g. {name}: {reason}")
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {**metrics, "step": step, "skipped_images": len(batches.bad), "out": str(out)}


def _interval_metrics(interval: dict, step: int, distributed: bool) -> dict:
    sums = torch.cat([interval["sums"].double(), torch.tensor([interval["n"]], dtype=torch.float64, device=interval["sums"].device)])
    counts = interval["counts"].clone()
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(sums)
        dist.all_reduce(counts)
    sums = sums.cpu()
    n = max(sums[3].item(), 1)
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"step": step, "recon": sums[0].item() / n, "psnr": sums[1].item() / n, "ssim": sums[2].item() / n,
            "usage": (counts > 0).float().mean().item(), "perplexity": math.exp(entropy)}


@torch.no_grad()
def _restart_dead(model: VQModel, window_counts: torch.Tensor, z: torch.Tensor, gen: torch.Generator,
                  distributed: bool) -> None:
    """Codes unused for a whole window move onto current encoder outputs. Under DDP the
    counts are summed over ranks and rank 0's new codebook is broadcast."""
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(window_counts)
        model.quantizer.restart(window_counts == 0, z, gen)
        dist.broadcast(model.quantizer.codebook.data, 0)
    else:
        model.quantizer.restart(window_counts == 0, z, gen)


def _save_checkpoint(out: Path, run: dict, step: int, consumed: int, model, disc, opt, opt_d, gen,
                     window_counts: torch.Tensor) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"step": step, "consumed": consumed, "run": run, "opt": _flatten_optimizer("opt", opt, tensors)}
    if disc is not None:
        tensors.update({f"disc.{k}": v.detach().cpu().contiguous() for k, v in disc.state_dict().items()})
        meta["opt_d"] = _flatten_optimizer("opt_d", opt_d, tensors)
    tensors["rng"] = gen.get_state()
    tensors["window_counts"] = window_counts.cpu()  # dead-code restarts depend on the partial window
    tmp = out / f".{CKPT}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(out / CKPT)  # weights first, then the metadata that points at them
    atomic_write(out / CKPT_META, json.dumps(meta, sort_keys=True, indent=1).encode())


def _load_checkpoint(out: Path, run: dict, model, disc, opt, opt_d, gen, window_counts) -> tuple[int, int]:
    from safetensors.torch import load_file

    meta = json.loads((out / CKPT_META).read_text())
    if meta["run"] != run:
        diff = sorted(k for k in run if meta["run"].get(k) != run[k])
        raise ValueError(f"{out} holds a train-vq checkpoint with other options ({', '.join(diff)}); "
                         "rerun with the same options to resume, or pass --restart to start again")
    tensors = load_file(str(out / CKPT))
    dev = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt.load_state_dict(_unflatten_optimizer("opt", meta["opt"], tensors))
    if disc is not None:
        disc.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("disc.")})
        opt_d.load_state_dict(_unflatten_optimizer("opt_d", meta["opt_d"], tensors))
    gen.set_state(tensors["rng"])
    window_counts.copy_(tensors["window_counts"])
    model.to(dev)
    return int(meta["step"]), int(meta["consumed"])


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint we resume from (a killed run may have logged them)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text(encoding="utf-8").splitlines() if l.strip() and json.loads(l)["step"] <= step]
    atomic_write(path, "".join(l + "\n" for l in keep).encode())
