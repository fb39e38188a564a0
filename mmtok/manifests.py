"""Manifest readers for `mmtok shard`: JSON lines, CSV and Parquet rows (img2dataset's and
LAION's layouts included) as items, each row's columns mapped to the fields `ShardFn`
reads (`Columns`). A row that cannot be a sample becomes a `bad_item`, quarantined with
its reason.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import decimal
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mmtok.fs import RemotePath, as_location, read_parquet
from mmtok.runner import Item, StageError
from mmtok.shards import dumps_meta

MANIFEST_EXTS = (".jsonl", ".csv", ".parquet")


def bad_item(name: str, reason: str) -> Item:
    return Item(name, {"kind": "bad", "reason": reason})


MEDIA_FIELDS = ("image", "audio", "video")
# the manifest columns read as each field when no --<field>-col option names one: the
# first one a row has wins (`jpg` and friends: img2dataset's Parquet output, image bytes)
DEFAULT_COLUMNS = {"image": ("image", "jpg", "png", "webp"), "audio": ("audio",), "video": ("video",),
                   "text": ("text", "caption", "transcript")}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FETCH = "URL: fetch it first (img2dataset), then shard the folder it writes"


@dataclass(frozen=True)
class Columns:
    """Which manifest column holds each field (`mmtok shard --image-col url` ...); None
    means DEFAULT_COLUMNS. `key` names a row (`source`, quarantine records) by that column's
    value instead of its row number."""

    image: str | None = None
    audio: str | None = None
    video: str | None = None
    text: str | None = None
    key: str | None = None

    def of(self, field: str) -> tuple[str, ...]:
        col = getattr(self, field)
        return (col,) if col else DEFAULT_COLUMNS[field]

    def check(self, path: Path, columns: list[str]) -> None:
        """Refuse a manifest that lacks a column an option names, or whose columns hold no
        field at all: row by row it would give nothing but quarantine records."""
        have = set(columns)
        listed = ", ".join(columns) or "none"
        for field in (*DEFAULT_COLUMNS, "key"):
            col = getattr(self, field)
            if col and col not in have:
                raise StageError(f"{path}: --{field}-col {col} is not a column of this manifest (columns: {listed})")
        if "segments" not in have and not any(c in have for f in DEFAULT_COLUMNS for c in self.of(f)):
            raise StageError(f"{path}: no column holds a field mmtok reads (columns: {listed}); name them with "
                             "--image-col, --text-col, --audio-col or --video-col (a document is a `segments` column)")


def _open(path: Path | RemotePath, text: bool = False):
    """A manifest file opened for reading, local or in object storage; `text`: as CSV reads it
    (utf-8-sig: a BOM must not rename the first column)."""
    f = path.open("rb")
    return io.TextIOWrapper(f, encoding="utf-8-sig", newline="") if text else f


def check_manifest(path: str | Path, cols: Columns) -> None:
    """`Columns.check` on a manifest file's header (the CLI's check before any work)."""
    path = as_location(path)
    name = path.name.lower()
    if not name.endswith(MANIFEST_EXTS) or not path.is_file():
        return
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            with _open(path) as f:
                columns = pq.ParquetFile(f).schema_arrow.names
        elif name.endswith(".csv"):
            with _open(path, text=True) as f:
                columns = next(csv.reader(f), [])
        else:
            with _open(path) as f:
                row = next((json.loads(line) for line in f if line.strip()), {})
            columns = list(row) if isinstance(row, dict) else []
    except Exception:  # unreadable: the reader quarantines it with the reason
        return
    cols.check(path, columns)


def _row_item(path: Path, n: int, row, cols: Columns, blobs: dict[str, bytes] | None = None) -> Item:
    """A manifest row as an item: its columns mapped to the fields `ShardFn` reads; a URL
    where a file should be, or a row img2dataset did not fetch, never becomes a sample.
    `blobs`: media held in the row itself (bytes columns), by field."""
    name = f"{path}:{n}"
    if not isinstance(row, dict):
        return bad_item(name, "manifest row is not an object")
    if cols.key and row.get(cols.key) not in (None, ""):
        name = f"{path}:{row[cols.key]}"
    if row.get("status") not in (None, "success") and "error_message" in row:  # img2dataset's failed rows
        return _not_fetched(name, row)
    row = dict(row)
    for field in (*MEDIA_FIELDS, "text"):
        col = next((c for c in cols.of(field) if c in row), None)
        if (col is None and field == "image" and cols.image is None and "url" in row and "caption" in row
                and not blobs and not any(f in row for f in MEDIA_FIELDS)):
            col = "url"  # LAION's layout: the caption describes the image at the URL, which is not here
        if col is not None and col != field:
            row[field] = row.pop(col)
    refs = [row.get(f) for f in MEDIA_FIELDS]
    if isinstance(row.get("segments"), list):
        refs += [s.get("image") for s in row["segments"] if isinstance(s, dict)]
    url = next((r for r in refs if isinstance(r, str) and _URL.match(r)), None)
    if url is not None:
        return bad_item(name, f"{_FETCH} ({url})")
    try:
        dumps_meta(row)  # the row's fields become metadata: they must be JSON and valid Unicode
    except (TypeError, ValueError, UnicodeEncodeError) as e:
        return bad_item(name, f"manifest row cannot be kept as JSON metadata ({e})")
    if blobs:  # the media are in the row: an item like a tar sample's members
        members = dict(blobs)
        text = row.pop("text", None)
        if text is not None:
            if not isinstance(text, str):
                return bad_item(name, "text field is not a string")
            members["txt"] = text.encode()
        extra = {k: v for k, v in row.items() if k not in (*MEDIA_FIELDS, "caption", "transcript")}
        if extra:
            members["json"] = dumps_meta(extra)  # kept as source_meta, as a row's other columns are
        return Item(name, {"kind": "members", "members": members}, sum(map(len, members.values())))
    return Item(name, {"kind": "row", "row": row, "base": str(path.parent)})


def jsonl_items(path: Path | RemotePath, cols: Columns) -> Iterator[Item]:
    try:
        f = _open(path)
    except OSError as e:
        yield bad_item(str(path), f"cannot read ({e.strerror})")
        return
    checked = False
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # nested past Python's stack
                yield bad_item(f"{path}:{n}", f"malformed manifest line: {e}")
                continue
            if not checked and isinstance(row, dict):  # rows may differ: the first one stands for the file
                cols.check(path, list(row))
                checked = True
            yield _row_item(path, n, row, cols)


def csv_items(path: Path | RemotePath, limit: int, cols: Columns) -> Iterator[Item]:
    # a caption may be as long as any payload (csv refuses fields over 128 KiB by default)
    csv.field_size_limit(min(limit, sys.maxsize))
    try:
        with _open(path, text=True) as f:
            reader = csv.DictReader(f)
            cols.check(path, [c for c in reader.fieldnames or [] if c])
            for n, row in enumerate(reader, 2):
                row = {k: v for k, v in row.items() if k and v not in (None, "")}
                if "segments" in row:
                    try:
                        row["segments"] = json.loads(row["segments"])
                    except (json.JSONDecodeError, RecursionError) as e:
                        yield bad_item(f"{path}:{n}", f"segments column is not JSON: {e}")
                        continue
                yield _row_item(path, n, row, cols)
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        yield bad_item(str(path), f"unreadable CSV manifest: {e}")


def _json_value(v):
    """A Parquet value as JSON: text from bytes (UnicodeDecodeError when they are not
    UTF-8), decimals as exact strings, dates and times in ISO 8601, durations in seconds."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, (datetime.date, datetime.time)):
        return v.isoformat()
    if isinstance(v, datetime.timedelta):
        return v.total_seconds()
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def _parquet_row(path: Path, n: int, row: dict, cols: Columns) -> Item:
    blobs = {}
    for field in MEDIA_FIELDS:  # a bytes column named as a media field holds the file itself
        col = next((c for c in cols.of(field) if isinstance(row.get(c), bytes)), None)
        if col is not None:
            blobs[field] = row.pop(col)
    out = {}
    for k, v in row.items():
        if v is None:
            continue
        try:
            out[k] = _json_value(v)
        except UnicodeDecodeError:
            return bad_item(f"{path}:{n}", f"column {k!r} holds binary data that is not UTF-8 text")
    return _row_item(path, n, out, cols, blobs)


def parquet_items(path: Path | RemotePath, cols: Columns) -> Iterator[Item]:
    import pyarrow.parquet as pq

    with contextlib.ExitStack() as stack:
        try:
            pf = pq.ParquetFile(stack.enter_context(_open(path)))
        except Exception as e:  # pyarrow raises several types for a corrupt file
            yield bad_item(str(path), f"unreadable Parquet manifest: {e}")
            return
        yield from _parquet_rows(path, pf, cols)


def _parquet_rows(path: Path | RemotePath, pf, cols: Columns) -> Iterator[Item]:
    cols.check(path, pf.schema_arrow.names)
    n = 0
    try:
        for batch in pf.iter_batches(batch_size=4096):
            try:
                rows = batch.to_pylist()
            except Exception:  # a value Python cannot hold (a date out of range): find its row
                rows = None
            for i in range(batch.num_rows):
                n += 1
                try:
                    row = rows[i] if rows is not None else batch.slice(i, 1).to_pylist()[0]
                except Exception as e:
                    yield bad_item(f"{path}:{n}", f"a value in this row cannot be read ({e})")
                    continue
                yield _parquet_row(path, n, row, cols)
    except Exception as e:  # a corrupt page further on: the rows before it are kept
        yield bad_item(str(path), f"unreadable Parquet manifest after row {n}: {e}")


def img2dataset_shards(names: set[str]) -> set[str]:
    """The shards of an img2dataset output folder: NNNNN_stats.json beside NNNNN.tar,
    NNNNN.parquet or a NNNNN/ folder (its webdataset, parquet and files formats)."""
    out = set()
    for name in names:
        stem = name.removesuffix("_stats.json")
        if stem != name and stem.isdigit() and {f"{stem}.tar", f"{stem}.parquet", stem} & names:
            out.add(stem)
    return out


def img2dataset_stats(path: Path | RemotePath) -> Iterator[Item]:
    """img2dataset's table of every row it tried for one shard. The rows it fetched are in
    the tar (or folder) beside it; each other one gets a record, not counted as a bad input
    (there never was a file)."""
    try:
        rows = read_parquet(path).to_pylist()
    except Exception as e:
        yield bad_item(str(path), f"unreadable img2dataset stats table: {e}")
        return
    for n, row in enumerate(rows, 1):
        if row.get("status") != "success":
            yield _not_fetched(f"{path}:{row.get('key', n)}", row)


def _not_fetched(name: str, row: dict) -> Item:
    """A row img2dataset failed to download: recorded, but no bad input (nothing to read)."""
    return Item(name, {"kind": "skip", "reason": f"img2dataset did not fetch it ({row.get('status')}: "
                                                f"{row.get('error_message')}): {row.get('url')}"})
