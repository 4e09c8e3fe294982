"""Files the pipeline writes: atomic, checksummed, verified on read, and one process per workdir.

Atomic: every writer goes through `atomic_open`: write to a temporary file in the same directory,
flush and fsync, then `os.replace` onto the final name (atomic on POSIX), so a run killed mid-write
never leaves a truncated file that looks complete. A write that fails (a full disk) raises an `OSError`
naming the file and leaves the previous version, if any, in place.

Checksummed: `atomic_save_npz` stores a SHA-256 of its arrays AND of the file's own name inside the
archive (`load_npz` recomputes both, so a flipped byte or one file copied over another is caught);
`atomic_write_json(..., checksum=True)` embeds a SHA-256 of the object under `"_sha256"` (`read_json`
verifies and removes it); large raw files (memory-mapped `.npy` layers) get their `file_record` (size
and SHA-256) kept by whoever lists them (the store's manifest) and checked with `verify_file`, streamed.
Every failure to read a file (truncated, not a zip, bad JSON, wrong checksum) is a `CorruptFileError`
naming the file and saying what to delete or re-run.

One process per workdir: `workdir_lock` holds an exclusive `flock` on `<workdir>/.idjax.lock` for the
duration of a job; a second job on the same workdir exits with a `WorkdirBusyError` naming the holder
(pid, host, start time, command). The kernel releases the lock when its holder dies, so a killed run
never leaves a stale lock behind.

Where this module lives, and why: these are the pipeline's storage rules, not geometry, so they sit on
the pipeline side rather than in `idjax/` (the library of pure array functions). The model code saves
through them too (`models/checkpoints.py`, `models/palette.py`), so this module imports only the
standard library and numpy, never another `experiments` or `models` module: `models` -> `experiments.files`
is then a dependency on a leaf, and `experiments` -> `models` cannot close a cycle. `idjax.Profile.save`
and `.load` reach it like every other pipeline module, through `idjax.layer_profile.import_pipeline`
when called, so `import idjax` never imports the pipeline (tests/test_repository_layout.py checks both).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import pathlib
import socket
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np

NPZ_CHECKSUM = "__sha256__"  # the archive member holding the checksum of the other members and the name
NPZ_NAME = "__name__"  # the name the archive was written under
JSON_CHECKSUM = "_sha256"  # the key holding the checksum of the rest of a JSON object
LOCK_NAME = ".idjax.lock"
_CHUNK = 16 << 20


class CorruptFileError(RuntimeError):
    """A stored file is truncated, unreadable or fails its checksum; the message names the file and the fix."""


class WorkdirBusyError(RuntimeError):
    """Another process holds the workdir's lock; the message names it."""


def _corrupt(path: os.PathLike | str, problem: str, fix: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is damaged: {problem}. {fix}")


# ---------------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Opens a temporary binary file that replaces `path` when the block exits without an error."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(e.errno, f"{e.strerror} while writing {path} (nothing was replaced; free space and "
                                   "re-run to resume)", str(path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text.encode())


def _json_digest(name: str, obj: Any) -> str:
    return hashlib.sha256(f"{name}\0{json.dumps(obj, sort_keys=True, separators=(',', ':'))}".encode()).hexdigest()


def atomic_write_json(path: str | os.PathLike, obj: Any, *, checksum: bool = False) -> None:
    """Writes `obj` as indented JSON; with `checksum` (a dict only) a SHA-256 of it and of the file name goes
    under "_sha256"."""
    if checksum:
        if not isinstance(obj, dict):
            raise TypeError(f"a checksum can only be embedded in a JSON object, not {type(obj).__name__}")
        # Digest what a reader gets back (tuples as lists, keys as strings), not the Python object.
        rest = json.loads(json.dumps({k: v for k, v in obj.items() if k != JSON_CHECKSUM}))
        obj = {**rest, JSON_CHECKSUM: _json_digest(pathlib.Path(path).name, rest)}
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike, *, fix: str, require_checksum: bool = False) -> Any:
    """Parses a JSON file; verifies and drops an embedded "_sha256". Damage -> `CorruptFileError` with `fix`."""
    try:
        obj = json.loads(pathlib.Path(path).read_bytes())
    except FileNotFoundError as e:
        raise _corrupt(path, "it is missing", fix) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"not valid JSON ({e})", fix) from e
    if isinstance(obj, dict) and JSON_CHECKSUM in obj:
        expected = obj.pop(JSON_CHECKSUM)
        if _json_digest(pathlib.Path(path).name, obj) != expected:
            raise _corrupt(path, "its content does not match its recorded SHA-256 (or it is another file's copy)", fix)
    elif require_checksum:
        raise _corrupt(path, "it carries no checksum (written by an older version or by hand)", fix)
    return obj


# ---------------------------------------------------------------------------------------------------
# Arrays


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> dict:
    """Saves one array; returns its `file_record` for a listing (manifest) to keep."""
    with atomic_open(path) as f:
        np.save(f, array)
    return file_record(path)


def _arrays_digest(name: str, arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of the file name and of every array's key, dtype, shape and bytes."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"\0{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.data)
    return hashlib.sha256(f"{name}\0{h.hexdigest()}".encode()).hexdigest()


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Saves arrays with a SHA-256 of their contents and of the file name (read them with `load_npz`)."""
    if NPZ_CHECKSUM in arrays or NPZ_NAME in arrays:
        raise ValueError(f"{NPZ_CHECKSUM!r} and {NPZ_NAME!r} are reserved for the checksum")
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    name = pathlib.Path(path).name
    with atomic_open(path) as f:
        np.savez(f, **arrays, **{NPZ_CHECKSUM: np.array(_arrays_digest(name, arrays)), NPZ_NAME: np.array(name)})


def load_npz(path: str | os.PathLike, *, fix: str) -> dict[str, np.ndarray]:
    """Every array of an `atomic_save_npz` archive, after checking its checksum.

    Raises:
      CorruptFileError naming `path` (and saying `fix`) if the file is truncated, not an archive, has
      no checksum, or its contents or name do not match the checksum (e.g. another file copied over it).
    """
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, ValueError, EOFError, OSError, KeyError) as e:
        raise _corrupt(path, f"unreadable ({type(e).__name__}: {e})", fix) from e
    if NPZ_CHECKSUM not in arrays or NPZ_NAME not in arrays:
        raise _corrupt(path, "it carries no checksum (written by an older version or by hand)", fix)
    expected, written_as = str(arrays.pop(NPZ_CHECKSUM)), str(arrays.pop(NPZ_NAME))
    if _arrays_digest(path.name, arrays) != expected:
        if written_as != path.name and _arrays_digest(written_as, arrays) == expected:
            raise _corrupt(path, f"it is a copy of {written_as} (written under that name)", fix)
        raise _corrupt(path, "its contents do not match their recorded SHA-256", fix)
    return arrays


# ---------------------------------------------------------------------------------------------------
# Large raw files: size + SHA-256 kept in a listing, verified by streaming


def sha256_file(path: str | os.PathLike, progress: Any = None) -> str:
    """SHA-256 of a file, read in 16 MiB chunks (hashlib releases the GIL: threads hash files in parallel).

    progress: optional callable given the number of bytes read after each chunk (e.g. a tqdm `update`).
    """
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """{"bytes": size, "sha256": hex} of a file, for a listing to keep and `verify_file` to check."""
    return {"bytes": os.path.getsize(path), "sha256": sha256_file(path)}


def check_size(path: str | os.PathLike, record: dict, *, fix: str) -> None:
    """The cheap half of `verify_file`: the file exists and has the recorded size."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError as e:
        raise _corrupt(path, "it is missing", fix) from e
    if size != record["bytes"]:
        raise _corrupt(path, f"it has {size} bytes, {record['bytes']} were written (truncated or replaced)", fix)


def verify_file(path: str | os.PathLike, record: dict, *, fix: str, progress: Any = None) -> None:
    """Checks a file against its `file_record`; `CorruptFileError` naming it (and saying `fix`) if not."""
    check_size(path, record, fix=fix)
    if sha256_file(path, progress) != record["sha256"]:
        raise _corrupt(path, "its contents do not match their recorded SHA-256", fix)


def preallocate(path: str | os.PathLike, size: int) -> None:
    """Reserves `size` bytes of disk for `path` up front, so a later write through a memory map cannot
    hit a full disk (which kills the process with SIGBUS): a full disk is an `OSError` naming the file here."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}: cannot reserve {size} bytes for {path} (free space and re-run "
                               "to resume)", str(path)) from e
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Workdir lock

_held: dict[pathlib.Path, tuple[int, int]] = {}  # lock path -> (fd, depth): re-entrant within a process


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike, job: str, *, wait: bool = False, process_index: int = 0) -> Iterator[None]:
    """Holds `<workdir>/.idjax.lock` exclusively while the block runs (re-entrant within a process).

    Args:
      job: what this process does there ("extract", "profile", "train"), recorded for the message a
        second process gets.
      wait: block until the holder finishes instead of raising.
      process_index: the JAX process index of a multi-host job: each process of one job holds its own
        lock, so the job's processes share the workdir and a second job is still refused.

    Raises:
      WorkdirBusyError naming the holder (pid, host, start time, command) when another process holds it.
    """
    name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.process{process_index}"
    path = (pathlib.Path(workdir) / name).absolute()
    if path in _held:
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[path]
            _held[path] = (fd, depth - 1)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 65536, 0).decode(errors="replace").strip()
            try:
                info = json.loads(holder)
                who = (f"pid {info['pid']} on host {info['host']} ({info['job']}, started {info['started']}, "
                       f"command: {info['command']})")
            except (json.JSONDecodeError, KeyError, TypeError):
                who = "another process (no holder details recorded yet)"
            raise WorkdirBusyError(
                f"{pathlib.Path(workdir)} is in use by {who}; wait for it to finish or use another workdir "
                f"(the lock is {path}; it is released when its holder exits)") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "job": job,
                "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _held[path] = (fd, 0)
        try:
            yield
        finally:
            del _held[path]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock
