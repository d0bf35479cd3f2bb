"""Checkpoint manifests: what a checkpoint is made of, checked before anyone resumes from it.

A program that writes its checkpoint to shared storage (NFS, Lustre) can be killed, or its
host can die, half way through writing it; a disk can hand back other bytes than were written.
A checkpoint that is resumed from in that state wastes the next attempt at best and corrupts a
month-long simulation at worst.  So a checkpoint report may carry a manifest: the files the
checkpoint consists of, with their sizes and SHA-256 digests, written by the program *after*
the files themselves (``@taskfarm checkpoint --manifest FILE``).

The manifest file, JSON::

    {"checkpoint": "what TASKFARM_RESUME_FROM will be (default: the manifest's folder)",
     "files": [{"path": "state.npy", "size": 1048576, "sha256": "9f86d08..."}]}

File paths are relative to the manifest's folder and stay inside it (no ``..``, not
absolute).  :func:`write_manifest` writes one for a Python program.

Who checks what, and when:

- The executor that runs the attempt verifies every manifest it is reported, streaming each
  file through SHA-256 in a worker thread, before the report goes anywhere: a checkpoint whose
  files are missing, short or different is *refused* (logged as ``checkpoint_refused``, noted
  in the attempt log) and never becomes the resume point.  The verified manifest travels with
  the report and is journaled, so what a later attempt checks is the digest the writer
  promised, not a file on the same (possibly damaged) storage.
- The job keeps the last K checkpoints of each task (``checkpoint_retention``, default 3).
  The executor that verified them deletes the ones that fall out of that window
  (:func:`retain`, the same rule the job's state applies), except the checkpoint its own
  attempt resumed from, which it deletes only once the attempt has ended: no attempt can still
  read a checkpoint when it goes.  A file that a retained manifest also lists is never deleted
  (a program that rewrites one file in place keeps it).
- Before an attempt resumes, its executor verifies the checkpoint again (it may have been
  damaged since); when that fails it falls back to the one before, and so on, and says so: in
  its log (``checkpoint_fallback``), the attempt's log, ``TASKFARM_RESUME_FALLBACK`` and the
  start report, which the job journals.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated

import msgspec

from actors._errors import CheckpointManifestError

__all__ = [
    "CheckpointManifest",
    "CheckpointRecord",
    "ManifestFile",
    "delete_checkpoint",
    "hash_file",
    "read_manifest",
    "retain",
    "verify_manifest",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
# A manifest is a list of files, not data: bounded so a runaway program cannot make the agent
# read (or the journal keep) without limit.
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_MANIFEST_FILES = 1_000
# Big enough that a read is one system call per MiB, small enough to stay in cache.
_CHUNK = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One file of a checkpoint: its path (relative to the manifest's root), size, SHA-256."""

    path: str
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: str


class CheckpointManifest(msgspec.Struct, frozen=True, kw_only=True):
    """A checkpoint's files, as the program that wrote it declared them.

    ``root`` is the absolute folder the paths are relative to and ``source`` the manifest
    file itself (deleted with the checkpoint).
    """

    root: str
    files: tuple[ManifestFile, ...]
    source: str = ""

    @property
    def size(self) -> int:
        """Return the checkpoint's total size in bytes."""
        return sum(f.size for f in self.files)

    def paths(self) -> list[str]:
        """Return the absolute path of every file (and of the manifest itself)."""
        found = [os.path.join(self.root, f.path) for f in self.files]
        if self.source:
            found.append(self.source)
        return found


class CheckpointRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A checkpoint a task keeps: what to resume from and, if it had one, its manifest
    (encoded without it when it has none: snapshots keep many of these)."""

    checkpoint: str
    manifest: CheckpointManifest | None = None


class _FileIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    path: str
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: str


class _ManifestIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    checkpoint: str | None = None
    files: Annotated[list[_FileIn], msgspec.Meta(min_length=1, max_length=MAX_MANIFEST_FILES)]


def _check_path(manifest: str, index: int, path: str) -> str:
    normal = posixpath.normpath(path)
    if (
        not path
        or "\0" in path
        or posixpath.isabs(path)
        or normal == ".."
        or normal.startswith("../")
        or normal == "."
    ):
        raise CheckpointManifestError(
            manifest, f"files[{index}].path {path!r} must be a file inside the manifest's folder"
        )
    return normal


def read_manifest(path: str, *, cwd: str | None = None) -> tuple[str, CheckpointManifest]:
    """Read a manifest file (relative to ``cwd``); return the checkpoint it names and the
    manifest with an absolute root.  Blocking: call it in a worker thread.

    Raises:
        CheckpointManifestError: the file cannot be read, is too large, or is not a valid
            manifest; the error names the field at fault.
    """
    source = os.path.abspath(os.path.join(cwd or ".", path))
    try:
        with open(source, "rb") as file:
            data = file.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        raise CheckpointManifestError(source, f"cannot read it: {error.strerror}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise CheckpointManifestError(source, f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = msgspec.json.decode(data, type=_ManifestIn)
    except msgspec.ValidationError as error:
        raise CheckpointManifestError(source, f"not a valid manifest: {error}") from None
    except msgspec.DecodeError as error:
        raise CheckpointManifestError(source, f"not JSON: {error}") from None
    root = os.path.dirname(source)
    files: list[ManifestFile] = []
    seen: set[str] = set()
    for index, entry in enumerate(raw.files):
        relative = _check_path(source, index, entry.path)
        if relative in seen:
            raise CheckpointManifestError(source, f"files[{index}].path {entry.path!r} repeats")
        seen.add(relative)
        digest = entry.sha256.lower()
        if not _SHA256.match(digest):
            raise CheckpointManifestError(
                source, f"files[{index}].sha256 is not 64 hexadecimal digits"
            )
        files.append(ManifestFile(path=relative, size=entry.size, sha256=digest))
    checkpoint = raw.checkpoint if raw.checkpoint else root
    return checkpoint, CheckpointManifest(root=root, files=tuple(files), source=source)


def hash_file(path: str, buffer: bytearray | None = None) -> tuple[int, str]:
    """Return the size and SHA-256 (hex) of a file, read in chunks (blocking).

    Raises:
        OSError: the file cannot be read.
    """
    chunk = buffer if buffer is not None else bytearray(_CHUNK)
    view = memoryview(chunk)
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as file:
        while read := file.readinto(view):
            digest.update(view[:read])
            size += read
    return size, digest.hexdigest()


def verify_manifest(manifest: CheckpointManifest) -> None:
    """Check every file of ``manifest`` against its size and SHA-256 (blocking: run it in a
    worker thread).  Sizes are compared first, so a torn checkpoint is refused without reading
    a byte.

    Raises:
        CheckpointManifestError: a file is missing, unreadable, or differs; names the file.
    """
    paths = [os.path.join(manifest.root, f.path) for f in manifest.files]
    for entry, path in zip(manifest.files, paths, strict=True):
        try:
            size = os.stat(path).st_size
        except OSError as error:
            raise CheckpointManifestError(path, f"cannot read it: {error.strerror}") from None
        if size != entry.size:
            raise CheckpointManifestError(
                path, f"{size} bytes, the manifest says {entry.size} (torn or rewritten)"
            )
    buffer = bytearray(_CHUNK)
    for entry, path in zip(manifest.files, paths, strict=True):
        try:
            size, digest = hash_file(path, buffer)
        except OSError as error:
            raise CheckpointManifestError(path, f"cannot read it: {error.strerror}") from None
        if size != entry.size:
            raise CheckpointManifestError(
                path, f"{size} bytes, the manifest says {entry.size} (changed while read)"
            )
        if digest != entry.sha256:
            raise CheckpointManifestError(path, "SHA-256 differs from the manifest (corrupted)")


def write_manifest(
    folder: str | os.PathLike[str],
    files: Iterable[str | os.PathLike[str]] | None = None,
    *,
    checkpoint: str | None = None,
    name: str = MANIFEST_NAME,
) -> Path:
    """Write a manifest of ``files`` (default: every file under ``folder`` but the manifest)
    into ``folder`` and return its path: report it with
    ``@taskfarm checkpoint --manifest <path>`` once the files are complete.  Written to a
    temporary name and renamed, so a reader never sees half a manifest.

    Raises:
        OSError: a file cannot be read, or the manifest cannot be written.
        CheckpointManifestError: a file is outside ``folder``.
    """
    root = Path(folder).absolute()
    target = root / name
    if files is None:
        chosen = sorted(
            p for p in root.rglob("*") if p.is_file() and p != target and ".tmp-" not in p.name
        )
    else:
        chosen = [root / f for f in files]
    entries = []
    buffer = bytearray(_CHUNK)
    for index, path in enumerate(chosen):
        relative = os.path.relpath(path.absolute(), root).replace(os.sep, "/")
        _check_path(str(target), index, relative)
        size, digest = hash_file(str(path), buffer)
        entries.append({"path": relative, "size": size, "sha256": digest})
    document: dict[str, object] = {"files": entries}
    if checkpoint is not None:
        document["checkpoint"] = checkpoint
    temporary = root / f"{name}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, target)
    return target


def retain(
    records: Sequence[CheckpointRecord], keep: int
) -> tuple[list[CheckpointRecord], list[CheckpointRecord]]:
    """Split a task's checkpoints (oldest first) into the last ``keep`` and the older ones.

    The one rule for the job's state and the executor that deletes: both fold the same
    checkpoints in the same order, so they agree on what is kept.
    """
    keep = max(1, keep)
    cut = max(0, len(records) - keep)
    return list(records[cut:]), list(records[:cut])


def delete_checkpoint(record: CheckpointRecord, retained: Iterable[CheckpointRecord]) -> list[str]:
    """Delete ``record``'s files (and its manifest) that no retained manifest lists, then its
    folders that became empty, up to its root; return the deleted files.  Blocking.  A record
    without a manifest is a token the engine cannot interpret: nothing is deleted.
    """
    manifest = record.manifest
    if manifest is None:
        return []
    kept: set[str] = set()
    for other in retained:
        if other.manifest is not None:
            kept.update(os.path.normpath(p) for p in other.manifest.paths())
    deleted: list[str] = []
    folders: set[str] = set()
    for path in manifest.paths():
        normal = os.path.normpath(path)
        if normal in kept:
            continue
        try:
            os.unlink(normal)
        except FileNotFoundError:
            continue
        except OSError:
            continue  # not ours to force: left for the operator
        deleted.append(normal)
        folders.add(os.path.dirname(normal))
    root = os.path.normpath(manifest.root)
    for folder in sorted(folders, key=len, reverse=True):
        while folder.startswith(root) and folder != os.path.dirname(root):
            try:
                os.rmdir(folder)
            except OSError:
                break  # not empty (or gone): what is left is someone's
            folder = os.path.dirname(folder)
    return deleted
