"""`idjax.profile` on your own arrays: exactly the pipeline's numbers, every accepted input form, save/load."""

import json

import numpy as np
import pytest

import idjax
from configs import base
from experiments import full

OPTIONS = {"k_max": 16, "gride_range_max": 16, "label_ks": (5, 10), "overlap_k": 10, "decimation_min_size": 10}


@pytest.fixture(scope="module")
def arrays():
    """Four layers of a 6-D latent embedded differently, with a 3-class structure in the latent."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 240)
    latent = rng.normal(size=(240, 6)) + 2.0 * np.eye(6)[labels]
    layers = [np.tanh(latent @ rng.normal(size=(6, 24)) * s).astype(np.float32) for s in (0.3, 0.6, 1.0, 1.5)]
    return layers, labels


@pytest.fixture(scope="module")
def reference(arrays):
    layers, labels = arrays
    return idjax.profile(layers, labels, **OPTIONS)


def test_equals_the_pipeline_on_the_same_arrays(arrays, reference, tmp_path):
    layers, labels = arrays
    data = tmp_path / "layers"
    data.mkdir()
    for i, x in enumerate(layers):
        np.save(data / f"layer_{i}.npy", x)
    np.save(data / "labels.npy", labels)
    config = base.analysis_config()
    config.data.name = "arrays"
    config.data.path = str(data)
    config.probe.enabled = False
    config.profile.update(OPTIONS)
    results = full.run(config, tmp_path / "wd")
    assert results["id"] == reference.id.tolist()  # exactly: one implementation
    assert results["id_err"] == reference.id_err.tolist()
    assert results["label_overlap"] == reference.label_overlap.tolist()
    assert results["adjacent_overlap"] == reference.adjacent_overlap.tolist()
    assert (results["selected_layer"], results["peak_layer"], results["selection_rule"]) == (
        reference.selected_layer, reference.peak_layer, reference.selection_rule)
    pipeline = np.load(tmp_path / "wd" / "profile.npz")
    for key in ("twonn_mle", "gride_ids", "gride_errs", "decimation_ids"):
        np.testing.assert_array_equal(pipeline[key], reference.arrays[key])
    # The loaded pipeline result is a Profile too.
    assert idjax.Profile.load(tmp_path / "wd").id.tolist() == reference.id.tolist()
    # The directory itself is an accepted input, labels.npy found beside the layers.
    again = idjax.profile(data, **OPTIONS)
    np.testing.assert_array_equal(again.id, reference.id)
    np.testing.assert_array_equal(again.label_overlap, reference.label_overlap)


def test_input_forms_give_the_same_profile(arrays, reference, tmp_path):
    layers, labels = arrays
    np.savez(tmp_path / "layers.npz", **{f"layer_{i}": x for i, x in enumerate(layers)}, labels=labels)
    np.save(tmp_path / "stacked.npy", np.stack(layers))
    memmaps = [np.load(tmp_path / "stacked.npy", mmap_mode="r")[i] for i in range(len(layers))]
    import jax.numpy as jnp

    forms = {
        "npz": (tmp_path / "layers.npz", None),
        "stacked npy": (tmp_path / "stacked.npy", labels),
        "dict of jax arrays": ({f"block{i}": jnp.asarray(x) for i, x in enumerate(layers)}, labels),
        "tuple of memmaps": (tuple(memmaps), labels),
        "string labels": (layers, np.array(["a", "b", "c"])[labels]),
    }
    for name, (layer_input, layer_labels) in forms.items():
        got = idjax.profile(layer_input, layer_labels, **OPTIONS)
        np.testing.assert_array_equal(got.id, reference.id, err_msg=name)
        np.testing.assert_array_equal(got.label_overlap, reference.label_overlap, err_msg=name)


@pytest.mark.torch
def test_torch_tensors(arrays, reference):
    torch = pytest.importorskip("torch")
    layers, labels = arrays
    got = idjax.profile([torch.from_numpy(x) for x in layers], torch.from_numpy(labels), **OPTIONS)
    np.testing.assert_array_equal(got.id, reference.id)
    half = idjax.profile([torch.from_numpy(x).to(torch.bfloat16) for x in layers], labels, **OPTIONS)
    assert half.id.shape == reference.id.shape and np.isfinite(half.id).all()


def test_save_load_plot_markdown(reference, tmp_path):
    reference.save(tmp_path / "p")
    loaded = idjax.Profile.load(tmp_path / "p")
    np.testing.assert_array_equal(loaded.id, reference.id)
    assert loaded.summary["selected_layer"] == reference.selected_layer
    json.loads((tmp_path / "p" / "results.json").read_text())
    table = reference.to_markdown()
    assert table.count("\n| ") == len(reference.id)
    assert ("**selected**" in table) if reference.selected_layer is not None else ("no layer selected" in table)
    assert set(reference.estimators) >= {"twonn", "twonn_mle", "gride_1_2", "gride_8_16"}
    figures = reference.plot(tmp_path / "fig")
    assert figures and all(f.stat().st_size > 5000 and f.with_suffix(".pdf").is_file() for f in figures)


def test_bad_inputs_name_the_problem(arrays):
    layers, labels = arrays
    with pytest.raises(ValueError, match="layer 1 has 239 rows"):
        idjax.profile([layers[0], layers[1][:-1]])
    with pytest.raises(ValueError, match=r"layer 0 has shape \(240,\)"):
        idjax.profile([layers[0][:, 0], layers[1]])
    with pytest.raises(ValueError, match="labels have shape"):
        idjax.profile(layers, labels[:-1])
    with pytest.raises(TypeError, match="did you mean k_max"):
        idjax.profile(layers, k_mx=16)
    with pytest.raises(ValueError, match="duplicates='maybe': must be one of drop, error"):
        idjax.profile(layers, duplicates="maybe")
    with pytest.raises(ValueError, match="k_max='abc': must be an integer >= 2"):
        idjax.profile(layers, k_max="abc")
    with pytest.raises(ValueError, match="at least 2"):
        idjax.profile(layers[:1])
    with pytest.raises(FileNotFoundError, match="no .npy files"):
        idjax.profile("/")
