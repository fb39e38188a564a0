"""`mmtok shard`: turn raw files, manifests and tar archives into validated shards.

Enumeration (main process) turns the inputs into items in a fixed order; `ShardFn`
(worker processes) sniffs, validates and hashes one item into samples or quarantine
records. Modality is decided from the bytes, not the file name (`mmtok.sniff`); manifest
rows come from `mmtok.manifests`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Iterator

# check_manifest: imported by the CLI from here
from mmtok.manifests import (MANIFEST_EXTS, Columns, bad_item, check_manifest, csv_items,  # noqa: F401
                             img2dataset_shards, img2dataset_stats, jsonl_items, parquet_items)
from mmtok.fs import RemotePath, as_location, is_url, join_location, remote_errors
from mmtok.runner import DUPLICATES, STAGE_FILE, STATS_DIR, Item, Quarantined, Sample
from mmtok.shards import INDEX, MANIFEST, QUARANTINE, content_hash, dumps_meta, is_stage_output, pair_hashes
from mmtok.sniff import Bad, Part, sniff
from mmtok.tars import group_samples, iter_tar, printable

TAR_EXTS = (".tar", ".tar.gz", ".tgz")

# ---------------------------------------------------------------- enumeration

MAX_MEMBER_BYTES = 4 << 30  # `--max-member-bytes`' default: the largest payload held in memory
# what an mmtok output directory holds besides its shards: bookkeeping, never input
_OUTPUT_RECORDS = {MANIFEST, INDEX, QUARANTINE, DUPLICATES, STAGE_FILE, STATS_DIR}


def _is_tar(path: Path) -> bool:
    return path.name.endswith(TAR_EXTS)


def _file_kind(mode: int) -> str | None:
    """What a non-regular file is, in words; None for a regular file."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) else "not a regular file"


def _not_regular(path: Path, mode: int) -> Item:
    return bad_item(str(path), f"{_file_kind(mode)}, not a regular file: skipped, never opened")


def enumerate_inputs(inputs: list[str], max_member_bytes: int = MAX_MEMBER_BYTES,
                     columns: "Columns | None" = None) -> Iterator[Item]:
    """Yield items in a fixed order: inputs as given, directories walked sorted. An input
    may be a URL (a bucket prefix, a manifest or a tar in object storage: mmtok/fs.py)."""
    columns = columns or Columns()
    for spec in inputs:
        path = as_location(spec)
        with remote_errors(spec):  # no credentials, no bucket: one line naming the URL
            if not path.exists():
                raise FileNotFoundError(f"input {spec} does not exist")
        if printable(spec) != spec:
            yield bad_item(printable(spec), "name is not valid UTF-8: rename it to include it")
        elif isinstance(path, RemotePath) and path.is_dir():
            yield from _walk_remote(path, max_member_bytes, columns)
        elif path.is_dir():
            yield from _walk_dir(path, os.path.realpath(path), max_member_bytes, columns)
        else:
            yield from _file_items(path, max_member_bytes, columns)


def _walk_dir(d: Path, root: str, limit: int, cols: "Columns") -> Iterator[Item]:
    """Walk `d` (inside the real input directory `root`): its files first, then its folders,
    each sorted. Only regular files are read; anything else gets a record, as does a
    symlink that leads outside `root`. A symlink inside `root` to a file is read like the
    file; one to a folder is not descended (that folder is walked where it is)."""
    try:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield bad_item(printable(str(d)), f"cannot list this folder ({e.strerror})")
        return
    names = {e.name for e in entries}
    own_output = is_stage_output(names)
    files, folders, sizes = [], [], {}
    for e in entries:
        if _not_input(e.name, own_output, e.is_dir(follow_symlinks=False)):
            continue
        path = Path(e.path)
        if printable(e.path) != e.path:
            yield bad_item(printable(e.path), "name is not valid UTF-8: rename it to include it")
            continue
        if e.is_dir(follow_symlinks=False):
            folders.append(path)
            continue
        if e.is_symlink():
            target = os.path.realpath(e.path)
            if os.path.commonpath([root, target]) != root:
                yield bad_item(e.path, f"symlink to {printable(target)}, outside the input tree: not followed")
                continue
            if e.is_dir():
                continue
        try:
            if not e.is_file():  # the directory entry's type
                yield _not_regular(path, e.stat().st_mode)
                continue
            sizes[e.name] = e.stat().st_size
        except OSError as err:  # a dangling symlink
            yield bad_item(e.path, f"cannot read ({err.strerror})")
            continue
        files.append(path)
    yield from _folder_items(files, names, limit, cols, sizes)
    for folder in folders:
        yield from _walk_dir(folder, root, limit, cols)


def _walk_remote(d: RemotePath, limit: int, cols: "Columns") -> Iterator[Item]:
    """`_walk_dir` for a folder (a prefix) in object storage: the same order and the same
    grouping; an object store has no links or devices, so every object is a file."""
    try:
        d.fs.invalidate_cache(d.path)
        entries = sorted(d.fs.ls(d.path, detail=True), key=lambda e: e["name"].rstrip("/"))
    except OSError as e:
        yield bad_item(str(d), f"cannot list this folder ({e})")
        return
    sizes = {e["name"].rstrip("/").rpartition("/")[2]: e.get("size") or 0 for e in entries}
    entries = [(e["name"].rstrip("/").rpartition("/")[2], e["type"] == "directory") for e in entries]
    names = {name for name, _ in entries}
    own_output = is_stage_output(names)
    kept = [(d / name, is_dir) for name, is_dir in entries if name and not _not_input(name, own_output, is_dir)]
    yield from _folder_items([p for p, is_dir in kept if not is_dir], names, limit, cols, sizes)
    for folder, is_dir in kept:
        if is_dir:
            yield from _walk_remote(folder, limit, cols)


def _not_input(name: str, own_output: bool, is_dir: bool) -> bool:
    """Names a walk passes over: an mmtok output directory's records (re-sharding its own
    output: its shards are tars like any other, its records are not input) and hidden files."""
    return (own_output and name in _OUTPUT_RECORDS) or (name.startswith(".") and not is_dir)


def _folder_items(files: list, names: set[str], limit: int, cols: "Columns", sizes: dict[str, int]) -> Iterator[Item]:
    """The items of one folder's files (sorted, local Paths or RemotePaths, their sizes by
    name): archives and manifests one by one, then the other files grouped by stem."""
    i2d = img2dataset_shards(names)
    if i2d:  # img2dataset's output folder: its per-shard counters are not input
        files = [f for f in files if f.name not in {f"{s}_stats.json" for s in i2d}]
    plain = [f for f in files if not (_is_tar(f) or f.name.endswith(MANIFEST_EXTS))]
    for f in files:
        stem = f.name.removesuffix(".parquet")
        if stem in i2d and f"{stem}.parquet" == f.name and (f"{stem}.tar" in names or f"{stem}" in names):
            yield from img2dataset_stats(f)  # its samples are in the tar (or folder) beside it
        elif _is_tar(f) or f.name.endswith(MANIFEST_EXTS):
            yield from _file_items(f, limit, cols)
    # files sharing a stem in one folder are one sample (image + caption), as in webdataset
    by_stem: dict[str, list] = {}
    for f in plain:
        by_stem.setdefault(f.name.split(".")[0], []).append(f)
    for stem in sorted(by_stem):
        group, dropped, kept = [], [], {}
        for f in by_stem[stem]:  # sorted by name: of `x.PNG` and `x.png`, `x.PNG` comes first and is kept
            ext = f.name.partition(".")[2].lower()
            if ext in kept:
                dropped.append(bad_item(str(f), f"same stem and extension as {kept[ext].name} but for case; "
                                            f"{kept[ext].name} is kept"))
            else:
                kept[ext] = f
                group.append(f)
        first = group[0]
        name = first.with_name(stem) if isinstance(first, Path) else f"{str(first).rpartition('/')[0]}/{stem}"
        yield Item(str(name), {"kind": "files", "paths": [str(p) for p in group]}, sum(sizes[p.name] for p in group))
        yield from dropped


def _file_items(path: Path | RemotePath, limit: int, cols: "Columns") -> Iterator[Item]:
    size = 0
    if isinstance(path, Path):  # an object in a bucket is always a plain file
        try:
            st = path.stat()
        except OSError as e:
            yield bad_item(str(path), f"cannot read ({e.strerror})")
            return
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open forever; a device may never end
            yield _not_regular(path, st.st_mode)
            return
        size = st.st_size
    name = path.name.lower()
    if _is_tar(path):
        yield from _tar_items(path, limit)
    elif name.endswith(".jsonl"):
        yield from jsonl_items(path, cols)
    elif name.endswith(".csv"):
        yield from csv_items(path, limit, cols)
    elif name.endswith(".parquet"):
        yield from parquet_items(path, cols)
    else:
        yield Item(str(path), {"kind": "files", "paths": [str(path)]}, size)


def _tar_items(path: Path, limit: int) -> Iterator[Item]:
    for s in group_samples(iter_tar(path, max_member_bytes=limit, strict=False)):
        name = f"{path}:{s[0]}" if s[0] else str(path)
        if len(s) == 3:
            yield bad_item(name, s[2])
        else:
            yield Item(name, {"kind": "members", "members": s[1]}, sum(map(len, s[1].values())))


# ---------------------------------------------------------------- samples

def _read_file(path: str | Path, limit: int) -> bytes:
    """A regular file's bytes. Anything else is refused without being opened (opening a
    FIFO blocks; /dev/zero never ends), and so is a file over `limit` bytes: its size is
    checked first, and the read stops at `limit + 1` in case it grows. OSError when it
    cannot be read at all."""
    if is_url(path):
        loc = as_location(path)
        if loc.stat().st_size <= limit:
            return loc.read_bytes()
        raise Bad(f"{path}: over the --max-member-bytes limit of {limit:,} bytes: not read")
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Bad(f"{path}: {_file_kind(st.st_mode)}, not a regular file: never opened")
    if st.st_size <= limit:
        # O_NONBLOCK: a FIFO put in its place since the stat must not block the open
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise Bad(f"{path}: not a regular file: not read")
            # one buffer of the size it has (+1, to meet its end): asking for `limit + 1`
            # would map gigabytes for every file read
            data = f.read(min(st.st_size, limit) + 1)
            if st.st_size < len(data) <= limit:  # it grew since: read on, to the limit
                data += f.read(limit + 1 - len(data))
        if len(data) <= limit:
            return data
    raise Bad(f"{path}: over the --max-member-bytes limit of {limit:,} bytes: not read")


class ShardFn:
    """The `shard` stage function: one item -> samples and/or quarantine records."""

    def __init__(self, validate: bool = True, max_pixels: int = 89_478_485, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.validate, self.max_pixels, self.max_member_bytes = validate, max_pixels, max_member_bytes

    def __call__(self, payload: dict) -> list:
        index, kind = payload["index"], payload["kind"]
        try:
            if kind == "bad":
                raise Bad(payload["reason"])
            if kind == "skip":
                return [Quarantined(payload["source"], payload["reason"], counts=False)]
            if kind == "files":
                parts, extra, dropped = self._file_parts(payload["paths"])
                return self._build(index, payload["source"], parts, extra) + dropped
            if kind == "members":
                return self._members(index, payload["source"], payload["members"])
            return self._row(index, payload["source"], payload["row"], as_location(payload["base"]))
        except Bad as e:
            return [Quarantined(payload["source"], str(e))]

    def _sniff(self, data: bytes, name: str, path: str | None = None) -> Part:
        return sniff(data, name, self.validate, self.max_pixels, path)

    def _file_parts(self, paths: list[str]) -> tuple[list[Part], dict, list[Quarantined]]:
        """The payloads of files sharing a stem, the sidecar JSON's fields, and a record for
        each payload file left out as bad (`_left_out`)."""
        parts, extra, bad = [], {}, []
        for p in paths:
            try:
                data = _read_file(p, self.max_member_bytes)
            except OSError as e:
                bad.append((p, Bad(f"{p}: cannot read ({e.strerror})")))
                continue
            if p.endswith(".json"):  # the sidecar describes the whole sample: a bad one quarantines it
                extra.update(_json_extra(data, p))
                continue
            try:
                parts.append(self._sniff(data, p, _local(p)))
            except Bad as e:
                bad.append((p, e))
        return parts, extra, _left_out(parts, bad)

    def _members(self, index: int, source: str, members: dict[str, bytes]) -> list:
        extra = {}
        if "json" in members:
            extra = _json_extra(members.pop("json"), f"{source}.json")
            if extra.get("modality") == "doc" and "segments" in extra:  # re-sharding an mmtok doc
                return self._doc(index, source, extra["segments"], {}, resolve_by_hash=True)
        parts, bad, kept, twins = [], [], {}, []
        for ext, data in sorted(members.items()):
            if ext.lower() in kept:  # as in a folder: of `x.PNG` and `x.png`, `x.PNG` sorts first and is kept
                first = f"{source}.{kept[ext.lower()]}"
                twins.append(Quarantined(f"{source}.{ext}", f"same stem and extension as {first} but for case; "
                                                            f"{first} is kept"))
                continue
            kept[ext.lower()] = ext
            try:
                parts.append(self._sniff(data, f"{source}.{ext}"))
            except Bad as e:
                bad.append((f"{source}.{ext}", e))
            else:
                parts[-1].meta["member"] = ext
        dropped = _left_out(parts, bad)
        return self._build(index, source, parts, {k: v for k, v in extra.items() if k == "source_meta"}) + dropped + twins

    def _row(self, index: int, source: str, row: dict, base: Path) -> list:
        if "segments" in row:
            return self._doc(index, source, row["segments"], base)
        parts = []
        for field in ("image", "audio", "video"):
            if field in row:
                path = join_location(base, str(row[field]))
                try:
                    data = _read_file(path, self.max_member_bytes)
                except OSError:
                    raise Bad(f"row points to a missing or unreadable file: {row[field]}") from None
                part = self._sniff(data, str(path), _local(path))
                if part.kind != field:
                    raise Bad(f"{row[field]}: the row says {field} but the content is {part.kind}")
                parts.append(part)
        text = next((row[k] for k in ("text", "caption", "transcript") if k in row), None)
        if text is not None:
            if not isinstance(text, str):
                raise Bad("text field is not a string")
            parts.append(Part("text", "txt", text.encode(), {"chars": len(text)}))
        if not parts:
            raise Bad("row has none of the fields text, caption, image, audio, video, segments")
        extra = {k: v for k, v in row.items() if k not in ("image", "audio", "video", "text", "caption", "transcript")}
        return self._build(index, source, parts, {"source_meta": extra} if extra else {})

    def _doc(self, index: int, source: str, segments, base, resolve_by_hash: bool = False) -> list:
        if not isinstance(segments, list) or not segments:
            raise Bad("segments must be a non-empty list of {text} / {image} objects")
        out_segments, images = [], []
        for j, seg in enumerate(segments):
            if isinstance(seg, dict) and isinstance(seg.get("text"), str):
                out_segments.append({"text": seg["text"]})
            elif isinstance(seg, dict) and isinstance(seg.get("image"), str):
                if resolve_by_hash:  # already content-addressed: the image samples come along
                    out_segments.append({"image": seg["image"]})
                    continue
                path = join_location(base, seg["image"])
                try:
                    data = _read_file(path, self.max_member_bytes)
                except OSError:
                    raise Bad(f"segment {j} points to a missing or unreadable image: {seg['image']}") from None
                part = self._sniff(data, str(path), _local(path))
                if part.kind != "image":
                    raise Bad(f"segment {j}: {seg['image']} is {part.kind}, not an image")
                members = {part.ext: part.data}
                h = content_hash(members)
                out_segments.append({"image": h})
                images.append(Sample(
                    key=f"{index:09d}i{j}", group=f"image-{part.ext}", members=members,
                    meta={"modality": "image", "role": "doc_image", "parent": f"{index:09d}", "source": str(path),
                          "sha256": h, "bytes": len(part.data), **part.meta}, index={"image_sha256": h}))
            else:
                raise Bad(f"segment {j} is neither {{'text': str}} nor {{'image': path}}")
        meta = {"modality": "doc", "source": source, "segments": out_segments}
        meta["sha256"] = content_hash({"segments": dumps_meta(out_segments)})
        return images + [Sample(key=f"{index:09d}", group="doc", members={}, meta=meta, index={"image_sha256": None})]

    def _build(self, index: int, source: str, parts: list[Part], extra: dict) -> list:
        texts = [p for p in parts if p.kind == "text"]
        media = [p for p in parts if p.kind != "text"]
        if len(media) == 1 and len(texts) <= 1:
            return [self._sample(f"{index:09d}", source, media[0], texts[0] if texts else None, extra)]
        if not media and len(texts) == 1:
            return [self._sample(f"{index:09d}", source, texts[0], None, extra)]
        if not parts:
            raise Bad("no payload")
        # several payloads that don't form a pair: keep each as its own sample
        return [self._sample(f"{index:09d}p{j}", source, p, None, extra) for j, p in enumerate(parts)]

    def _sample(self, key: str, source: str, part: Part, caption: Part | None, extra: dict) -> Sample:
        members = {part.ext: part.data}
        modality = part.kind
        group = "text" if part.kind == "text" else f"{part.kind}-{part.ext}"
        if caption is not None:
            members["txt"] = caption.data
            modality = {"image": "pair", "audio": "audio_pair", "video": "video_pair"}[part.kind]
            group = f"{modality}-{part.ext}"
        # the image's own hash, the key its codes are joined by, so that tokenize-images and
        # tokenize read it from index.parquet instead of re-hashing every image (every row
        # has the column: index.parquet takes its columns from its first row)
        if part.kind == "image" and caption is not None:
            sha256, image = pair_hashes(members, part.ext)
        else:
            sha256 = content_hash(members)
            image = sha256 if part.kind == "image" else None
        meta = {k: v for k, v in part.meta.items() if k != "member"}
        meta.update({"modality": modality, "source": source, "sha256": sha256,
                     "bytes": sum(len(v) for v in members.values()), **extra})
        return Sample(key=key, group=group, members=members, meta=meta, index={"image_sha256": image})


def _local(path) -> str | None:
    """A path ffmpeg may open in place: local ones; a URL's bytes go through a temporary file."""
    return None if is_url(path) else str(path)


def _left_out(parts: list[Part], bad: list[tuple[str, Bad]]) -> list[Quarantined]:
    """Quarantine records for the bad members of a sample whose other members are kept.

    A bad member costs only itself while a media payload is left (a broken `x.aiff` beside
    a good `x.wav` and its caption `x.txt`: the audio-caption pair is kept); a caption whose
    image or audio is bad is no sample on its own, so then the whole sample is quarantined
    (raises the first member's Bad)."""
    if bad and not any(p.kind != "text" for p in parts):
        raise bad[0][1]
    return [Quarantined(name, str(e)) for name, e in bad]


def _json_extra(data: bytes, name: str) -> dict:
    try:
        obj = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Bad(f"{name}: sidecar JSON does not parse ({e})") from None
    if not isinstance(obj, dict):
        raise Bad(f"{name}: sidecar JSON is not an object")
    if obj.get("modality") == "doc":
        return obj
    return {"source_meta": obj}


def shard_items(inputs: list[str], max_member_bytes: int = MAX_MEMBER_BYTES,
                columns: Columns | None = None) -> Iterator[Item]:
    """Items for the runner, each payload carrying its position (the sample key) and source."""
    for i, item in enumerate(enumerate_inputs(inputs, max_member_bytes, columns)):
        item.payload["index"] = i
        item.payload["source"] = item.name
        yield item


def shard(inputs: list[str], out, *, max_count: int = 10_000, max_size: int = 1 << 30, validate: bool = True,
          dedup: bool = True, max_pixels: int = 89_478_485, max_member_bytes: int = MAX_MEMBER_BYTES,
          columns: Columns | None = None, workers: int = 1, backend: str = "local",
          max_error_rate: float = 0.05, overwrite: bool = False, progress: bool = True):
    """`mmtok shard`: raw files, manifests and tars -> WebDataset shards in `out` (a path or a
    URL, written through a staging directory: mmtok.mirror). Returns the runner's Summary,
    whose `out` names what was given."""
    from mmtok.mirror import run_stage_to

    columns = columns or Columns()
    for spec in inputs:  # a manifest given by name is checked before any work (those in folders when reached)
        with remote_errors(spec):
            check_manifest(spec, columns)
    config = {"inputs": list(inputs), "max_count": max_count, "max_size": max_size,
              "validate": validate, "dedup": dedup, "max_pixels": max_pixels}
    if max_member_bytes != MAX_MEMBER_BYTES:  # left out at its default, so earlier runs' output dirs still resume
        config["max_member_bytes"] = max_member_bytes
    named = {k: v for k, v in columns.__dict__.items() if v}
    if named:  # likewise: only when given
        config["columns"] = named
    return run_stage_to(
        out, "shard", shard_items(list(inputs), max_member_bytes, columns), ShardFn(validate, max_pixels, max_member_bytes),
        config=config, workers=workers, max_count=max_count, max_size=max_size,
        max_error_rate=max_error_rate, dedup=dedup, progress=progress, overwrite=overwrite, task_size=8,
        backend=backend, count=shard_items(list(inputs), max_member_bytes, columns),  # the bar's total, in a thread
        threads=True)  # reading, hashing and decoding release the GIL: no bytes through pipes
