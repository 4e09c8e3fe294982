"""A workdir on an object store (gs://, served from memory by the `gs_memory` fixture) gives the local run's
results, resumes, and writes nothing to the local disk but its scratch files, which it removes.

The local-disk check: the remote runs execute in an empty current directory with `tempfile`'s directory
(where a remote store's layers are assembled) set to an empty folder, and both must be empty afterwards.
"""

from __future__ import annotations

import tempfile
import textwrap

import numpy as np
import pytest
from etils import epath

from experiments import cli, datasets, extract, files, store
from tests.test_pipeline import counting_encoder, write_store

REMOTE = "gs://bucket/run"


def tiny_proteins(cfg) -> datasets.Examples:
    """Data source: 96 random protein sequences of 20-39 residues, four classes of different composition."""
    rng = np.random.default_rng(0)
    alphabet = np.array(list("LAGVSERTIDPKQNFYMHWC"))
    weights = rng.dirichlet(np.ones(len(alphabet)), size=4)
    labels = np.arange(96) % 4
    sequences = tuple("".join(rng.choice(alphabet, int(rng.integers(20, 40)), p=weights[c])) for c in labels)
    return datasets.Examples(sequences, labels, description={"source": "random sequences, 4 compositions"})


CONFIG_FILE = textwrap.dedent('''
    from configs import base


    def get_config(arg=None):
        config = base.analysis_config()
        config.name = "tiny-esm2"
        config.model.family = "esm2"
        config.model.source = "random"
        config.model.size = "tiny"
        config.data.source = "tests.test_remote_workdir:tiny_proteins"
        config.extract.batch_size = 32
        config.profile.k_max = 16
        config.profile.gride_range_max = 16
        config.profile.gride_rank = 16
        config.profile.label_ks = (5, 10)
        config.profile.overlap_k = 10
        config.profile.decimation = False
        config.probe.steps = 20
        config.probe.knn_k = 3
        return config


    def get_sweep(arg=None):
        return [{"name": f"k{k}", "overrides": {"profile.k_max": k, "profile.gride_range_max": k,
                                                "profile.gride_rank": k}} for k in (8, 16)]
''')


@pytest.fixture
def no_local_writes(tmp_path, monkeypatch):
    """An empty current directory and an empty `tempfile` directory; asserts both are still empty after the test."""
    cwd, scratch = tmp_path / "cwd", tmp_path / "scratch"
    cwd.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    yield
    assert not list(cwd.iterdir()), f"written to the current directory: {list(cwd.iterdir())}"
    assert not list(scratch.iterdir()), f"left in the scratch directory: {list(scratch.iterdir())}"


def in_memory(gs_memory, path: str) -> bool:
    return gs_memory.exists(path)


def test_a_remote_store_equals_the_local_one_and_names_damage(gs_memory, tmp_path, no_local_writes):
    rng = np.random.default_rng(0)
    layers = [rng.normal(size=(120, 8)).astype(np.float32) for _ in range(3)]
    labels = np.arange(120) % 3
    local_dir, remote_dir = tmp_path / "local" / "representations", epath.Path(REMOTE) / "representations"
    write_store(local_dir, layers, labels)
    write_store(remote_dir, layers, labels)
    assert in_memory(gs_memory, f"{remote_dir}/layer_002.npy") and in_memory(gs_memory, f"{remote_dir}/manifest.json")
    local, remote = store.load(local_dir), store.load(remote_dir)
    assert remote.manifest == local.manifest and remote.ids == local.ids  # same bytes: same sizes and SHA-256s
    np.testing.assert_array_equal(remote.labels, local.labels)
    for mapped, read, want in zip(local.layers, remote.layers, layers, strict=True):
        assert isinstance(mapped, np.memmap) and not isinstance(read, np.memmap)  # local: mapped in place
        np.testing.assert_array_equal(read, want)
        np.testing.assert_array_equal(mapped, want)

    layer = remote_dir / "layer_001.npy"
    data = layer.read_bytes()
    layer.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(files.CorruptFileError, match=r"gs://bucket/run/representations/layer_001\.npy is damaged: its "
                                                     r"contents do not match.*delete .*manifest\.json"):
        store.load(remote_dir)
    assert store.load(remote_dir, verify=False).layers[1].shape == (120, 8)  # sizes only, by request
    layer.write_bytes(data[:-8])
    with pytest.raises(files.CorruptFileError, match=r"layer_001\.npy is damaged: it has .* bytes"):
        store.load(remote_dir, verify=False)


def _launch(*flags: str) -> None:
    """launch.py in this process (so the in-memory gs:// store is the one it writes to)."""
    with pytest.raises(SystemExit) as exit_:
        cli.launch(["launch.py", *flags])
    assert exit_.value.code in (None, 0)


def _comparable(results: dict) -> dict:
    """What a run computed: results.json without timings, locations and provenance."""
    dropped = ("wall_seconds", "profile_seconds", "provenance", "figures")
    return {key: value for key, value in results.items() if key not in dropped}


@pytest.mark.slow
def test_launch_on_a_gs_workdir_equals_a_local_run_and_resumes(gs_memory, tmp_path, monkeypatch):
    config_file = tmp_path / "remote_config.py"
    config_file.write_text(CONFIG_FILE)
    calls = []
    real_build = extract.build_encoder
    monkeypatch.setattr(extract, "build_encoder", lambda *a, **k: counting_encoder(real_build(*a, **k), calls))
    _launch(f"--config={config_file}", f"--workdir={tmp_path / 'local'}")
    local = files.read_json(tmp_path / "local" / "results.json", fix="")

    cwd, scratch = tmp_path / "cwd", tmp_path / "scratch"
    cwd.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    # Killed at the third of the three batches, then resumed: the stored two are not recomputed.
    calls.clear()
    monkeypatch.setattr(extract, "build_encoder", lambda *a, **k: counting_encoder(real_build(*a, **k), calls, 3))
    with pytest.raises(KeyboardInterrupt):
        _launch(f"--config={config_file}", f"--workdir={REMOTE}")
    assert store.finished_batches(f"{REMOTE}/representations") == {0, 1}
    calls.clear()
    monkeypatch.setattr(extract, "build_encoder", lambda *a, **k: counting_encoder(real_build(*a, **k), calls))
    _launch(f"--config={config_file}", f"--workdir={REMOTE}")
    assert len(calls) == 2  # the last stored batch once (the model check) and the missing batch
    remote = files.read_json(f"{REMOTE}/results.json", fix="")
    assert remote["id"] == local["id"] and remote["id_err"] == local["id_err"]  # the ID per layer, exactly
    assert _comparable(remote) == _comparable(local)
    assert remote["figures"] == [f"{REMOTE}/{name}" for name in ("id_profile.png", "label_overlap.png",
                                                                  "adjacent_overlap.png", "gride_scaling.png")]
    for name in ("report.md", "profile.npz", "id_profile.pdf", "profile_layers/layer_002_graph.npz",
                 "representations/layer_002.npy", "representations/manifest.json"):
        assert in_memory(gs_memory, f"{REMOTE}/{name}"), name
    assert not in_memory(gs_memory, f"{REMOTE}/{files.LOCK_NAME}")  # released

    calls.clear()
    before = {key: bytes(value.getvalue()) for key, value in gs_memory.store.items()
              if key.endswith((".npz", ".npy"))}
    _launch(f"--config={config_file}", f"--workdir={REMOTE}")
    assert not calls  # finished store: no model call
    after = {key: bytes(value.getvalue()) for key, value in gs_memory.store.items() if key in before}
    assert after == before  # the cached layers and the store were reused, not rewritten with new numbers
    assert _comparable(files.read_json(f"{REMOTE}/results.json", fix="")) == _comparable(local)
    assert not list(cwd.iterdir()) and not list(scratch.iterdir())  # nothing written to the local disk


@pytest.mark.slow
def test_a_sweep_on_a_gs_workdir_shares_one_store(gs_memory, tmp_path, monkeypatch, no_local_writes):
    config_file = tmp_path / "remote_config.py"
    config_file.write_text(CONFIG_FILE)
    calls = []
    real_build = extract.build_encoder
    monkeypatch.setattr(extract, "build_encoder", lambda *a, **k: counting_encoder(real_build(*a, **k), calls))
    sweep = "gs://bucket/sweep"
    _launch(f"--config={config_file}", f"--workdir={sweep}", "--sweep")
    assert len(calls) == 3  # 96 sequences in batches of 32, extracted once for both entries
    (home,) = epath.Path(sweep, cli.SHARED_STORES).iterdir()
    assert store.is_complete(home / "representations")
    summary = files.read_json(f"{sweep}/sweep.json", fix="")
    assert [row["name"] for row in summary["runs"]] == ["k8", "k16"] and summary["missing"] == []
    for row in summary["runs"]:
        assert row["representations"] == f"../stores/{home.name}/representations"
    k8, k16 = (files.read_json(f"{sweep}/{name}/results.json", fix="") for name in ("k8", "k16"))
    assert k8["estimator_agreement"]["id"]["twonn"] == k16["estimator_agreement"]["id"]["twonn"]
    assert k8["id"] != k16["id"]  # GRIDE at rank 8 vs 16
    for name in ("sweep.md", "sweep_id_profile.png", "sweep_id_profile.pdf"):
        assert in_memory(gs_memory, f"{sweep}/{name}"), name
