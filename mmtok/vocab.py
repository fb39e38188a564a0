"""The unified vocabulary: one id space for specials, text pieces and image codes.

Layout (half-open ranges), written to `vocab.json` in a tokenizer directory:

    [0, n_specials)                       special tokens (<pad>, <eod>, <boi>, <eoi>, ...)
    [n_specials, vocab_size - image_codes) text pieces: n_specials + sentencepiece id
    [vocab_size - image_codes, vocab_size) image codes: image_range[0] + code

A token is an image token iff its id is in `image_range`; every other id counts as text.

That layout is mmtok's own (format `mmtok-vocab/1`, what `train-bpe` writes). An imported
tokenizer keeps its model's ids as they are (format `mmtok-vocab/2`, `mmtok.chameleon`):
image range at any offset, the named specials at whatever ids the model gives them, text
ids those of its own text tokenizer (a Hugging Face `tokenizers` file, `text_tokenizer`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmtok.fs import as_location

FORMAT = "mmtok-vocab/1"  # mmtok's own layout: specials, text, image codes, contiguous
FORMAT_ANY = "mmtok-vocab/2"  # any layout, e.g. an imported model's (the checks below say which)
VOCAB_FILE = "vocab.json"
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a text model's whole name (fullmatch): a file beside vocab.json
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
    sp_model: str | None = "bpe.model"
    format: str = field(default=FORMAT)
    # only in FORMAT_ANY: a Hugging Face tokenizers file whose ids are the text ids as they are,
    # and each special's own name in the imported vocabulary (e.g. "<boi>": "<racm3:break>")
    text_tokenizer: str | None = None
    names: dict[str, str] | None = None

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

    @property
    def text_model(self) -> str:
        """The text tokenizer's file name (SentencePiece model or Hugging Face tokenizers JSON)."""
        return self.text_tokenizer or self.sp_model

    def to_dict(self) -> dict:
        d = asdict(self)
        d["text_range"], d["image_range"] = list(self.text_range), list(self.image_range)
        if self.format == FORMAT:  # mmtok's own layout: the same bytes as before FORMAT_ANY existed
            del d["text_tokenizer"], d["names"]
        return d

    def check(self) -> None:
        """The layout invariants; raises VocabError naming the first one broken."""
        if self.format == FORMAT_ANY:
            return self._check_any()
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

    def _check_any(self) -> None:
        """FORMAT_ANY: ranges inside the id space and apart, specials distinct and in neither
        range (so an id's modality and role stay functions of the id alone)."""
        problems = [f"missing special {n}" for n in ("<pad>", "<eod>", "<boi>", "<eoi>") if n not in self.specials]
        ids = list(self.specials.values())
        (tlo, thi), (ilo, ihi) = self.text_range, self.image_range
        if len(set(ids)) != len(ids) or len(ids) != self.n_specials:
            problems.append("special ids must be distinct and n_specials their number")
        if not (0 <= tlo < thi <= self.vocab_size and 0 <= ilo < ihi <= self.vocab_size) or self.image_tokens_per_image <= 0:
            problems.append("text_range and image_range must be non-empty and inside [0, vocab_size)")
        if tlo < ihi and ilo < thi:
            problems.append("text_range and image_range overlap")
        inside = [i for i in ids if not 0 <= i < self.vocab_size or tlo <= i < thi or ilo <= i < ihi]
        if inside:
            problems.append(f"special ids {inside} are outside the id space or inside the text or image range")
        if bool(self.text_tokenizer) == bool(self.sp_model):
            problems.append("exactly one of sp_model and text_tokenizer names the text model")
        if problems:
            raise VocabError("; ".join(problems))

    def save(self, tokdir: str | Path) -> None:
        from mmtok.shards import atomic_write

        Path(tokdir).mkdir(parents=True, exist_ok=True)
        atomic_write(Path(tokdir) / VOCAB_FILE, json.dumps(self.to_dict(), indent=1, sort_keys=True).encode())

    @classmethod
    def from_dict(cls, d: dict, where: str = "vocab") -> "Vocab":
        if d.get("format") not in (FORMAT, FORMAT_ANY):
            raise VocabError(f"{where}: format {d.get('format')!r}, expected {FORMAT!r} or {FORMAT_ANY!r}")
        try:
            extra = {}
            if d["format"] == FORMAT_ANY:
                extra = {"format": FORMAT_ANY, "sp_model": d.get("sp_model") and str(d["sp_model"]),
                         "text_tokenizer": d.get("text_tokenizer") and str(d["text_tokenizer"]),
                         "names": {str(k): str(n) for k, n in (d.get("names") or {}).items()}}
            v = cls(vocab_size=int(d["vocab_size"]), specials={str(k): int(i) for k, i in d["specials"].items()},
                    n_specials=int(d["n_specials"]), text_range=tuple(int(i) for i in d["text_range"]),
                    image_range=tuple(int(i) for i in d["image_range"]), image_tokens_per_image=int(d["image_tokens_per_image"]),
                    **{"sp_model": str(d.get("sp_model", "bpe.model")), **extra})
            if len(v.text_range) != 2 or len(v.image_range) != 2:
                raise ValueError("text_range and image_range must each be [start, end]")
            if v.text_model is not None and not _FILE_NAME.fullmatch(v.text_model):  # read from the tokenizer dir
                raise ValueError(f"text model {v.text_model!r} is not a file name in the tokenizer directory")
        except (KeyError, TypeError, ValueError) as e:
            raise VocabError(f"{where}: malformed vocabulary ({type(e).__name__}: {e})") from None
        try:
            v.check()
        except VocabError as e:
            raise VocabError(f"{where}: {e}") from None
        return v

    @classmethod
    def load(cls, tokdir: str | Path) -> "Vocab":
        path = as_location(tokdir) / VOCAB_FILE  # a path or a URL (read in place by `mmtok inspect`)
        if not path.exists():
            raise VocabError(f"{tokdir}: no {VOCAB_FILE}; is this a tokenizer directory? Make one with `mmtok train-bpe`")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise VocabError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, str(path))
