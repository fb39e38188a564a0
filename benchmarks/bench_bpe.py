"""`train-bpe` against the bare SentencePiece trainer, side by side on the same text.

The text is real prose and code: the Python standard library's sources (docstrings,
comments, code), cut to --mb megabytes and stored as text samples in a shard directory.
- ours: `mmtok.bpe.train_bpe` on the shard directory (a counting pass for the memory
  estimate, then the training lines streamed from the shards into the trainer, then
  vocab.json). Aim: at most 10% over the bare trainer.
- bare: `sentencepiece.SentencePieceTrainer.train` with the same options on a text file
  holding the same lines.
Also measures the bare trainer's peak memory (max RSS of a child process) against the
estimate train-bpe prints.

Run: .venv/bin/python benchmarks/bench_bpe.py [--mb 8 --vocab-size 32768 --repeat 3]
Writes benchmarks/results/bpe.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sysconfig
import tempfile
import time
from pathlib import Path

from benchutil import save
from mmtok.bpe import memory_estimate, sp_options, train_bpe, training_lines
from mmtok.runner import Item, Sample, run_stage
from mmtok.vocab import Vocab


def stdlib_texts(limit_bytes: int) -> list[str]:
    texts, total = [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t.encode())
        if total >= limit_bytes:
            break
    return texts


def _text_sample(entry):
    i, text = entry
    return Sample(f"t{i:07d}", "text", {"txt": text.encode()}, {"modality": "text", "source": str(i), "sha256": str(i)})


def _bare_train(corpus: str, prefix: str, opts: dict, queue) -> None:
    import sentencepiece as spm

    spm.set_random_generator_seed(0)
    t0 = time.perf_counter()
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, **opts)
    queue.put((time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def bare(corpus: Path, prefix: Path, opts: dict) -> tuple[float, int]:
    """Time and peak memory of the bare trainer, in a fresh process so its max RSS is its own."""
    q = multiprocessing.get_context("spawn").Queue()
    p = multiprocessing.get_context("spawn").Process(target=_bare_train, args=(str(corpus), str(prefix), opts, q))
    p.start()
    seconds, rss = q.get()
    p.join()
    return seconds, rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=8.0)
    ap.add_argument("--vocab-size", type=int, default=32768)
    ap.add_argument("--image-codes", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/bpe.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = stdlib_texts(int(args.mb * 1e6))
        run_stage("shard", [Item(str(i), (i, t)) for i, t in enumerate(texts)], _text_sample, tmp / "shards",
                  config={"bench": "bpe"}, progress=False)
        stats = {"texts": 0, "lines": 0, "not_utf8": 0, "not_utf8_examples": []}
        with open(tmp / "corpus.txt", "w", encoding="utf-8") as f:  # the same lines train-bpe trains on
            f.writelines(line + "\n" for line in training_lines([tmp / "shards"], stats))
        stats["bytes"] = (tmp / "corpus.txt").stat().st_size
        vocab = Vocab.layout(args.vocab_size, args.image_codes)
        opts = sp_options(vocab.n_text, 10_000_000, os.cpu_count() or 1)

        ours, theirs, rss = [], [], []
        for r in range(args.repeat):  # interleaved, so load from other processes hits both alike
            t0 = time.perf_counter()
            train_bpe([tmp / "shards"], tmp / f"tok{r}", vocab_size=args.vocab_size, image_codes=args.image_codes,
                      log=lambda m: None)
            ours.append(time.perf_counter() - t0)
            s, m = bare(tmp / "corpus.txt", tmp / f"bare{r}", opts)
            theirs.append(s)
            rss.append(m)

    result = {
        "text_mb": round(stats["bytes"] / 1e6, 2),
        "lines": stats["lines"],
        "vocab_size": args.vocab_size,
        "text_pieces": vocab.n_text,
        "threads": os.cpu_count(),
        "train_bpe_s": round(min(ours), 3),
        "bare_sentencepiece_s": round(min(theirs), 3),
        "overhead": round(min(ours) / min(theirs) - 1, 4),
        "bare_peak_rss_mb": round(max(rss) / 2**20, 1),
        "estimate_mb": round(memory_estimate(stats["lines"], stats["bytes"], 10_000_000) / 2**20, 1),
    }
    save(args.out, result)
    print(f"train-bpe {result['train_bpe_s']:.2f} s vs bare sentencepiece {result['bare_sentencepiece_s']:.2f} s: "
          f"overhead {result['overhead']:+.1%} (aim <= +10%)")


if __name__ == "__main__":
    main()
