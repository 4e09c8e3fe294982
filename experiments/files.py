"""Files the pipeline writes: atomic, checksummed, verified on read, and one process per workdir.

Paths: every helper takes an `etils.epath.PathLike` (a str, `pathlib.Path` or `epath.Path`), so a
workdir can be local or on an object store (`gs://bucket/...`, `s3://...`, through epath's fsspec or
tf.io.gfile backends). What each backend can guarantee differs, and is stated where it does.

Atomic: every writer goes through `atomic_open`: write to a temporary file in the same directory,
then rename it onto the final name, so a run killed mid-write never leaves a truncated file that
looks complete. Locally the temporary file is flushed and fsynced and `os.replace` is atomic (POSIX).
On an object store the rename is a server-side copy then a delete: the final object still appears
only whole (objects are created at the end of their upload), and a failed write leaves the previous
version in place, but a run killed between the copy and the delete leaves a `.<name>.*.tmp` object
behind (never read; delete it at leisure). The temporary object matters there: a store may publish an
object when its handle is closed, so writing the final name directly would publish half a file when
the writer raises. A write that fails (a full disk) raises an `OSError` naming the file and leaves the
previous version, if any, in place.

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
never leaves a stale lock behind. An object store has no `flock`: there the lock is the lock object
itself (created with the holder's details, deleted on exit), which is weaker in two ways, both stated in
the message a second job gets: two jobs starting at the same moment can both miss the other's object,
and a killed run leaves its object behind (delete it once that job is surely gone).

Memory-mapped files (`preallocate`) need a local file system; a remote path is refused with that reason.
A file assembled locally reaches its place through `publish` (a rename locally, an atomic upload to a
remote path), and `read_recorded_npy` reads a remote `.npy` into memory, checked against its record.

Paths are compared and linked through `canonical_path` and `relative_path`, which treat a URI's path
textually (an object store has no symlinks and does not interpret "..").

Where this module lives, and why: these are the pipeline's storage rules, not geometry, so they sit on
the pipeline side rather than in `idjax/` (the library of pure array functions). The model code saves
through them too (`models/checkpoints.py`, `models/palette.py`), so this module imports only the
standard library, numpy and etils.epath, never another `experiments` or `models` module:
`models` -> `experiments.files` is then a dependency on a leaf, and `experiments` -> `models` cannot
close a cycle. `idjax.Profile.save` and `.load` reach it like every other pipeline module, through
`idjax.layer_profile.import_pipeline` when called, so `import idjax` never imports the pipeline
(tests/test_repository_layout.py checks both).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import io
import json
import os
import pathlib
import posixpath
import socket
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
from etils import epath

NPZ_CHECKSUM = "__sha256__"  # the archive member holding the checksum of the other members and the name
NPZ_NAME = "__name__"  # the name the archive was written under
JSON_CHECKSUM = "_sha256"  # the key holding the checksum of the rest of a JSON object
LOCK_NAME = ".idjax.lock"
_CHUNK = 16 << 20


class CorruptFileError(RuntimeError):
    """A stored file is truncated, unreadable or fails its checksum; the message names the file and the fix."""


class WorkdirBusyError(RuntimeError):
    """Another process holds the workdir's lock; the message names it."""


def _corrupt(path: epath.PathLike, problem: str, fix: str) -> CorruptFileError:
    return CorruptFileError(f"{path} is damaged: {problem}. {fix}")


def local_path(path: epath.PathLike) -> pathlib.Path | None:
    """The `pathlib.Path` of a path on the local file system; None for a URI (gs://, s3://, ...)."""
    text = os.fspath(path)
    return None if "://" in text else pathlib.Path(text)


def canonical_path(path: epath.PathLike) -> epath.Path:
    """One name per file, for comparing paths and naming locks: a local path made absolute with symlinks
    resolved; a URI with its "." and ".." segments collapsed (an object store would keep them literally)."""
    local = local_path(path)
    if local is not None:
        return epath.Path(local.resolve())
    scheme, rest = os.fspath(path).split("://", 1)
    return epath.Path(f"{scheme}://{posixpath.normpath(rest)}")


def relative_path(path: epath.PathLike, start: epath.PathLike) -> str:
    """`path` relative to the directory `start` (e.g. "stores/x/representations" from the sweep directory), on
    the local file system or within one object store (a ValueError for paths on two different file systems,
    which no relative path links)."""
    local, local_start = local_path(path), local_path(start)
    if local is not None and local_start is not None:
        return os.path.relpath(local, local_start)
    if local is None and local_start is None:
        (scheme, rest), (start_scheme, start_rest) = (os.fspath(p).split("://", 1) for p in (path, start))
        if scheme == start_scheme:
            return posixpath.relpath("/" + rest, "/" + start_rest)
    raise ValueError(f"{path} and {start} are on different file systems: no relative path links them")


def _no_space(e: OSError, path: epath.PathLike) -> OSError:
    return OSError(e.errno, f"{e.strerror} while writing {path} (nothing was replaced; free space and re-run "
                            "to resume)", str(path))


# ---------------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_open(path: epath.PathLike) -> Iterator[IO[bytes]]:
    """Opens a temporary binary file that replaces `path` when the block exits without an error.

    Local: fsynced, then `os.replace` (atomic). Remote: a temporary object renamed onto `path` (a copy
    then a delete: the final object appears only whole; see the module docstring).
    """
    local = local_path(path)
    if local is None:
        with _atomic_open_remote(epath.Path(path)) as f:
            yield f
        return
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, local)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise _no_space(e, path) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def _atomic_open_remote(path: epath.Path) -> Iterator[IO[bytes]]:
    path.parent.mkdir(parents=True, exist_ok=True)  # a no-op on stores without directories
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with tmp.open("wb") as f:
            yield f
        tmp.replace(path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise _no_space(e, path) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def publish(local_file: pathlib.Path, path: epath.PathLike) -> None:
    """Moves a finished local file onto `path`. A local `path` (on the same file system) gets an atomic
    `os.replace`; a remote one an atomic upload streamed through `atomic_open`, then the local file is removed."""
    local = local_path(path)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local_file, local)
        return
    with open(local_file, "rb") as source, atomic_open(path) as target:
        while chunk := source.read(_CHUNK):
            target.write(chunk)
    os.unlink(local_file)


def atomic_save_figure(fig: Any, path: epath.PathLike, **savefig_kwargs: Any) -> epath.Path:
    """Saves a matplotlib figure in the format its suffix names (.png, .pdf; no suffix: matplotlib's default
    format), atomically: rendered to bytes first (a rendering error leaves nothing), then written through
    `atomic_open`."""
    path = epath.Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.removeprefix(".") or None, **savefig_kwargs)
    with atomic_open(path) as f:
        f.write(buffer.getvalue())
    return path


def atomic_write_text(path: epath.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text.encode())


def _json_digest(name: str, obj: Any) -> str:
    return hashlib.sha256(f"{name}\0{json.dumps(obj, sort_keys=True, separators=(',', ':'))}".encode()).hexdigest()


def atomic_write_json(path: epath.PathLike, obj: Any, *, checksum: bool = False) -> None:
    """Writes `obj` as indented JSON; with `checksum` (a dict only) a SHA-256 of it and of the file name goes
    under "_sha256"."""
    if checksum:
        if not isinstance(obj, dict):
            raise TypeError(f"a checksum can only be embedded in a JSON object, not {type(obj).__name__}")
        # Digest what a reader gets back (tuples as lists, keys as strings), not the Python object.
        rest = json.loads(json.dumps({k: v for k, v in obj.items() if k != JSON_CHECKSUM}))
        obj = {**rest, JSON_CHECKSUM: _json_digest(epath.Path(path).name, rest)}
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: epath.PathLike, *, fix: str, require_checksum: bool = False) -> Any:
    """Parses a JSON file; verifies and drops an embedded "_sha256". Damage -> `CorruptFileError` with `fix`."""
    try:
        obj = json.loads(epath.Path(path).read_bytes())
    except FileNotFoundError as e:
        raise _corrupt(path, "it is missing", fix) from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"not valid JSON ({e})", fix) from e
    if isinstance(obj, dict) and JSON_CHECKSUM in obj:
        expected = obj.pop(JSON_CHECKSUM)
        if _json_digest(epath.Path(path).name, obj) != expected:
            raise _corrupt(path, "its content does not match its recorded SHA-256 (or it is another file's copy)", fix)
    elif require_checksum:
        raise _corrupt(path, "it carries no checksum (written by an older version or by hand)", fix)
    return obj


# ---------------------------------------------------------------------------------------------------
# Arrays


def atomic_save_npy(path: epath.PathLike, array: np.ndarray) -> dict:
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


def atomic_save_npz(path: epath.PathLike, **arrays: np.ndarray) -> None:
    """Saves arrays with a SHA-256 of their contents and of the file name (read them with `load_npz`)."""
    if NPZ_CHECKSUM in arrays or NPZ_NAME in arrays:
        raise ValueError(f"{NPZ_CHECKSUM!r} and {NPZ_NAME!r} are reserved for the checksum")
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    name = epath.Path(path).name
    with atomic_open(path) as f:
        np.savez(f, **arrays, **{NPZ_CHECKSUM: np.array(_arrays_digest(name, arrays)), NPZ_NAME: np.array(name)})


def load_npz(path: epath.PathLike, *, fix: str) -> dict[str, np.ndarray]:
    """Every array of an `atomic_save_npz` archive, after checking its checksum.

    Raises:
      CorruptFileError naming `path` (and saying `fix`) if the file is truncated, not an archive, has
      no checksum, or its contents or name do not match the checksum (e.g. another file copied over it).
    """
    path = epath.Path(path)
    try:
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as npz:
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


def _open_unbuffered(path: epath.PathLike) -> IO[bytes]:
    local = local_path(path)
    return open(local, "rb", buffering=0) if local is not None else epath.Path(path).open("rb")


def sha256_file(path: epath.PathLike, progress: Any = None) -> str:
    """SHA-256 of a file, read in 16 MiB chunks (hashlib releases the GIL: threads hash files in parallel).

    progress: optional callable given the number of bytes read after each chunk (e.g. a tqdm `update`).
    """
    h = hashlib.sha256()
    with _open_unbuffered(path) as f:
        buffer = bytearray(_CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return h.hexdigest()


def file_size(path: epath.PathLike) -> int:
    """Bytes in a file (FileNotFoundError if it is missing)."""
    local = local_path(path)
    return os.path.getsize(local) if local is not None else int(epath.Path(path).stat().length)


def file_record(path: epath.PathLike) -> dict:
    """{"bytes": size, "sha256": hex} of a file, for a listing to keep and `verify_file` to check."""
    return {"bytes": file_size(path), "sha256": sha256_file(path)}


def check_size(path: epath.PathLike, record: dict, *, fix: str) -> None:
    """The cheap half of `verify_file`: the file exists and has the recorded size."""
    try:
        size = file_size(path)
    except FileNotFoundError as e:
        raise _corrupt(path, "it is missing", fix) from e
    if size != record["bytes"]:
        raise _corrupt(path, f"it has {size} bytes, {record['bytes']} were written (truncated or replaced)", fix)


def verify_file(path: epath.PathLike, record: dict, *, fix: str, progress: Any = None) -> None:
    """Checks a file against its `file_record`; `CorruptFileError` naming it (and saying `fix`) if not."""
    check_size(path, record, fix=fix)
    if sha256_file(path, progress) != record["sha256"]:
        raise _corrupt(path, "its contents do not match their recorded SHA-256", fix)


def read_recorded_npy(path: epath.PathLike, record: dict, *, fix: str, verify: bool = True) -> np.ndarray:
    """A `.npy` file read whole into memory in one pass (no memory map: for a remote file), its size and,
    with `verify`, its SHA-256 checked against `record` on the bytes read. The array is read-only, a view of
    those bytes (no second copy). `CorruptFileError` naming the file (and saying `fix`) if it does not match."""
    check_size(path, record, fix=fix)
    data = epath.Path(path).read_bytes()
    if len(data) != record["bytes"]:
        raise _corrupt(path, f"it has {len(data)} bytes, {record['bytes']} were written (truncated or replaced)", fix)
    if verify and hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise _corrupt(path, "its contents do not match their recorded SHA-256", fix)
    header = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(header)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(header)
        if dtype.hasobject:
            raise ValueError("it holds Python objects")
        count = int(np.prod(shape))
        array = np.frombuffer(data, dtype, count=count, offset=header.tell())
    except ValueError as e:
        raise _corrupt(path, f"unreadable ({e})", fix) from e
    return array.reshape(shape, order="F" if fortran_order else "C")


def preallocate(path: epath.PathLike, size: int) -> None:
    """Reserves `size` bytes of disk for `path` up front, so a later write through a memory map cannot
    hit a full disk (which kills the process with SIGBUS): a full disk is an `OSError` naming the file here.
    A memory map needs a local file: a remote path is a ValueError."""
    if local_path(path) is None:
        raise ValueError(f"{path} is not on a local file system: memory-mapped arrays need one (write them "
                         "to a local workdir, or store the layers with the atomic writers instead)")
    fd = os.open(local_path(path), os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}: cannot reserve {size} bytes for {path} (free space and re-run "
                               "to resume)", str(path)) from e
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Workdir lock

_held: dict[str, tuple[int | None, int]] = {}  # lock path -> (fd, depth): re-entrant within a process
REMOTE_LOCK_POLL_S = 5.0  # how often a waiting job looks at a remote workdir's lock object again


def _holder_info(job: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "job": job,
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:500]}


def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return (f"pid {info['pid']} on host {info['host']} ({info['job']}, started {info['started']}, "
                f"command: {info['command']})")
    except (json.JSONDecodeError, KeyError, TypeError):
        return "another process (no holder details recorded yet)"


@contextlib.contextmanager
def workdir_lock(workdir: epath.PathLike, job: str, *, wait: bool = False, process_index: int = 0) -> Iterator[None]:
    """Holds `<workdir>/.idjax.lock` exclusively while the block runs (re-entrant within a process).

    A local workdir gets a kernel `flock` (released when the holder dies); a remote one (gs://, ...) a lock
    object, created on entry and deleted on exit (see the module docstring for what that cannot promise).

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
    local = local_path(workdir)
    path = str((local / name).absolute()) if local is not None else str(epath.Path(workdir) / name)
    if path in _held:
        fd, depth = _held[path]
        _held[path] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[path]
            _held[path] = (fd, depth - 1)
        return
    hold = _hold_local_lock if local is not None else _hold_remote_lock
    with hold(path, workdir, job, wait):
        yield


@contextlib.contextmanager
def _hold_local_lock(path: str, workdir: epath.PathLike, job: str, wait: bool) -> Iterator[None]:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            who = _describe_holder(os.pread(fd, 65536, 0).decode(errors="replace").strip())
            raise WorkdirBusyError(
                f"{workdir} is in use by {who}; wait for it to finish or use another workdir "
                f"(the lock is {path}; it is released when its holder exits)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info(job)) + "\n").encode(), 0)
        _held[path] = (fd, 0)
        try:
            yield
        finally:
            del _held[path]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the descriptor releases the flock


@contextlib.contextmanager
def _hold_remote_lock(path: str, workdir: epath.PathLike, job: str, wait: bool) -> Iterator[None]:
    lock = epath.Path(path)
    while lock.exists():
        if not wait:
            try:
                who = _describe_holder(lock.read_text())
            except FileNotFoundError:  # released while we looked: try again
                continue
            raise WorkdirBusyError(
                f"{workdir} is in use by {who}; wait for it to finish or use another workdir (the lock is the "
                f"object {path}: on an object store a killed job cannot release it, so if that job is surely "
                "gone, delete the object)")
        time.sleep(REMOTE_LOCK_POLL_S)
    atomic_write_text(lock, json.dumps(_holder_info(job)) + "\n")
    _held[path] = (None, 0)
    try:
        yield
    finally:
        del _held[path]
        lock.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# Inputs and training logs: absolute paths, appends


def absolute(path: epath.PathLike) -> epath.Path:
    """`path` as an `epath.Path`, made absolute when it is local (Orbax wants absolute directories, and a
    later change of working directory must not move it); a URI (gs://, ...) is already absolute."""
    local = local_path(path)
    return epath.Path(local.absolute()) if local is not None else epath.Path(path)


def append_bytes(path: epath.PathLike, data: bytes) -> None:
    """Appends `data` to the file at `path` (created, with its directory, if missing).

    Local: one append write, flushed; a kill mid-write can leave a partial last record, which the readers
    of append-only logs (metrics.jsonl, TensorBoard event files) tolerate. An object store has no append:
    the object is read and written again whole through `atomic_open`, so it is always the old or the new
    version, and each append costs the object's size (meant for logs of metrics, not for bulk data).
    """
    local = local_path(path)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "ab") as f:
            f.write(data)
            f.flush()
        return
    path = epath.Path(path)
    old = path.read_bytes() if path.exists() else b""
    with atomic_open(path) as f:
        f.write(old + data)
