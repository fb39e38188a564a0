"""Local paths and fsspec URLs (`s3://`, `gs://`, `hf://`, ...): the one module that knows fsspec.

Reading: `as_location(value)` gives a `Path` for a local path and a `RemotePath` for a URL.
A RemotePath has the few pathlib methods mmtok's readers call (`/`, `name`, `exists`,
`is_dir`, `iterdir`, `open`, `read_bytes`, `read_text`, `stat`), so a reader serves both
through one code path; `read_range` and `read_parquet` read a member or an index without
fetching the whole object.

Writing to a URL is mmtok/mirror.py's (`remote_output`): a local staging directory
mirrored to the URL.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
from pathlib import Path
from typing import Iterator

SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class RemoteError(ValueError):
    """A URL that cannot be reached or written; the message names it and what to do."""


def _filesystem_class(protocol: str, value: str):
    import fsspec

    try:
        return fsspec.get_filesystem_class(protocol)
    except ImportError as e:  # fsspec knows the protocol; its package is not installed
        raise RemoteError(f"{value}: {e} (s3:// comes with pip install 'mmtok[remote]')") from None
    except ValueError:
        raise RemoteError(f"{value}: unknown URL scheme {protocol!r}; use a local path or an fsspec URL "
                          "(s3://, gs://, hf://, ...)") from None


def is_url(value) -> bool:
    """True for a RemotePath or a string with a scheme other than file://."""
    if isinstance(value, RemotePath):
        return True
    m = SCHEME_RE.match(value) if isinstance(value, str) else None
    return bool(m) and m[1].lower() != "file"


def as_location(value: str | os.PathLike) -> Path | RemotePath:
    """A CLI value or a path as a location: `Path` for local paths and file:// URLs, a
    RemotePath for other URLs. CLI options that may be URLs must be typed `str` and come
    through here: typer's and pathlib's `Path("s3://b/x")` is the local path `s3:/b/x`."""
    if isinstance(value, (Path, RemotePath)):
        return value
    text = os.fspath(value)
    m = SCHEME_RE.match(text)
    if not m:
        return Path(text)
    if m[1].lower() == "file":
        return Path(text[len(m[0]):])
    _filesystem_class(m[1].lower(), text)
    return RemotePath(text)


class _Stat:
    def __init__(self, size: int):
        self.st_size = size


class RemotePath:
    """A URL with the pathlib methods mmtok's readers use. Deliberately not os.PathLike, so
    that built-in `open()` refuses it instead of opening a local file of that name."""

    def __init__(self, url: str):
        scheme = SCHEME_RE.match(url)[0]
        self.url = scheme + url[len(scheme):].strip("/")
        self._fs = None

    @property
    def fs(self):
        if self._fs is None:
            import fsspec.core

            self._fs, self._path = fsspec.core.url_to_fs(self.url)
        return self._fs

    @property
    def path(self) -> str:
        """The URL as the filesystem names it (no scheme)."""
        self.fs
        return self._path

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}")

    @property
    def parent(self) -> RemotePath:
        scheme, path = _split_url(self.url)
        return RemotePath(scheme + path.rpartition("/")[0]) if "/" in path else self

    @property
    def name(self) -> str:
        return self.url[len(SCHEME_RE.match(self.url)[0]):].rpartition("/")[2]

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def iterdir(self) -> Iterator[RemotePath]:
        self.fs.invalidate_cache(self.path)  # another process may have written since
        for entry in self.fs.ls(self.path, detail=False):
            yield self / entry.rstrip("/").rpartition("/")[2]

    def open(self, mode: str = "rb", **kwargs):
        return self.fs.open(self.path, mode, **kwargs)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return self.read_bytes().decode(encoding, errors)

    def stat(self) -> _Stat:
        return _Stat(int(self.fs.info(self.path)["size"]))


@contextlib.contextmanager
def remote_errors(url) -> Iterator[None]:
    """A store's failure (no credentials, no bucket, no network) as one line naming the URL;
    nothing for a local path."""
    if not is_url(url):
        yield
        return
    try:
        yield
    except RemoteError:
        raise
    except (OSError, ValueError) as e:
        raise RemoteError(f"{url}: {type(e).__name__}: {e}; check the URL, the credentials "
                          "(AWS_* variables, AWS_ENDPOINT_URL for MinIO/R2) and the network") from None
    except Exception as e:
        if type(e).__module__.split(".")[0] not in ("botocore", "aiobotocore", "s3fs", "gcsfs", "huggingface_hub"):
            raise
        raise RemoteError(f"{url}: {type(e).__name__}: {e}; check the URL, the credentials "
                          "(AWS_* variables, AWS_ENDPOINT_URL for MinIO/R2) and the network") from None


def absolute(loc: str | os.PathLike | RemotePath) -> str:
    """A location as a stage's config or a run's config records it: a URL as it is, a local
    path resolved."""
    loc = as_location(loc)
    return str(loc) if isinstance(loc, RemotePath) else str(loc.resolve())


def _split_url(url: str) -> tuple[str, str]:
    scheme = SCHEME_RE.match(url)[0]
    return scheme, url[len(scheme):]


def relative_location(target, start) -> str:
    """`target` as a path relative to the directory `start` (how a plan records its sources,
    so a plan and its sources move together), when both are local or both are URLs of one
    scheme; else `target` in full (`absolute`)."""
    target, start = as_location(target), as_location(start)
    if isinstance(target, Path) and isinstance(start, Path):
        return os.path.relpath(target.resolve(), start.resolve())
    if isinstance(target, RemotePath) and isinstance(start, RemotePath):
        (ts, tp), (ss, sp) = _split_url(target.url), _split_url(start.url)
        if ts == ss:
            return posixpath.relpath(f"/{tp}", f"/{sp}")
    return absolute(target)


def join_location(base, rel: str) -> Path | RemotePath:
    """The location `rel` (as `relative_location` wrote it) names from the directory `base`:
    a URL or an absolute path as it is; under a URL `..` is resolved here (object stores
    take it as a name)."""
    base = as_location(base)
    if is_url(rel) or os.path.isabs(rel):
        return as_location(rel)
    if isinstance(base, RemotePath):
        scheme, path = _split_url(base.url)
        return RemotePath(scheme + posixpath.normpath(f"/{path}/{rel}").lstrip("/"))
    return base / rel


def read_range(loc: Path | RemotePath, offset: int, size: int) -> bytes:
    """`size` bytes at `offset`: one seek locally, one range request remotely (a remote
    file object would fetch a whole read-ahead block for a small member)."""
    if isinstance(loc, RemotePath):
        return loc.fs.cat_file(loc.path, start=offset, end=offset + size)
    with open(loc, "rb") as f:
        f.seek(offset)
        return f.read(size)


def read_ranges(loc: Path | RemotePath, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes of each (start, end) span of one file: slices of a mapping locally; remotely
    one batch of concurrent range requests (fsspec's `cat_ranges`), not a request each in turn."""
    if not spans:
        return []
    if isinstance(loc, RemotePath):
        n = len(spans)
        return loc.fs.cat_ranges([loc.path] * n, [a for a, _ in spans], [b for _, b in spans])
    import mmap

    with open(loc, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return [m[a:b] for a, b in spans]


def read_parquet(loc: Path | RemotePath, columns: list[str] | None = None):
    """A parquet file as a pyarrow Table; remotely through a file object, so only the
    footer and the columns asked for are fetched. Read as one file (`ParquetFile`, not the
    dataset reader of `read_table`), which keeps pyarrow from importing pandas where it is
    installed: 0.3 s of every reading command's start-up (docs/BENCHMARKS.md "Start-up")."""
    import pyarrow.parquet as pq

    if isinstance(loc, RemotePath):
        with loc.open("rb") as f:
            return pq.ParquetFile(f).read(columns=columns)
    return pq.ParquetFile(loc).read(columns=columns)
