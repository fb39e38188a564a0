"""Reading a run's torch.distributed.checkpoint (DCP) directories safely, and checking them.

A run may come from someone else. Stock DCP unpickles its `.metadata` file, and the bytes
of non-tensor items (`weights_only=False`), so reading a shared run could run its code.
`load` parses the metadata with an unpickler that builds only DCP's own metadata classes
(plus torch dtypes, layouts and sizes) and loads non-tensor items with
`torch.load(weights_only=True)`; DCP already reads tensors that way. The metadata may
name only data files inside the checkpoint.

Each checkpoint lists the sha256 and size of its files in `checksums.json`, written last,
so that `verify` finds a torn or flipped file before its weights are used. The checksums
guard against damage, not against a sender: whoever shares a run can rewrite them, which
is why loading is safe on its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import warnings
from pathlib import Path

import torch

from mmtok.shards import atomic_write

CHECKSUMS = "checksums.json"
_META = "torch.distributed.checkpoint.metadata"
# Every global a DCP metadata pickle holds: dataclasses of plain fields, an enum, and
# look-ups of torch's own constants. Building any of them from any arguments runs no code.
_ALLOWED = {(_META, n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                 "TensorProperties", "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath")}


class CheckpointError(ValueError):
    """A checkpoint that is damaged, or that holds something other than DCP's data."""


class UnverifiedCheckpoint(UserWarning):
    """A checkpoint without checksums.json (written before mmtok kept them): read unverified."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def write_checksums(step_dir: Path) -> None:
    """Record every file of a finished checkpoint directory (call it after the last write)."""
    files = {p.name: {"sha256": _sha256(p), "size": p.stat().st_size}
             for p in sorted(step_dir.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    atomic_write(step_dir / CHECKSUMS, json.dumps({"files": files}, indent=1, sort_keys=True).encode())


def verify(step_dir: Path) -> None:
    """Raise CheckpointError unless the files of `step_dir` are exactly those checksums.json
    lists, with their sizes and hashes; warn (UnverifiedCheckpoint) when it has no list."""
    listing = step_dir / CHECKSUMS
    if not listing.exists():
        warnings.warn(f"{step_dir} has no {CHECKSUMS} (written by an older mmtok): its files cannot be checked for "
                      "damage; it is read anyway (safely: nothing in it is run)", UnverifiedCheckpoint, stacklevel=2)
        return
    try:
        files = json.loads(listing.read_text())["files"]
        ok = isinstance(files, dict) and all(_plain_name(n) and isinstance(v, dict) for n, v in files.items())
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{listing}: unreadable; the checkpoint is damaged")
    present = {p.name for p in step_dir.iterdir() if p.is_file() and p.name != CHECKSUMS}
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointError(f"{step_dir / extra[0]}: not listed in {CHECKSUMS}; the checkpoint was changed after it was saved")
    for name, want in sorted(files.items()):
        path = step_dir / name
        if name not in present:
            raise CheckpointError(f"{path}: missing (listed in {CHECKSUMS}); the checkpoint is damaged")
        if path.stat().st_size != want.get("size") or _sha256(path) != want.get("sha256"):
            raise CheckpointError(f"{path}: its size or sha256 differs from {CHECKSUMS}; the file is damaged")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        constant = torch.__dict__.get(name) if module == "torch" else None
        if (module, name) in _ALLOWED or isinstance(constant, torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which is not part of DCP's metadata")


def read_metadata(step_dir: Path):
    """The checkpoint's DCP metadata, built from its allowed classes only."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    path = step_dir / ".metadata"
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; not a complete checkpoint") from None
    except Exception as e:  # any malformed pickle, whatever the unpickler trips on
        raise CheckpointError(f"{path}: refused, not a DCP metadata file ({e}); nothing in it was run") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{path}: refused, it holds a {type(md).__name__}, not DCP metadata")
    for info in md.storage_data.values():
        if not isinstance(info, _StorageInfo) or not _plain_name(info.relative_path) \
                or not (step_dir / info.relative_path).is_file():
            where = getattr(info, "relative_path", info)
            raise CheckpointError(f"{path}: refused, it names data file {where!r}, which is not a file of the checkpoint")
    return md


def load(state: dict, step_dir: Path, *, no_dist: bool = False) -> None:
    """`dcp.load(state, ...)` of `step_dir`, reading nothing that could run code."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint._traverse import set_element

    md = read_metadata(step_dir)

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):  # the metadata parsed above, never the stock pickle.load
            md.storage_meta = md.storage_meta if isinstance(md.storage_meta, StorageMeta) else StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:  # as DefaultLoadPlanner's, with weights_only
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{step_dir}: refused item {read_item.dest_index.fqn} (only tensors and plain "
                                      f"values are read; {type(e).__name__}: {str(e).splitlines()[0]})") from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    try:
        dcp.load(state, storage_reader=Reader(step_dir), planner=Planner(), no_dist=no_dist)
    except CheckpointException as e:  # a BaseException whose text is a traceback: give its cause in one line
        exc = next(iter(e.failures.values()))[0]
        if isinstance(exc, CheckpointError):
            raise exc from None
        raise CheckpointError(f"{step_dir}: does not load into this model ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
