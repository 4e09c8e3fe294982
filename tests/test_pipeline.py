"""End to end: config -> extraction store -> profile -> selection -> results, resumable."""

import pathlib

import numpy as np
import pytest

import idjax
from configs import base
from experiments import datasets, extract, files, profile, store
from experiments.synthetic import manifold
from idjax.selection import select_layer
from tests.neighbour_checks import assert_same_neighbours


def tiny_igpt_config(n_examples: int = 240):
    config = base.analysis_config()
    config.name = "tiny-igpt"
    config.model.family = "igpt"
    config.model.source = "random"
    config.model.size = "tiny"
    config.model.overrides = {"vocab_size": 17, "n_positions": 64}
    config.data.name = "digits"
    config.data.max_examples = n_examples
    config.extract.batch_size = 64
    config.profile.k_max = 16
    config.profile.gride_range_max = 16
    config.profile.gride_rank = 16
    config.profile.label_ks = (5, 10)
    config.profile.overlap_k = 10
    config.profile.decimation_min_size = 30
    config.probe.steps = 50
    return config


def test_end_to_end_resume_after_kill(tmp_path, monkeypatch):
    config = tiny_igpt_config()
    workdir = tmp_path / "run"
    calls = []
    real_build = extract.build_encoder

    monkeypatch.setattr(extract, "build_encoder", lambda *a, **k: counting_encoder(real_build(*a, **k), calls, 3))
    with pytest.raises(KeyboardInterrupt):
        extract.run(config, workdir)
    directory = store.store_dir(workdir)
    assert store.finished_batches(directory) == {0, 1}
    assert not store.is_complete(directory)
    with pytest.raises(store.StoreError, match="did not finish"):
        store.load(directory)
    # A half-written temporary file (as a kill during a write leaves) is never taken as a batch.
    (directory / "batches" / ".00002.npz.abc.tmp").write_bytes(b"partial")
    assert store.finished_batches(directory) == {0, 1}

    calls.clear()
    monkeypatch.setattr(extract, "build_encoder", real_build)
    monkeypatch.setattr(extract, "build_encoder", lambda *a, **k: counting_encoder(real_build(*a, **k), calls))
    manifest = extract.run(config, workdir)
    # 240 examples / 64 = 4 batches: the last stored one re-embedded once as a check that the model has not
    # changed, the first two not stored again; batches 2 and 3 computed.
    assert len(calls) == 3 and calls[0] not in calls[1:]
    assert manifest["metadata"]["batches_computed_this_run"] == 2
    assert manifest["n_examples"] == 240 and manifest["n_layers"] == 3 and manifest["dim"] == 32

    results = profile.run(config, workdir)
    reps = store.load(directory)
    calls.clear()
    assert extract.run(config, workdir) == manifest and not calls  # same config, finished store: nothing redone
    other = tiny_igpt_config()
    other.model.seed = 1  # a different model must not silently reuse these representations
    with pytest.raises(store.StoreError, match="different model or dataset"):
        extract.run(other, workdir)
    assert len(reps.layers) == 3 and reps.layers[0].shape == (240, 32) and reps.labels.shape == (240,)
    npz = np.load(workdir / "profile.npz")
    assert npz["id"].shape == (3,) and npz["gride_ids"].shape == (3, 4) and npz["label_overlap"].shape == (3, 2)
    assert npz["adjacent_overlap"].shape == (2,)
    saved = files.read_json(workdir / "results.json", fix="")
    assert saved["selected_layer"] == select_layer(saved["id"], saved["id_err"]).selected == results["selected_layer"]
    assert len(saved["probes"]["linear_probe_accuracy"]) == 3
    probes = profile.run_probe_only(config, workdir)  # the "probe" experiment, on the same store
    assert files.read_json(workdir / "probes.json", fix="") == probes
    assert probes["knn_accuracy"] == saved["probes"]["knn_accuracy"]
    for figure in saved["figures"]:
        assert pathlib.Path(figure).stat().st_size > 10_000
    # Representations equal a direct, uninterrupted computation of the same model.
    from experiments.image_datasets import load_digits
    from models import igpt, palette

    images = load_digits().images
    keep = datasets.select_indices(len(images), load_digits().labels, config.data)
    colours = palette.load_palette(workdir / "palette.npy")
    tokens = igpt.add_start_token(palette.quantize(np.repeat(images[keep[:5]], 3, -1), colours), 16)
    model_cfg = igpt.get_config("tiny", vocab_size=17, n_positions=64)
    direct = igpt.pooled_hidden_states(igpt.IGPT(model_cfg), igpt.init_params(model_cfg, 0), tokens)
    np.testing.assert_allclose(np.stack([layer[:5] for layer in reps.layers]), direct, rtol=1e-5, atol=1e-6)


def counting_encoder(encoder, calls, kill_at=None):
    """`encoder` recording each batch's indices in `calls`; with `kill_at`, the kill_at-th batch raises
    KeyboardInterrupt instead (a job killed mid-extraction)."""
    def embed(indices):
        calls.append(tuple(indices))
        if len(calls) == kill_at:
            raise KeyboardInterrupt("killed mid-extraction")
        return encoder.embed(indices)

    return extract.Encoder(encoder.plan, embed, encoder.description)


def test_restart_with_a_different_plan_is_refused(tmp_path):
    directory = tmp_path / "representations"
    store.open_plan(directory, [[0, 1], [2]], {"model": "a"})
    store.open_plan(directory, [[0, 1], [2]], {"model": "a"})  # same plan: fine
    with pytest.raises(store.StoreError, match="partial extraction of something else"):
        store.open_plan(directory, [[0, 1], [2]], {"model": "b"})


def write_store(directory, layers, labels):
    store.open_plan(directory, [list(range(len(labels)))], {"synthetic": True})
    store.write_batch(directory, 0, np.stack(layers), np.arange(len(labels)))
    store.finalize(directory, len(labels), labels=labels, ids=[str(i) for i in range(len(labels))],
                   metadata={"model": "synthetic"})


def test_selected_layer_matches_a_hand_made_id_profile(tmp_path):
    # Layers whose representations lie on manifolds of known dimension: rise to 10, fall to 3, plateau at 5.
    dims = [2, 6, 10, 7, 3, 5, 5]
    n = 1000
    layers = [manifold("linear", n, d, 16, seed=i) for i, d in enumerate(dims)]
    labels = np.arange(n) % 4
    write_store(store.store_dir(tmp_path), layers, labels)
    config = base.analysis_config()
    config.profile.decimation = False
    config.probe.enabled = False
    results = profile.run(config, tmp_path)
    np.testing.assert_allclose(results["estimator_agreement"]["id"]["twonn"], dims, rtol=0.12)  # the NN scale
    assert results["peak_layer"] == 2 and results["selected_layer"] == 4


def test_sharded_and_single_device_graphs_agree_in_the_profile():
    x = manifold("sphere", 400, 3, 8)
    single = profile.knn_graph(x, 10, "never")
    ring = profile.knn_graph(x, 10, "always")  # a one-device mesh here; 8 devices in test_sharded.py
    # Two code paths: XLA may order the feature sums differently per shape, so distances agree to float32
    # rounding and neighbours may swap only where they tie within it.
    assert_same_neighbours(ring[0], ring[1], single[0], single[1], rtol=1e-6, what="ring vs single device")
    with pytest.raises(ValueError, match="auto, always or never"):
        profile.knn_graph(x, 10, "sometimes")


def test_duplicates_are_dropped_from_every_layer(tmp_path):
    x = manifold("linear", 300, 3, 8)
    layers = [x.copy(), 2 * x.copy()]
    layers[1][10] = layers[1][11]  # a duplicate in one layer only
    write_store(store.store_dir(tmp_path), layers, np.zeros(300, int))
    config = base.analysis_config()
    config.profile.decimation = False
    config.probe.enabled = False
    results = profile.run(config, tmp_path)
    assert results["n_points"] == 299 and results["duplicates_per_layer"] == [0, 1]
    config.profile.duplicates = "error"
    (tmp_path / "profile_layers").rename(tmp_path / "old")
    with pytest.raises(ValueError, match="layer 1 has 1 duplicate"):
        profile.run(config, tmp_path)


def test_nan_representations_are_refused(tmp_path):
    with pytest.raises(store.StoreError, match="NaN"):
        store.write_batch(tmp_path, 0, np.full((2, 3, 4), np.nan), np.arange(3))


def test_synthetic_store_estimates_agree_with_the_library(tmp_path):
    x = manifold("sphere", 500, 4, 10)
    write_store(store.store_dir(tmp_path), [x, x * 3], np.arange(500) % 2)
    config = base.analysis_config()
    config.profile.decimation = False
    config.probe.enabled = False
    results = profile.run(config, tmp_path)
    dist, _ = idjax.knn(x, 64)
    assert results["estimator_agreement"]["id"]["twonn"][0] == pytest.approx(float(idjax.twonn(dist)), rel=1e-6)
    gride = idjax.gride(dist, n1=32, n2=64)  # the default: the largest computed rank up to 64
    assert results["id"][0] == pytest.approx(float(gride.id), rel=1e-6)  # the default drives the selection
    assert results["adjacent_overlap"] == [pytest.approx(1.0)]


def test_protein_pipeline_on_scope(shared_data, tmp_path):
    """Tiny ESM-2 on a SCOPe subset: superfamily labels, family groups, remote-homology probes."""
    config = base.analysis_config()
    config.model.family = "esm2"
    config.model.source = "random"
    config.model.size = "tiny"
    config.data.name = "scope"
    config.data.path = str(shared_data / "protein" / "astral-scopedom-seqres-gd-sel-gs-bib-40-2.07.fa")
    config.data.min_class_size = 60
    config.data.per_class = 8
    config.extract.batch_size = 32
    config.profile.k_max = 16
    config.profile.gride_range_max = 16
    config.profile.gride_rank = 16
    config.profile.label_ks = (5, 10)
    config.profile.overlap_k = 10
    config.profile.decimation = False
    config.probe.steps = 30
    config.probe.remote_homology = True
    config.probe.knn_k = 3
    results = profile.run(config, tmp_path) if extract.run(config, tmp_path) else None
    reps = store.load(store.store_dir(tmp_path))
    n = len(reps.ids)
    assert reps.layers[0].shape == (n, 64) and len(reps.layers) == 3
    assert len(set(reps.ids)) == n and all(i.startswith("d") for i in reps.ids)  # SCOPe sids
    counts = np.bincount(reps.labels)
    assert counts.max() <= 8 and len(counts) == len(reps.manifest["metadata"]["label_names"])
    probes = results["probes"]
    assert probes["remote_homology"] and 0 < probes["remote_homology_points"] <= n
    assert len(probes["remote_homology_label_overlap"]) == 3


def test_long_sequences_as_windows_average_weighted_by_residues():
    from models import esm2, protein_tokenizer

    rng = np.random.default_rng(0)
    alphabet = np.array(list("LAGVSERTIDPKQNFYMHWC"))
    seqs = ("".join(rng.choice(alphabet, 80)), "".join(rng.choice(alphabet, 20)))
    examples = extract.Examples(seqs, ids=("long", "short"))
    cfg = base.analysis_config().model
    cfg.size, cfg.esm2.long_policy = "tiny", "windows"
    cfg.esm2.max_residues = 32
    encoder = extract.build_encoder(cfg, examples, 2, None)
    got = encoder.embed([0, 1])
    model_cfg = esm2.get_config("tiny")
    model, params = esm2.ESM2(model_cfg), esm2.init_params(model_cfg, seed=0)
    windows = protein_tokenizer.tokenize(seqs[0], long_policy="windows", max_residues=32).pieces
    assert len(windows) > 1
    pooled = [np.asarray(esm2.pooled_hidden_states(model, params, np.asarray([w], np.int32)))[:, 0] for w in windows]
    weights = np.array([len(w) - 2 for w in windows], float)
    want = sum(w * p for w, p in zip(weights, pooled, strict=True)) / weights.sum()
    np.testing.assert_allclose(got[:, 0], want, rtol=2e-5, atol=2e-6)
    short = np.asarray(esm2.pooled_hidden_states(model, params, np.asarray(
        [protein_tokenizer.tokenize(seqs[1]).pieces[0]], np.int32)))[:, 0]
    np.testing.assert_allclose(got[:, 1], short, rtol=2e-5, atol=2e-6)
