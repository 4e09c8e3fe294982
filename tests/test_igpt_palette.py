"""An iGPT checkpoint is read through its own colour clusters; fitting one for it must be asked for."""

import json
import shutil

import numpy as np
import pytest

from configs import base
from experiments import datasets, extract, profile, store
from experiments.image_datasets import load_digits
from models import igpt, palette

N_COLORS = 16
N_IMAGES = 60


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A HF ImageGPT directory (random weights, save_pretrained) for 8x8 images and 16 colours, with a
    preprocessor_config.json holding known clusters (random, unsorted: nothing a fit would find)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("imagegpt")
    torch.manual_seed(0)
    config = transformers.ImageGPTConfig(vocab_size=N_COLORS + 1, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    transformers.ImageGPTForCausalImageModeling(config).eval().save_pretrained(directory)
    clusters = np.random.default_rng(7).uniform(-1, 1, (N_COLORS, 3)).astype(np.float32)
    (directory / palette.PREPROCESSOR_CONFIG).write_text(json.dumps(
        {"clusters": clusters.tolist(), "do_color_quantize": True, "image_processor_type": "ImageGPTImageProcessor"}))
    return directory, clusters


def hf_config(path, **igpt_settings):
    config = base.analysis_config()
    config.name = "igpt-hf"
    config.model.family = "igpt"
    config.model.source = "hf"
    config.model.path = str(path)
    for key, value in igpt_settings.items():
        config.model.igpt[key] = value
    config.data.name = "digits"
    config.data.max_examples = N_IMAGES
    config.extract.batch_size = 32
    config.profile.k_max = 8
    config.profile.gride_range_max = 8
    config.profile.label_ks = (5,)
    config.profile.overlap_k = 5
    config.profile.decimation = False
    config.probe.enabled = False
    return config


def nearest_cluster_ids(images: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """[N, H, W, 1] uint8 grey images -> [N, H*W] index of the nearest cluster, in float64 numpy."""
    x = np.repeat(images, 3, -1).reshape(len(images), -1, 3).astype(np.float64) / 127.5 - 1.0
    return ((x[..., None, :] - clusters.astype(np.float64)) ** 2).sum(-1).argmin(-1)


@pytest.mark.torch
def test_hf_directory_is_extracted_with_its_own_clusters(hf_dir, tmp_path, monkeypatch):
    directory, clusters = hf_dir
    config = hf_config(directory)
    seen = []
    real_quantize = palette.quantize

    def spy(images, colours):
        seen.append(np.array(colours))
        tokens = real_quantize(images, colours)
        seen.append(np.array(tokens))
        return tokens

    monkeypatch.setattr(palette, "quantize", spy)
    extract.run(config, tmp_path)
    for used in seen[0::2]:  # one call per batch, always with the checkpoint's clusters
        np.testing.assert_array_equal(used, clusters)
    tokens = np.concatenate(seen[1::2])

    digits = load_digits()
    keep = datasets.select_indices(len(digits.images), digits.labels, config.data)
    expected = nearest_cluster_ids(digits.images[keep], clusters)
    assert len(np.unique(expected)) > 3  # the images use several colours, so the comparison means something
    np.testing.assert_array_equal(tokens, expected)
    assert not (tmp_path / "palette.npy").exists()  # nothing was fitted

    # The stored representations are the model's on exactly those colour ids.
    model_config, params = igpt.load_hf(directory)
    direct = igpt.pooled_hidden_states(igpt.IGPT(model_config), params,
                                         igpt.add_start_token(expected[:8], model_config.start_token))
    reps = store.load(store.store_dir(tmp_path))
    np.testing.assert_allclose(np.stack([layer[:8] for layer in reps.layers]), direct, rtol=1e-5, atol=1e-6)

    results = profile.run(config, tmp_path)
    record = results["model"]["palette"]
    assert record == {"kind": "checkpoint", "n_colors": N_COLORS, "digest": palette.palette_digest(clusters)}
    assert results["model"]["locations"]["palette"] == str(directory / palette.PREPROCESSOR_CONFIG)
    assert json.loads((tmp_path / "results.json").read_text())["model"]["palette"] == record


@pytest.mark.torch
def test_pretrained_checkpoint_without_clusters_is_refused(hf_dir, tmp_path):
    directory, _ = hf_dir
    bare = tmp_path / "bare"
    shutil.copytree(directory, bare)
    (bare / palette.PREPROCESSOR_CONFIG).unlink()
    with pytest.raises(palette.PaletteError, match="no colour clusters") as err:
        extract.run(hf_config(bare), tmp_path / "run")
    message = str(err.value)
    assert "model.igpt.palette" in message and "kmeans_centers.npy" in message
    assert "model.igpt.palette='fit'" in message
    assert not store.store_dir(tmp_path / "run").exists()  # refused before anything was extracted

    # Asked for explicitly, a fitted palette is used (and kept beside the results).
    extract.run(hf_config(bare, palette="fit"), tmp_path / "fitted")
    meta = store.load(store.store_dir(tmp_path / "fitted")).manifest["metadata"]
    fitted = palette.load_palette(tmp_path / "fitted" / "palette.npy")
    assert meta["model"]["palette"]["kind"] == "fitted"
    assert meta["model"]["palette"]["digest"] == palette.palette_digest(fitted)


def test_palette_source_rule(tmp_path):
    clusters = np.random.default_rng(1).uniform(-1, 1, (N_COLORS, 3)).astype(np.float32)
    (tmp_path / "openai").mkdir()
    np.save(tmp_path / "openai" / palette.KMEANS_CENTERS, clusters)
    openai = str(tmp_path / "openai")
    assert igpt.palette_source("hf", openai, None) == ("checkpoint", tmp_path / "openai" / palette.KMEANS_CENTERS)
    assert igpt.palette_source("hf", openai, openai) == ("file", tmp_path / "openai" / palette.KMEANS_CENTERS)
    assert igpt.palette_source("hf", openai, "fit") == ("fitted", None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / palette.PREPROCESSOR_CONFIG).write_text("{}")  # a preprocessor config without clusters
    with pytest.raises(palette.PaletteError, match="no colour clusters"):
        igpt.palette_source("hf", str(tmp_path / "empty"), None)
    # A model trained here keeps its saved palette.
    trained = igpt.palette_source("trained", str(tmp_path / "train"), None)
    assert trained == ("trained", tmp_path / "train" / "palette.npy")
    assert igpt.palette_source("random", None, None) == ("fitted", None)
    # An Orbax checkpoint uses the clusters saved beside it (as experiments/export.py writes them); without
    # them a palette is fitted.
    assert igpt.palette_source("orbax", openai, None) == ("checkpoint", tmp_path / "openai" / palette.KMEANS_CENTERS)
    assert igpt.palette_source("orbax", str(tmp_path / "train"), None) == ("fitted", None)
    colours, record = igpt.load_palette_for("file", tmp_path / "openai" / palette.KMEANS_CENTERS, None, N_COLORS,
                                            seed=0, workdir=tmp_path)
    np.testing.assert_array_equal(colours, clusters)
    assert record["n_colors"] == N_COLORS and record["digest"] == palette.palette_digest(clusters)
