"""Shared pytest fixtures: where $IDJAX_SHARED_DATA lives, and whether its absence is an error; gs:// paths
served from memory."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("IDJAX_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path of the shared real datasets; skips (or fails under CI's IDJAX_REQUIRE_SHARED_DATA=1)."""
    path = shared_data_dir()
    if not path.is_dir():
        if os.environ.get("IDJAX_REQUIRE_SHARED_DATA") == "1":
            pytest.fail(f"IDJAX_SHARED_DATA={path} does not exist but IDJAX_REQUIRE_SHARED_DATA=1")
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def measured_choices_stay_in_the_session(tmp_path_factory):
    """The attention auto-choice's cache (models/attention.py) goes to a temporary dir, never the user's."""
    saved = os.environ.get("IDJAX_CACHE_DIR")
    os.environ["IDJAX_CACHE_DIR"] = str(tmp_path_factory.mktemp("idjax_cache"))
    yield
    if saved is None:
        del os.environ["IDJAX_CACHE_DIR"]
    else:
        os.environ["IDJAX_CACHE_DIR"] = saved


@pytest.fixture
def gs_memory(monkeypatch):
    """gs:// paths served by an empty in-memory fsspec file system for the duration of a test: every call goes
    through etils.epath as it would against GCS (no rename primitive, no flock, no memory maps)."""
    fsspec_memory = pytest.importorskip("fsspec.implementations.memory")
    from etils.epath import backend, gpath

    class GcsInMemory(fsspec_memory.MemoryFileSystem):
        """Strips "gs://" as gcsfs does, so listings (glob) name objects as GCS's would."""

        @classmethod
        def _strip_protocol(cls, path):
            if isinstance(path, list):
                return [cls._strip_protocol(p) for p in path]
            return super()._strip_protocol(os.fspath(path).removeprefix("gs://"))

    memory = GcsInMemory()
    memory.store.clear()
    memory.pseudo_dirs.clear()
    memory.pseudo_dirs.append("")
    monkeypatch.setattr(backend.fsspec_backend, "fs", lambda path: memory)
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", backend.fsspec_backend)
    monkeypatch.setenv("EPATH_USE_TF", "0")
    return memory
