"""Damaged files and faults in the pipeline and in training: a clear error naming the file (and a fix that
works when followed literally) or a correct result, and a rerun that equals an uninterrupted run.

Damage: truncate, flip a byte, copy another file over it, for every stored artefact. Faults: SIGKILL at
each stage (extraction, finalize, profile, training, checkpoint write), a full disk (a real 1 MiB tmpfs
when the test runs as root and may mount one; a simulated ENOSPC always), two processes on one workdir.

The pipeline runs the real extraction store, finalize and profile on the real digits dataset with a
numpy "model" (`fake_build_encoder`) so each case takes a fraction of a second; training runs a tiny
iGPT on digits.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import base, train_igpt_tiny
from experiments import extract, files, profile, store, train

REPO = pathlib.Path(__file__).resolve().parents[1]
N, BATCH, DIMS, WIDTH = 90, 30, (3, 6, 4), 64  # 3 batches; 3 layers of intrinsic dimension 3, 6, 4
READ_ERRORS = (files.CorruptFileError, store.StoreError)


# ---------------------------------------------------------------------------------------------------
# A fast pipeline: real dataset, store, finalize and profile; a numpy stand-in for the model


def fake_build_encoder(model_cfg, examples, batch_size, workdir, extract_settings=None, *,
                       kill_at_batch: int | None = None):
    """Layer l of example i: a Gaussian in the first DIMS[l] of WIDTH coordinates, seeded by (l, i)."""
    calls = []

    def embed(indices):
        calls.append(1)
        if kill_at_batch is not None and len(calls) == kill_at_batch + 1:
            os.kill(os.getpid(), signal.SIGKILL)
        out = np.zeros((len(DIMS), len(indices), WIDTH), np.float32)
        for row, i in enumerate(indices):
            for layer, d in enumerate(DIMS):
                out[layer, row, :d] = np.random.default_rng([layer, int(i)]).normal(size=d)
        return out

    return extract.Encoder(extract._chunks(np.arange(len(examples)), batch_size), embed, {"family": "numpy"})


def fake_config():
    config = base.analysis_config()
    config.name = "fuzz"
    config.model.family = "numpy"
    config.data.name = "digits"
    config.data.max_examples = N
    config.extract.batch_size = BATCH
    config.profile.k_max = 16
    config.profile.gride_range_max = 16
    config.profile.gride_rank = 16
    config.profile.label_ks = (5, 10)
    config.profile.overlap_k = 10
    config.profile.decimation = False
    config.probe.enabled = False
    return config


def run_pipeline(workdir: pathlib.Path) -> dict:
    extract.run(fake_config(), workdir)
    return profile.run(fake_config(), workdir)


@pytest.fixture(autouse=True)
def _numpy_model(monkeypatch):
    monkeypatch.setattr(extract, "build_encoder", fake_build_encoder)


def _child(code: str, *, expect_kill: bool = True) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter (the fake model installed); expects it to die by SIGKILL."""
    prelude = "from experiments import extract\nfrom tests import test_fuzz_pipeline as t\n" \
              "extract.build_encoder = t.fake_build_encoder\n"
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    if expect_kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    return proc


def _comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("profile_seconds", "wall_seconds", "provenance", "figures")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (workdir, its layers, labels, ids, results)."""
    workdir = tmp_path_factory.mktemp("reference")
    patches = pytest.MonkeyPatch()
    patches.setattr(extract, "build_encoder", fake_build_encoder)
    try:
        results = run_pipeline(workdir)
    finally:
        patches.undo()
    reps = store.load(store.store_dir(workdir), mmap=False)
    return workdir, [np.array(x) for x in reps.layers], reps.labels, reps.ids, results


def assert_same_as_reference(workdir: pathlib.Path, reference) -> None:
    _, layers, labels, ids, results = reference
    reps = store.load(store.store_dir(workdir), mmap=False)
    assert len(reps.layers) == len(layers)
    for a, b in zip(reps.layers, layers, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(reps.labels, labels)
    assert reps.ids == ids
    saved = files.read_json(workdir / "results.json", fix="")
    assert _comparable(saved) == _comparable(json.loads(json.dumps(results)))
    assert not list(workdir.rglob("*.tmp")), "a temporary file was left behind"


# ---------------------------------------------------------------------------------------------------
# Damaged files


def damage(path: pathlib.Path, how: str, source: pathlib.Path | None) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        flipped = len(data) * 2 // 3
        path.write_bytes(data[:flipped] + bytes([data[flipped] ^ 0x01]) + data[flipped + 1 :])
    else:  # another stored file copied over this one
        shutil.copyfile(source, path)


def follow_the_fix(message: str, damaged: pathlib.Path) -> None:
    """Does what the error message says to delete (literally), so the test also checks the advice."""
    target = damaged if "delete it" in message else pathlib.Path(re.search(r"delete (\S+?)(?: |$)", message)[1])
    assert target.exists(), message
    shutil.rmtree(target) if target.is_dir() else target.unlink()


STORE = "representations"
# artefact -> (the file copied over it, the stage it is damaged at)
ARTEFACTS = {
    f"{STORE}/plan.json": (f"{STORE}/batches/00000.npz", "partial"),
    f"{STORE}/batches/00001.npz": (f"{STORE}/batches/00000.npz", "partial"),
    f"{STORE}/layer_001.npy": (f"{STORE}/layer_000.npy", "store"),
    f"{STORE}/labels.npy": (f"{STORE}/layer_000.npy", "store"),
    f"{STORE}/ids.json": (f"{STORE}/manifest.json", "store"),
    f"{STORE}/manifest.json": (f"{STORE}/plan.json", "store"),
    # A damaged cache entry is recomputed (with a warning naming it), never read: the "correct result" outcome.
    "profile_layers/layer_001_ids.npz": ("profile_layers/layer_000_ids.npz", "profile"),
    "profile_layers/layer_001_graph.npz": ("profile_layers/layer_000_graph.npz", "profile"),
    "results.json": (f"{STORE}/manifest.json", "output"),
    "profile.npz": ("profile_layers/layer_000_ids.npz", "output"),
}


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """A workdir whose extraction was SIGKILLed after 2 of its 3 batches."""
    workdir = tmp_path_factory.mktemp("partial")
    _child(f"""
        import functools, pathlib
        extract.build_encoder = functools.partial(t.fake_build_encoder, kill_at_batch=2)
        extract.run(t.fake_config(), pathlib.Path({str(workdir)!r}))
    """)
    assert store.finished_batches(store.store_dir(workdir)) == {0, 1}
    return workdir


@pytest.mark.parametrize("how", ["truncate", "flip", "copy"])
@pytest.mark.parametrize("artefact", list(ARTEFACTS))
def test_damaged_file_is_named_and_the_fix_restores_the_uninterrupted_result(artefact, how, reference, partial,
                                                                             tmp_path):
    source, stage = ARTEFACTS[artefact]
    workdir = tmp_path / "run"
    shutil.copytree(partial if stage == "partial" else reference[0], workdir)
    path = workdir / artefact
    damage(path, how, workdir / source)
    try:
        if stage == "output":  # read back as a consumer of the results would
            files.read_json(path, fix="delete it and re-run the profile") if path.suffix == ".json" else \
                files.load_npz(path, fix="delete it and re-run the profile")
        else:
            run_pipeline(workdir)
    except READ_ERRORS as error:
        message = str(error)
        assert str(path) in message and "delete" in message, message
        follow_the_fix(message, path)
        outcome = "error naming the file"
    else:  # only acceptable if what was read is exactly right (a byte no reader depends on was hit)
        outcome = "correct result"
    print(f"OUTCOME {artefact} {how}: {outcome}")
    run_pipeline(workdir)
    assert_same_as_reference(workdir, reference)


def test_a_store_written_before_checksums_is_refused_with_the_fix(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    manifest_path = store.store_dir(workdir) / store.MANIFEST
    manifest = files.read_json(manifest_path, fix="")
    del manifest["checksums"]
    files.atomic_write_json(manifest_path, manifest, checksum=True)
    with pytest.raises(files.CorruptFileError, match="records no checksums") as error:
        store.load(store.store_dir(workdir))
    follow_the_fix(str(error.value), manifest_path)
    run_pipeline(workdir)
    assert_same_as_reference(workdir, reference)


def test_verify_off_still_checks_sizes(reference, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(reference[0], workdir)
    layer = store.store_dir(workdir) / "layer_002.npy"
    damage(layer, "flip", None)
    store.load(store.store_dir(workdir), verify=False)  # documented: contents unchecked, sizes checked
    damage(layer, "truncate", None)
    with pytest.raises(files.CorruptFileError, match="truncated or replaced"):
        store.load(store.store_dir(workdir), verify=False)


# ---------------------------------------------------------------------------------------------------
# Kills at each stage (SIGKILL in a child process), then a rerun


@pytest.mark.parametrize("where", ["finalize_copy", "finalize_rename", "profile"])
def test_sigkill_at_each_stage_then_rerun_equals_an_uninterrupted_run(where, reference, tmp_path):
    workdir = tmp_path / "run"
    kill = "os.kill(os.getpid(), signal.SIGKILL)"
    patch = {
        # after the space is reserved and the first batches copied into the memory-mapped layers
        "finalize_copy": f"""
            real = files.load_npz
            def load_npz(path, **kw):
                if path.name == "00002.npz":
                    {kill}
                return real(path, **kw)
            files.load_npz = load_npz
        """,
        # between renaming two finished layer files into place
        "finalize_rename": f"""
            real = os.replace
            def replace(a, b):
                real(a, b)
                if str(b).endswith("layer_001.npy"):
                    {kill}
            os.replace = replace
        """,
        # after layer 0 of the profile is cached
        "profile": f"""
            real = profile.layer_metrics
            def layer_metrics(*a, **kw):
                if (pathlib.Path({str(workdir)!r}) / "profile_layers" / "layer_000_graph.npz").exists():
                    {kill}
                return real(*a, **kw)
            profile.layer_metrics = layer_metrics
        """,
    }[where]
    _child(f"import os, signal, pathlib\nfrom experiments import files, profile\n"
           f"{textwrap.dedent(patch)}\nt.run_pipeline(pathlib.Path({str(workdir)!r}))\n")
    run_pipeline(workdir)
    assert_same_as_reference(workdir, reference)


# ---------------------------------------------------------------------------------------------------
# A full disk


def test_full_disk_in_finalize_is_an_oserror_naming_the_file_and_resumes(reference, tmp_path, monkeypatch):
    workdir = tmp_path / "run"

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    with pytest.raises(OSError, match=r"layer_000\.npy.*free space and re-run") as error:
        run_pipeline(workdir)
    assert error.value.errno == errno.ENOSPC
    directory = store.store_dir(workdir)
    assert store.finished_batches(directory) == {0, 1, 2} and not store.is_complete(directory)
    assert not list(workdir.rglob("*.tmp")), "the failed finalize must give its space back"
    monkeypatch.undo()
    monkeypatch.setattr(extract, "build_encoder", fake_build_encoder)
    run_pipeline(workdir)
    assert_same_as_reference(workdir, reference)


def test_full_disk_writing_a_batch_names_it_and_keeps_the_others(reference, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    real_fsync = os.fsync
    written = []

    def fsync(fd):
        written.append(fd)
        if len(written) == 3:  # plan.json, batch 0, then the disk is full while writing batch 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=r"00001\.npz.*nothing was replaced"):
        run_pipeline(workdir)
    assert store.finished_batches(store.store_dir(workdir)) == {0}
    monkeypatch.setattr(os, "fsync", real_fsync)
    run_pipeline(workdir)
    assert_same_as_reference(workdir, reference)


def _mount_small_tmpfs(path: pathlib.Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_on_a_real_small_filesystem(reference, tmp_path):
    """On a 100 KiB tmpfs the three batches fit (23 KiB each) but the layers do not: before, the copy
    through the memory map died of SIGBUS; now finalize raises ENOSPC naming the file, and after the
    filesystem is enlarged the rerun completes and equals an uninterrupted run."""
    mount = tmp_path / "small"
    if not _mount_small_tmpfs(mount, "100k"):
        pytest.skip("mounting a small tmpfs needs root (the simulated full-disk tests above always run)")
    try:
        workdir = mount / "run"
        proc = _child(f"import pathlib\nt.run_pipeline(pathlib.Path({str(workdir)!r}))\n", expect_kill=False)
        assert proc.returncode == 1 and "No space left on device" in proc.stderr, proc.stderr[-3000:]
        assert re.search(r"OSError: .*layer_00\d\.npy", proc.stderr), proc.stderr[-3000:]
        assert store.finished_batches(store.store_dir(workdir)) == {0, 1, 2}
        subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
        run_pipeline(workdir)
        assert_same_as_reference(workdir, reference)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# ---------------------------------------------------------------------------------------------------
# Two processes on one workdir


def _hold_lock(workdir: pathlib.Path) -> subprocess.Popen:
    code = (f"import pathlib, time\nfrom experiments import files\n"
            f"with files.workdir_lock(pathlib.Path({str(workdir)!r}), 'train'):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_on_a_workdir_is_refused_naming_the_holder(reference, tmp_path):
    workdir = tmp_path / "run"
    holder = _hold_lock(workdir)
    try:
        for job in (lambda: extract.run(fake_config(), workdir), lambda: profile.run(fake_config(), workdir),
                    lambda: profile.run_probe_only(fake_config(), workdir),
                    lambda: train.train(_train_config(), workdir)):
            with pytest.raises(files.WorkdirBusyError, match=rf"pid {holder.pid} on host .*train, started 20"):
                job()
        assert not (workdir / STORE).exists()  # nothing was touched
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock, nothing stale is left
        holder.wait()
    run_pipeline(workdir)
    assert_same_as_reference(workdir, reference)


def test_the_lock_is_reentrant_within_a_process_and_released_after(tmp_path):
    with files.workdir_lock(tmp_path, "a"), files.workdir_lock(tmp_path, "b"):
        pass
    with files.workdir_lock(tmp_path, "c"), files.workdir_lock(tmp_path, "c", process_index=1):
        pass  # the processes of one multi-host job each hold their own lock


# ---------------------------------------------------------------------------------------------------
# The extraction fingerprint: content, not locations


@pytest.mark.slow
def test_a_renamed_or_relatively_named_workdir_resumes(tmp_path, monkeypatch):
    """iGPT with a palette fitted into the workdir: the plan records the palette's content, not its path, so
    a moved workdir (or a relative --workdir) resumes instead of being refused as another extraction."""
    monkeypatch.undo()  # the real model
    from tests.test_pipeline import counting_encoder, tiny_igpt_config

    config = tiny_igpt_config(n_examples=96)
    config.extract.batch_size = 32
    calls = []
    real_build = extract.build_encoder

    monkeypatch.setattr(extract, "build_encoder", lambda *a, **k: counting_encoder(real_build(*a, **k), calls, 2))
    with pytest.raises(KeyboardInterrupt):
        extract.run(config, tmp_path / "first")
    monkeypatch.setattr(extract, "build_encoder", real_build)
    (tmp_path / "first").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    manifest = extract.run(config, pathlib.Path("moved"))  # relative, and not where the plan was written
    assert manifest["metadata"]["batches_computed_this_run"] == 2  # batch 0 was reused, not re-extracted
    model = manifest["metadata"]["model"]
    identity = {key: value for key, value in model.items() if key != "locations"}
    assert model["palette"]["digest"] and "moved" not in json.dumps(identity)


# ---------------------------------------------------------------------------------------------------
# Training: records tied to checkpoints, damaged checkpoints, partial lines

STEPS, CKPT_EVERY = 12, 4


def _train_config():
    c = train_igpt_tiny.get_config()
    c.model.num_layers, c.model.embed_dim, c.model.num_heads = 1, 16, 2
    c.data.max_eval_examples, c.data.max_train_examples = 32, 256
    c.train.steps, c.train.batch_size, c.train.eval_batch_size = STEPS, 8, 32
    c.train.warmup_steps = 2
    c.train.log_interval, c.train.eval_interval = 2, CKPT_EVERY
    c.train.progress_bar = False
    c.checkpoint.interval = CKPT_EVERY
    c.checkpoint.max_to_keep = 5
    c.checkpoint.async_save = False
    return c


def _log(workdir: pathlib.Path) -> list:
    return [(r["kind"], r["step"], r["loss"], r.get("grad_norm")) for r in train.read_metrics(workdir)]


def _final_state(workdir: pathlib.Path) -> dict:
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), item_names=("state", "data")) as mngr:
        return mngr.restore(STEPS, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("train_reference")
    result = train.run(_train_config(), workdir)
    return workdir, _log(workdir), result, _final_state(workdir)


def assert_same_training(workdir: pathlib.Path, reference, result: dict) -> None:
    ref_dir, ref_log, ref_result, ref_state = reference
    assert _log(workdir) == ref_log
    assert result["eval_loss"] == ref_result["eval_loss"] and result["final_step"] == STEPS
    saved = files.read_json(workdir / "train_result.json", fix="")
    assert saved["eval_loss"] == json.loads(json.dumps(ref_result["eval_loss"]))
    for a, b in zip(jax.tree.leaves(_final_state(workdir)), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _crash_at(step: int):
    def on_step(s):
        if s == step:
            raise KeyboardInterrupt(f"crashed at step {s}")

    return on_step


def test_crash_during_the_first_checkpoint_write_leaves_no_duplicate_records(train_reference, tmp_path,
                                                                             monkeypatch):
    workdir = tmp_path / "run"
    real_save = ocp.CheckpointManager.save

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while writing the first checkpoint")

    monkeypatch.setattr(ocp.CheckpointManager, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train.train(_train_config(), workdir)
    assert [r["step"] for r in train.read_metrics(workdir)] == [0, 2, 4, 4]  # eval 0, train 2, 4, eval 4
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    result = train.run(_train_config(), workdir)
    assert result["resumed_from"] is None
    assert_same_training(workdir, train_reference, result)


def test_a_half_written_last_metrics_line_is_dropped_on_resume(train_reference, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.train(_train_config(), workdir, on_step=_crash_at(10))
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 1')
    assert max(r["step"] for r in train.read_metrics(workdir)) == 10
    result = train.run(_train_config(), workdir)
    assert result["resumed_from"] == 8
    assert_same_training(workdir, train_reference, result)


def test_a_damaged_metrics_line_in_the_middle_is_named(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"kind": "eval", "step": 0, "loss": 1}\n{"kind": "tr\n'
                                           '{"kind": "eval", "step": 4, "loss": 1}\n')
    with pytest.raises(files.CorruptFileError, match=r"metrics\.jsonl is damaged: line 2"):
        train.read_metrics(workdir)


def _damage_checkpoint(step_dir: pathlib.Path, how: str) -> None:
    if how == "data":
        (step_dir / "data" / "metadata").write_text('{"epoch": 1, "ind')
        return
    biggest = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and "ocdbt.process" in str(p)),
                  key=lambda p: p.stat().st_size)
    damage(biggest, how, None)


@pytest.mark.parametrize("how", ["truncate", "flip", "data"])
def test_a_damaged_latest_checkpoint_is_named_and_training_falls_back(how, train_reference, tmp_path, caplog):
    workdir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.train(_train_config(), workdir, on_step=_crash_at(10))
    _damage_checkpoint(workdir / "checkpoints" / "8", how)
    with caplog.at_level(logging.WARNING):
        result = train.run(_train_config(), workdir)
    assert re.search(r"checkpoint 8 \(.*\) (cannot be read|is damaged)", caplog.text), caplog.text
    assert result["resumed_from"] == 4 and (workdir / "checkpoints_damaged" / "8").is_dir()
    assert_same_training(workdir, train_reference, result)


def test_load_trained_names_a_damaged_checkpoint_and_falls_back(train_reference, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(train_reference[0], workdir)
    _damage_checkpoint(workdir / "checkpoints" / str(STEPS), "flip")
    with pytest.raises(train.CheckpointError, match=rf"checkpoint {STEPS} \("):
        train.load_trained(workdir, step=STEPS)
    with caplog.at_level(logging.WARNING):
        _, params, _ = train.load_trained(workdir)
    assert f"checkpoint {STEPS} (" in caplog.text
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), item_names=("state", "data")) as mngr:
        previous = mngr.restore(8, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]["params"]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(previous), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_checkpoint_damaged_is_an_error_naming_the_directory(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.train(_train_config(), workdir, on_step=_crash_at(5))
    _damage_checkpoint(workdir / "checkpoints" / "4", "truncate")
    with pytest.raises(train.CheckpointError, match=r"no checkpoint under .*checkpoints can be restored.*delete"):
        train.run(_train_config(), workdir)


@pytest.mark.slow
def test_two_trainers_on_one_workdir_then_sigkill_during_an_async_checkpoint(train_reference, tmp_path):
    """A second trainer exits naming the first (without the lock both would fail on Orbax's commit files). The first is
    then SIGKILLed right after handing the step-8 checkpoint to Orbax's background writer; whether or not
    that save committed, the rerun equals an uninterrupted run."""
    workdir = tmp_path / "run"
    config = _train_config()
    config.checkpoint.async_save = True
    code = textwrap.dedent(f"""
        import pathlib, time, ml_collections
        from experiments import train
        def pause(step):
            if step == 8:
                print("training", flush=True)
                time.sleep(120)
        train.train(ml_collections.ConfigDict({config.to_dict()!r}), pathlib.Path({str(workdir)!r}), on_step=pause)
    """)
    first = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert first.stdout.readline().strip() == "training"
        first.send_signal(signal.SIGSTOP)  # frozen mid-run: the checkpoint may still be in flight
        with pytest.raises(files.WorkdirBusyError, match=rf"pid {first.pid} on host .*\(train, started"):
            train.run(_train_config(), workdir)
    finally:
        first.kill()
        first.wait()
    result = train.run(_train_config(), workdir)
    assert result["resumed_from"] in (4, 8)
    assert_same_training(workdir, train_reference, result)
