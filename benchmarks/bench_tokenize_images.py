"""`tokenize-images` throughput, side by side with the bare encoder, against a FLOP floor.

For each resolution: a VQ of the default (Chameleon-sized) architecture with random
weights (throughput does not depend on the weights), a shard directory of generated JPEGs,
and three numbers measured on this machine:
- stage: the whole `tokenize_images` stage (read shards, decode + preprocess in workers,
  batched encoding, write code shards) in images/s;
- bare: the encoder alone on preprocessed tensors of the same batch size, in images/s;
- floor: encoder FLOPs per image (torch's FLOP counter) over the rate of a large fp32
  matrix multiply (bf16 on CUDA) measured here, i.e. the images/s if the encoder ran
  at matmul speed. The report gives stage and bare as a fraction of it.

Run: .venv/bin/python benchmarks/bench_tokenize_images.py                       # CPU, 256 px
     .venv/bin/python benchmarks/bench_tokenize_images.py --device cuda --resolutions 256 512 --images 512 --batch-size 64
     (add --source-px 1024 for camera-sized JPEG sources, which load_image decodes at reduced scale)
Writes benchmarks/results/tokenize_images-<device>.json.
"""

from __future__ import annotations

import argparse
import io
import random
import tempfile
import time
from pathlib import Path

import torch

from benchutil import save
from mmtok.runner import Item, Sample, run_stage
from mmtok.tokenize import Tokenizer, tokenize_images
from mmtok.vocab import Vocab
from mmtok.vq import VQConfig, VQModel


def jpeg(seed: int, size: int) -> bytes:
    from PIL import Image, ImageDraw

    r = random.Random(seed)
    img = Image.new("RGB", (size * 5 // 4, size), tuple(r.randrange(256) for _ in range(3)))
    d = ImageDraw.Draw(img)
    for _ in range(8):
        x, y = r.randrange(size), r.randrange(size)
        d.ellipse((x, y, x + r.randrange(8, size // 2), y + r.randrange(8, size // 2)),
                  fill=tuple(r.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _image_sample(entry):
    i, data = entry
    return Sample(f"i{i:06d}", "image-jpg", {"jpg": data}, {"modality": "image", "source": str(i), "sha256": str(i)})


def make_tokdir(path: Path, cfg: VQConfig) -> None:
    """A tokenizer directory: a tiny BPE (tokenize-images needs only the vocabulary) + a random VQ."""
    import sentencepiece as spm

    path.mkdir(parents=True)
    vocab = Vocab.layout(cfg.codebook_size + 16 + 600, cfg.codebook_size, cfg.tokens_per_image)
    words = [f"w{i} x{i % 7} y{i % 13}" for i in range(3000)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words), model_prefix=str(path / "bpe"), model_type="bpe",
                                   vocab_size=vocab.n_text, byte_fallback=True, bos_id=-1, eos_id=-1,
                                   hard_vocab_limit=True, minloglevel=2)
    vocab.save(path)
    VQModel(cfg).save(path)


def matmul_rate(device: str, n: int = 2048, repeat: int = 20) -> float:
    """FLOP/s of an n x n matrix multiply (fp32 on CPU, bf16 on CUDA)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def encoder_flops(model: VQModel, resolution: int, device: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, resolution, resolution, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.quantizer.codes(model.encoder(x))
    return counter.get_total_flops()


def bare_encoder(model: VQModel, resolution: int, n: int, batch: int, device: str) -> float:
    """images/s of the encoder + code lookup alone on preprocessed tensors."""
    x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    with autocast:
        model.encode(x)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        with autocast:
            model.encode(x)
        done += batch
    sync(device)
    return done / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--resolutions", type=int, nargs="+", default=[256])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--source-px", type=int, default=None,
                    help="short side of the generated JPEGs (default: the resolution; >= 2x takes the draft-decoding path)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    rate = matmul_rate(args.device)
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch_threads": torch.get_num_threads(), "matmul_gflops": round(rate / 1e9, 1), "runs": []}
    print(f"matmul: {rate / 1e9:.1f} GFLOP/s")
    for res in args.resolutions:
        cfg = VQConfig(resolution=res)  # Chameleon-sized: downsample 16, codebook 8192, channels 128
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            make_tokdir(tmp / "tok", cfg)
            items = [Item(str(i), (i, jpeg(i, args.source_px or res))) for i in range(args.images)]
            run_stage("shard", items, _image_sample, tmp / "shards", config={"bench": res}, progress=False)
            tok = Tokenizer.load(tmp / "tok", args.device)
            flops = encoder_flops(tok.vq, res, args.device)
            bare = bare_encoder(tok.vq, res, args.images, args.batch_size, args.device)
            sync(args.device)
            t0 = time.perf_counter()
            s = tokenize_images([tmp / "shards"], tok, tmp / "codes", batch_size=args.batch_size, workers=args.workers,
                                progress=False)
            sync(args.device)
            stage = s.samples / (time.perf_counter() - t0)
        floor = rate / flops
        run = {"resolution": res, "source_px": args.source_px or res, "codes_per_image": cfg.tokens_per_image,
               "images": args.images, "workers": args.workers,
               "batch_size": args.batch_size, "encoder_gflop_per_image": round(flops / 1e9, 2),
               "floor_images_per_s": round(floor, 2), "bare_images_per_s": round(bare, 2),
               "stage_images_per_s": round(stage, 2), "bare_fraction_of_floor": round(bare / floor, 3),
               "stage_fraction_of_floor": round(stage / floor, 3), "stage_over_bare": round(stage / bare, 3)}
        results["runs"].append(run)
        print(f"{res} px: encoder {run['encoder_gflop_per_image']} GFLOP/image; stage {stage:.2f} img/s, "
              f"bare encoder {bare:.2f} img/s, floor {floor:.2f} img/s -> stage at {stage / floor:.0%} of the floor, "
              f"{stage / bare:.0%} of the bare encoder")
    save(args.out or f"benchmarks/results/tokenize_images-{args.device}.json", results)


if __name__ == "__main__":
    main()
