"""experiments/files.py on every kind of path it takes: str, pathlib, epath, and gs:// through epath.

The gs:// cases run on an in-memory object store (the `gs_memory` fixture of conftest.py): epath's fsspec
backend is pointed at fsspec's `MemoryFileSystem` for gs:// paths, so every call goes through epath exactly
as it would against GCS (no rename primitive: `replace` is a copy plus a delete, no flock, no memory maps).
"""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from etils import epath

from experiments import files


@pytest.fixture(params=["str", "pathlib", "epath", "gs"])
def root(request, tmp_path):
    if request.param == "gs":
        request.getfixturevalue("gs_memory")
        return "gs://bucket/workdir"
    return {"str": str, "pathlib": pathlib.Path, "epath": epath.Path}[request.param](tmp_path / "workdir")


def join(root, name: str):
    return epath.Path(root) / name if isinstance(root, str) else root / name


def test_json_roundtrip_with_checksum_and_corruption_named(root):
    path = join(root, "results.json")
    files.atomic_write_json(path, {"a": [1, 2], "b": "x"}, checksum=True)
    assert files.read_json(path, fix="re-run") == {"a": [1, 2], "b": "x"}
    epath.Path(path).write_text(epath.Path(path).read_text().replace('"x"', '"y"'))
    with pytest.raises(files.CorruptFileError, match=r"results\.json is damaged: its content does not match"):
        files.read_json(path, fix="re-run")
    with pytest.raises(files.CorruptFileError, match=r"missing\.json is damaged: it is missing"):
        files.read_json(join(root, "missing.json"), fix="re-run")


def test_npz_roundtrip_and_copy_detected(root):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    files.atomic_save_npz(join(root, "one.npz"), a=a, b=np.array([1, 2]))
    got = files.load_npz(join(root, "one.npz"), fix="re-run")
    np.testing.assert_array_equal(got["a"], a)
    assert sorted(got) == ["a", "b"]
    epath.Path(join(root, "two.npz")).write_bytes(epath.Path(join(root, "one.npz")).read_bytes())
    with pytest.raises(files.CorruptFileError, match=r"two\.npz is damaged: it is a copy of one\.npz"):
        files.load_npz(join(root, "two.npz"), fix="re-run")
    epath.Path(join(root, "cut.npz")).write_bytes(epath.Path(join(root, "one.npz")).read_bytes()[:100])
    with pytest.raises(files.CorruptFileError, match=r"cut\.npz is damaged: unreadable"):
        files.load_npz(join(root, "cut.npz"), fix="re-run")


def test_npy_record_and_verify(root):
    path = join(root, "layer.npy")
    array = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
    record = files.atomic_save_npy(path, array)
    data = epath.Path(path).read_bytes()
    assert record["bytes"] == len(data)
    files.verify_file(path, record, fix="re-extract")
    epath.Path(path).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(files.CorruptFileError, match="do not match their recorded SHA-256"):
        files.verify_file(path, record, fix="re-extract")
    epath.Path(path).write_bytes(data[:-4])
    with pytest.raises(files.CorruptFileError, match="truncated or replaced"):
        files.check_size(path, record, fix="re-extract")


def test_failed_write_keeps_the_previous_version_and_leaves_no_temporary(root):
    path = join(root, "state.json")
    files.atomic_write_json(path, {"step": 1})
    with pytest.raises(RuntimeError, match="interrupted"), files.atomic_open(path) as f:
        f.write(b'{"step": 2')  # half a file, then the writer dies
        raise RuntimeError("interrupted")
    assert files.read_json(path, fix="") == {"step": 1}
    assert sorted(p.name for p in epath.Path(path).parent.iterdir()) == ["state.json"]


def test_workdir_lock_refuses_a_second_holder_and_releases(root):
    with files.workdir_lock(root, "extract"), files.workdir_lock(root, "extract"):  # re-entrant
        held = files._held.copy()
        files._held.clear()  # what a second process sees: the lock without this process's bookkeeping
        try:
            with pytest.raises(files.WorkdirBusyError, match=r"in use by pid \d+ on host .*\(extract, started"):
                with files.workdir_lock(root, "profile"):
                    pass
        finally:
            files._held.update(held)
    with files.workdir_lock(root, "profile"):  # released on exit
        pass


def test_remote_lock_object_is_deleted_on_exit_and_named_when_stale(gs_memory):
    root = "gs://bucket/run"
    with files.workdir_lock(root, "train"):
        assert (epath.Path(root) / files.LOCK_NAME).exists()
        assert any(key.endswith(f"bucket/run/{files.LOCK_NAME}") for key in gs_memory.store)  # really in memory
    assert not (epath.Path(root) / files.LOCK_NAME).exists()
    (epath.Path(root) / files.LOCK_NAME).write_text("{}")  # left behind by a killed job
    with pytest.raises(files.WorkdirBusyError, match="surely gone, delete the object"):
        with files.workdir_lock(root, "train"):
            pass


def test_preallocate_refuses_a_remote_path(gs_memory):
    with pytest.raises(ValueError, match="not on a local file system: memory-mapped arrays need one"):
        files.preallocate("gs://bucket/layer.npy", 1024)


def test_recorded_npy_is_read_whole_and_checked(root):
    path = join(root, "layer.npy")
    array = np.random.default_rng(1).normal(size=(40, 6)).astype(np.float32)
    record = files.atomic_save_npy(path, array)
    got = files.read_recorded_npy(path, record, fix="re-extract")
    np.testing.assert_array_equal(got, array)
    assert not isinstance(got, np.memmap) and not got.flags.writeable  # in memory, a view of the bytes read
    data = epath.Path(path).read_bytes()
    epath.Path(path).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(files.CorruptFileError, match=r"layer\.npy is damaged: its contents do not match"):
        files.read_recorded_npy(path, record, fix="re-extract")
    assert files.read_recorded_npy(path, record, fix="", verify=False).shape == (40, 6)  # unchecked by request
    epath.Path(path).write_bytes(data[:-4])
    with pytest.raises(files.CorruptFileError, match="truncated or replaced"):
        files.read_recorded_npy(path, record, fix="re-extract", verify=False)


def test_publish_moves_a_local_file_into_place_and_removes_it(root, tmp_path):
    scratch = tmp_path / "scratch" / ".layer.tmp"
    scratch.parent.mkdir()
    scratch.write_bytes(b"x" * 1000)
    files.publish(scratch, join(root, "layer.npy"))
    assert epath.Path(join(root, "layer.npy")).read_bytes() == b"x" * 1000
    assert not scratch.exists()


def test_figures_are_written_whole_in_the_format_of_their_suffix(root):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = files.atomic_save_figure(fig, join(root, "f.png"))
    pdf = files.atomic_save_figure(fig, join(root, "f.pdf"))
    plt.close(fig)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:4] == b"%PDF"
    assert sorted(p.name for p in epath.Path(png).parent.iterdir()) == ["f.pdf", "f.png"]  # no temporary left


def test_relative_and_canonical_paths_work_on_uris(root):
    home, entry = join(root, "stores/abc/representations"), join(root, "k8")
    assert files.relative_path(home, entry) == "../stores/abc/representations"
    linked = epath.Path(entry) / files.relative_path(home, entry)
    assert files.canonical_path(linked) == files.canonical_path(home)
    assert str(files.canonical_path("gs://bucket/a/./b/../c")) == "gs://bucket/a/c"
    with pytest.raises(ValueError, match="different file systems"):
        files.relative_path("gs://bucket/a", "/tmp/a")
