"""The unified vocabulary: one id space for specials, text pieces and image codes.

Layout (half-open ranges), written to `vocab.json` in a tokenizer directory:

    [0, n_specials)                       special tokens (<pad>, <eod>, <boi>, <eoi>, ...)
    [n_specials, vocab_size - image_codes) text pieces: n_specials + sentencepiece id
    [vocab_size - image_codes, vocab_size) image codes: image_range[0] + code

A token is an image token iff its id is in `image_range`; every other id counts as text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "mmtok-vocab/1"
VOCAB_FILE = "vocab.json"
N_SPECIALS = 16
# Named specials first; the rest of the block is reserved for later modalities, so
# adding one never moves a text or image id.
NAMED_SPECIALS = ("<pad>", "<eod>", "<boi>", "<eoi>", "<bos>", "<bos_audio>", "<eos_audio>", "<bos_video>",
                  "<eos_video>", "<sep>")


class VocabError(ValueError):
    """A vocabulary file that is missing, malformed or does not match what it is used with."""


@dataclass
class Vocab:
    vocab_size: int
    specials: dict[str, int]
    n_specials: int
    text_range: tuple[int, int]
    image_range: tuple[int, int]
    image_tokens_per_image: int
    sp_model: str = "bpe.model"
    format: str = field(default=FORMAT)

    @classmethod
    def layout(cls, vocab_size: int = 65536, image_codes: int = 8192, image_tokens_per_image: int = 1024,
               n_specials: int = N_SPECIALS) -> "Vocab":
        if n_specials < len(NAMED_SPECIALS):
            raise VocabError(f"n_specials must be at least {len(NAMED_SPECIALS)}")
        text = vocab_size - n_specials - image_codes
        if image_codes < 1 or text < 512:
            # sentencepiece with byte fallback needs 256 byte pieces plus room for merges
            raise VocabError(f"--vocab-size {vocab_size} leaves {text} text ids after {n_specials} specials and "
                             f"{image_codes} image codes; give at least 512 text ids")
        names = list(NAMED_SPECIALS) + [f"<reserved_{i}>" for i in range(len(NAMED_SPECIALS), n_specials)]
        return cls(
            vocab_size=vocab_size,
            specials={n: i for i, n in enumerate(names)},
            n_specials=n_specials,
            text_range=(n_specials, n_specials + text),
            image_range=(n_specials + text, vocab_size),
            image_tokens_per_image=image_tokens_per_image,
        )

    @property
    def n_text(self) -> int:
        return self.text_range[1] - self.text_range[0]

    @property
    def n_image_codes(self) -> int:
        return self.image_range[1] - self.image_range[0]

    def __getitem__(self, name: str) -> int:
        return self.specials[name]

    def is_image(self, ids):
        """Elementwise: works on ints and numpy/torch arrays."""
        return (ids >= self.image_range[0]) & (ids < self.image_range[1])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["text_range"], d["image_range"] = list(self.text_range), list(self.image_range)
        return d

    def check(self) -> None:
        """The layout invariants; raises VocabError naming the first one broken."""
        s = self.specials
        problems = []
        if sorted(s.values()) != list(range(self.n_specials)):
            problems.append("special ids must be exactly 0..n_specials-1, each once")
        for name in ("<pad>", "<eod>", "<boi>", "<eoi>"):
            if name not in s:
                problems.append(f"missing special {name}")
        if tuple(self.text_range) != (self.n_specials, self.image_range[0]) or self.image_range[1] != self.vocab_size:
            problems.append("ranges must be contiguous: specials, then text, then image codes up to vocab_size")
        if self.n_text <= 0 or self.n_image_codes <= 0 or self.image_tokens_per_image <= 0:
            problems.append("empty text or image range")
        if problems:
            raise VocabError("; ".join(problems))

    def save(self, tokdir: str | Path) -> None:
        from mmtok.shards import atomic_write

        Path(tokdir).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(tokdir) / VOCAB_FILE, json.dumps(self.to_dict(), indent=1, sort_keys=True).encode())

    @classmethod
    def from_dict(cls, d: dict, where: str = "vocab") -> "Vocab":
        if d.get("format") != FORMAT:
            raise VocabError(f"{where}: format {d.get('format')!r}, expected {FORMAT!r}")
        try:
            v = cls(vocab_size=int(d["vocab_size"]), specials={str(k): int(i) for k, i in d["specials"].items()},
                    n_specials=int(d["n_specials"]), text_range=tuple(d["text_range"]),
                    image_range=tuple(d["image_range"]), image_tokens_per_image=int(d["image_tokens_per_image"]),
                    sp_model=str(d.get("sp_model", "bpe.model")))
        except (KeyError, TypeError, ValueError) as e:
            raise VocabError(f"{where}: malformed vocabulary ({type(e).__name__}: {e})") from None
        try:
            v.check()
        except VocabError as e:
            raise VocabError(f"{where}: {e}") from None
        return v

    @classmethod
    def load(cls, tokdir: str | Path) -> "Vocab":
        path = Path(tokdir) / VOCAB_FILE
        if not path.exists():
            raise VocabError(f"{tokdir}: no {VOCAB_FILE}; is this a tokenizer directory? Make one with `mmtok train-bpe`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VocabError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))
