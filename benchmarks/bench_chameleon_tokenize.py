"""Images/s of `tokenize-images` with an imported Chameleon VQ against transformers' own
image-token path, on the same images and device.

A random-weight ChameleonForConditionalGeneration (its text part tiny; the VQ sized by the
options, Chameleon's own by default on CUDA) is saved in Hugging Face's layout and imported
with `mmtok.chameleon.import_chameleon`. Then, over one set of generated JPEGs:
- mmtok: the whole `tokenize_images` stage (read shards, decode + preprocess in workers,
  batched encoding, write code shards);
- transformers: bytes -> PIL -> the processor `AutoImageProcessor` loads for the checkpoint
  -> `model.get_image_tokens`, in batches of the same size, under the same autocast as mmtok
  (bf16 on CUDA). It writes nothing, so the comparison favours it.
It also reports the share of codes on which the two agree (1.0 on a CPU; transformers' default
torchvision processor rounds resized pixels differently from its PIL one, which mmtok matches).

Run: .venv/bin/python benchmarks/bench_chameleon_tokenize.py                              # CPU, small VQ
     .venv/bin/python benchmarks/bench_chameleon_tokenize.py --device cuda --chameleon --images 512 --batch-size 64 --workers 8
Writes benchmarks/results/chameleon_tokenize-<device>.json.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np
import torch

from benchutil import best_of, machine, save
from bench_tokenize_images import _image_sample, jpeg
from mmtok.chameleon import image_token_name, import_chameleon
from mmtok.runner import Item, run_stage
from mmtok.shards import ShardReader, load_npy
from mmtok.tokenize import Tokenizer, tokenize_images


def make_checkpoint(path: Path, vq: dict) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, PreTrainedTokenizerFast
    from transformers.models.chameleon.image_processing_chameleon import ChameleonImageProcessor

    names = ["<s>", "<pad>", "</s>", "<unk>"] + [image_token_name(c) for c in range(vq["num_embeddings"])]
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["a few words of text for the merges"] * 10, trainers.BpeTrainer(
        special_tokens=names + ["<eoss>", "<racm3:break>", "<image>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    cfg = ChameleonConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, vocabulary_map=tok.get_vocab(),
                          image_token_id=tok.token_to_id("<image>"), vq_config=vq)
    torch.manual_seed(0)
    ChameleonForConditionalGeneration(cfg).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(path)
    r = vq["resolution"]
    ChameleonImageProcessor(size={"shortest_edge": r}, crop_size={"height": r, "width": r}).save_pretrained(path)


def transformers_codes(hf: Path, images: list[bytes], batch_size: int, device: torch.device,
                       repeat: int) -> tuple[float, np.ndarray]:
    from PIL import Image
    from transformers import AutoImageProcessor, ChameleonForConditionalGeneration

    model = ChameleonForConditionalGeneration.from_pretrained(hf).model.to(device).eval()
    proc = AutoImageProcessor.from_pretrained(hf)

    def run():
        out = []
        for i in range(0, len(images), batch_size):
            pil = [Image.open(io.BytesIO(b)) for b in images[i:i + batch_size]]
            x = proc(pil, return_tensors="pt").pixel_values.to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out.append(model.get_image_tokens(x).cpu().numpy())
        return np.concatenate(out)

    ids = run()  # also the warm-up (kernels, allocator)
    return len(images) / best_of(run, repeat), ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--chameleon", action="store_true", help="Chameleon's own VQ size (512 px, 8192 codes, 128 channels)")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs each")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    if a.chameleon:
        vq = dict(embed_dim=256, num_embeddings=8192, latent_channels=256, resolution=512, base_channels=128,
                  channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[])
    else:
        vq = dict(embed_dim=64, num_embeddings=1024, latent_channels=64, resolution=a.resolution, base_channels=32,
                  channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=1, attn_resolutions=[])
    res = vq["resolution"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_checkpoint(tmp / "hf", vq)
        import_chameleon(tmp / "hf", tmp / "tok")
        images = [jpeg(i, res * 5 // 4) for i in range(a.images)]
        run_stage("shard", [Item(str(i), (i, b)) for i, b in enumerate(images)], _image_sample, tmp / "shards",
                  config={}, progress=False)
        tok = Tokenizer.load(tmp / "tok", a.device)
        tokenize_images([tmp / "shards"], tok, tmp / "codes", batch_size=a.batch_size, workers=a.workers, progress=False)
        runs = iter(range(a.repeat))  # a fresh output directory per run

        def stage():
            tokenize_images([tmp / "shards"], tok, tmp / f"run{next(runs)}", batch_size=a.batch_size, workers=a.workers,
                            progress=False)

        ours = a.images / best_of(stage, a.repeat)
        codes = {s.key: load_npy(s.members["npy"]) for s in ShardReader(tmp / "codes")}
        ours_ids = np.stack([codes[f"i{i:06d}"] for i in range(a.images)]).astype(np.int64) + tok.vocab.image_range[0]
        theirs, their_ids = transformers_codes(tmp / "hf", images, a.batch_size, device, a.repeat)
    agree = float((ours_ids == their_ids).mean())
    result = {"machine": machine(device), "vq": vq, "images": a.images, "repeat": a.repeat, "source_px": res * 5 // 4,
              "batch_size": a.batch_size, "workers": a.workers, "mmtok_images_per_s": round(ours, 2),
              "transformers_images_per_s": round(theirs, 2), "ratio": round(ours / theirs, 2), "codes_agree": agree}
    lines = [f"Chameleon VQ tokenize-images vs transformers ({result['machine']})", "",
             "| VQ | images | mmtok images/s | transformers images/s | ratio | codes agree |", "| --- | --- | --- | --- | --- | --- |",
             f"| {res} px, {vq['base_channels']} ch, {vq['num_embeddings']} codes | {a.images} | {ours:.1f} | {theirs:.1f} "
             f"| {ours / theirs:.2f}x | {agree:.4f} |"]
    save(a.out or Path(__file__).parent / "results" / f"chameleon_tokenize-{device.type}", result, lines)


if __name__ == "__main__":
    main()
