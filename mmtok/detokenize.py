"""`mmtok detokenize`: token shards back to documents on disk (text files and decoded
images), for looking at what the model is trained on."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path

from mmtok.locks import exclusive
from mmtok.runner import StageError, check_paths, disk_full_resumes, progress_bar
from mmtok.shards import MANIFEST, ShardReader, atomic_write, load_npy, naming, remove_temps
from mmtok.tokenizer import Tokenizer
from mmtok.vocab import VocabError


DETOKENIZE_FILE = "detokenize.json"
DETOKENIZE_LOG = "detokenize-files.jsonl"  # each document's file names, logged before they are written
_DOC_FILE = re.compile(r"^[^./][^/]*\.(json|txt|png)$")


def _written(out: Path) -> set[str]:
    """The files detokenize's log says it wrote in `out`: only these are ever replaced or
    deleted. A line cut short by a crash, or a name that is not a document file, is ignored."""
    path, names = out / DETOKENIZE_LOG, set()
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                names.update(n for n in json.loads(line)["files"] if isinstance(n, str) and _DOC_FILE.match(n))
            except (ValueError, KeyError, TypeError):
                continue
    return names


def _detokenize_job(out: Path, job: dict, overwrite: bool) -> set[str]:
    """Refuse an --out that holds a detokenize output of other tokens or another tokenizer
    (unless `overwrite`, which deletes the files that job logged, nothing else); record this
    job there. Returns the names of the files this job wrote before."""
    path, have = out / DETOKENIZE_FILE, None
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            have = {}
        differs = [k for k in ("tokens_manifest_sha256", "tokenizer") if have.get(k) != job[k]]
        if differs:
            if not overwrite:
                what = " and ".join({"tokens_manifest_sha256": f"other tokens ({have.get('tokens')})",
                                     "tokenizer": "another tokenizer"}[k] for k in differs)
                raise StageError(f"{out} holds a detokenize output made from {what}; "
                                 "use a new --out directory, or --overwrite to redo it")
            for name in _written(out):  # the other job's documents
                (out / name).unlink(missing_ok=True)
            (out / DETOKENIZE_LOG).unlink(missing_ok=True)
    written = _written(out)
    remove_temps(out, lambda n: n in written or n == DETOKENIZE_FILE)  # leftovers of a killed run
    if have != job:
        atomic_write(path, json.dumps(job, sort_keys=True, indent=1).encode())
    return written


def detokenize(token_dir: str | Path, tok: Tokenizer, out: str | Path, *, limit: int | None = None,
               overwrite: bool = False, progress: bool = True) -> dict:
    """Token shards -> per document `<key>-<n>.png` (its images, through the VQ decoder),
    `<key>.txt` (its text) and, last, `<key>.json` (segments). A document's file names are
    logged (DETOKENIZE_LOG) before its files are written, each atomically, `<key>.json`
    last: a logged `<key>.json` marks a finished document, which a rerun into the same
    `out` skips (`overwrite` redoes them). A file in the way that the log does not name is
    someone else's: the run stops rather than replace it."""
    check_paths([token_dir], out)
    reader = ShardReader(token_dir)
    have = reader.manifest.get("config", {}).get("vocab")
    if reader.manifest.get("stage") != "tokenize" or have is None:
        raise ValueError(f"{token_dir}: not a `mmtok tokenize` output")
    if have != tok.vocab.to_dict():
        raise VocabError(f"{token_dir} was tokenized with a different vocabulary than {tok.source}")
    out = Path(out)
    job = {"format": "mmtok-detokenize/1", "tokens": str(Path(token_dir).resolve()),
           "tokens_manifest_sha256": hashlib.sha256((Path(token_dir) / MANIFEST).read_bytes()).hexdigest(),
           "tokenizer": tok.fingerprint()}
    with disk_full_resumes(out), exclusive(out):
        return _detokenize_docs(reader, tok, out, _detokenize_job(out, job, overwrite), limit, overwrite, progress)


def _detokenize_docs(reader: ShardReader, tok: Tokenizer, out: Path, written: set[str], limit: int | None,
                     overwrite: bool, progress: bool) -> dict:
    total = sum(s["samples"] for s in reader.manifest["shards"])
    total = total if limit is None else min(total, limit)
    docs = images = skipped = 0
    with progress_bar("detokenize", total, 0, progress) as bar, open(out / DETOKENIZE_LOG, "a") as log:
        for s in reader:
            if docs + skipped >= total:
                break
            if not overwrite and f"{s.key}.json" in written and (out / f"{s.key}.json").exists():
                skipped += 1
                bar.advance()
                continue
            segments, pngs = [], {}
            for part in tok.decode(load_npy(s.members["npy"])):
                if isinstance(part, str):
                    segments.append({"text": part})
                else:
                    name = f"{s.key}-{len(pngs)}.png"
                    buf = io.BytesIO()
                    part.save(buf, format="PNG")
                    pngs[name] = buf.getvalue()
                    segments.append({"image": name})
            names = [*pngs, f"{s.key}.txt", f"{s.key}.json"]
            theirs = [n for n in names if n not in written and (out / n).exists()]
            if theirs:
                raise StageError(f"{out / theirs[0]} is in the way: detokenize did not write it and will not "
                                 "replace it; move it elsewhere, or use a new --out")
            if not written.issuperset(names):
                with naming(out / DETOKENIZE_LOG):
                    log.write(json.dumps({"files": names}) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
                written.update(names)
            for name, data in pngs.items():
                atomic_write(out / name, data)
            # bytes, not text mode, so "\r\n" and other control characters come back exactly
            atomic_write(out / f"{s.key}.txt", "".join(p.get("text", "") for p in segments).encode("utf-8"))
            atomic_write(out / f"{s.key}.json",
                         json.dumps({"segments": segments}, ensure_ascii=False, indent=1).encode("utf-8"))
            docs, images = docs + 1, images + len(pngs)
            bar.advance()
    return {"out": str(out), "documents": docs, "images": images, "skipped": skipped}
