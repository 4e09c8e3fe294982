"""Inputs, model checkpoints and training records at gs:// URIs give exactly what the same files give on local disk.

gs:// is served by an in-memory object store: epath's fsspec backend pointed at fsspec's `MemoryFileSystem`
(no rename primitive, no append, no memory maps), so every read and write goes through epath as it would
against GCS. Each test puts the same bytes on local disk and into the store, reads both with the same
reader, and compares: the local read is the reference. Orbax checkpoints are not exercised here: Orbax
reaches gs:// through TensorStore's own GCS driver, which an fsspec store cannot stand in for.
"""

from __future__ import annotations

import gzip
import json
import pathlib

import chex
import jax
import numpy as np
import pytest
from etils import epath

from configs import base
from experiments import datasets, files, image_datasets, protein_datasets, tensorboard, text_datasets, train
from models import esm2, palette, registry


def upload(local: pathlib.Path, uri: str) -> epath.Path:
    """Copies a local file, or every file under a local directory, to `uri` in the store."""
    target = epath.Path(uri)
    sources = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for source in sources:
        dest = target if source == local else target / source.relative_to(local).as_posix()
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(source.read_bytes())
    return target


def data_config(**values):
    config = base.analysis_config()
    config.data.update(values)
    return config.data


# ---------------------------------------------------------------------------------------------------
# Datasets


SCOPE_RECORDS = 300  # a slice of the real SCOPe file: enough for several classes, folds and families


@pytest.fixture
def scope_slice(shared_data, tmp_path) -> pathlib.Path:
    records = (shared_data / protein_datasets.SCOPE_ASTRAL_40_207).read_bytes().split(b"\n>", SCOPE_RECORDS)
    path = tmp_path / "scope.fa"
    path.write_bytes(b"\n>".join(records[:SCOPE_RECORDS]) + b"\n")
    return path


@pytest.mark.parametrize("compressed", [False, True], ids=["fasta", "fasta.gz"])
def test_scope_fasta_from_gs_equals_local(scope_slice, compressed, tmp_path, gs_memory):
    local = scope_slice
    if compressed:
        local = tmp_path / "scope.fa.gz"
        local.write_bytes(gzip.compress(scope_slice.read_bytes()))
    remote = upload(local, f"gs://bucket/data/{local.name}")
    a, b = protein_datasets.read_scope_astral(local), protein_datasets.read_scope_astral(remote)
    assert len(a) == SCOPE_RECORDS and len(set(a.label_names["family"])) > 10
    assert (a.name, a.ids, a.sequences, a.descriptions, a.label_names) == \
        (b.name, b.ids, b.sequences, b.descriptions, b.label_names)
    for level in protein_datasets.SCOPE_LEVELS:
        np.testing.assert_array_equal(a.labels[level], b.labels[level])
    # The same through the dataset the pipeline configures (`data.path` a gs:// URI).
    x = datasets.load_examples(data_config(name="scope", path=str(local), label="superfamily"))
    y = datasets.load_examples(data_config(name="scope", path=str(remote), label="superfamily"))
    assert (x.inputs, x.ids, x.label_names) == (y.inputs, y.ids, y.label_names)
    np.testing.assert_array_equal(x.labels, y.labels)
    np.testing.assert_array_equal(x.groups, y.groups)
    assert y.description["path"] == f"gs://bucket/data/{local.name}"


def test_scope_text_from_gs_equals_local(scope_slice, gs_memory):
    remote = upload(scope_slice, "gs://bucket/data/scope.fa")
    a, b = text_datasets.scope_text_dataset(scope_slice), text_datasets.scope_text_dataset(remote)
    assert len(a) > 50
    assert (a.texts, a.ids, a.label_names) == (b.texts, b.ids, b.label_names)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_missing_or_damaged_fasta_on_gs_named(tmp_path, gs_memory):
    with pytest.raises(protein_datasets.FastaError, match=r"FASTA file not found: gs://bucket/none\.fa"):
        protein_datasets.read_scope_astral("gs://bucket/none.fa")
    epath.Path("gs://bucket/cut.fa.gz").write_bytes(gzip.compress(b">d1 a.1.1.1 x\nACDE\n")[:20])
    with pytest.raises(protein_datasets.FastaError, match=r"gs://bucket/cut\.fa\.gz: cannot read"):
        protein_datasets.read_scope_astral("gs://bucket/cut.fa.gz")
    with pytest.raises(text_datasets.TextDatasetError, match=r"not found: gs://bucket/none\.fa"):
        text_datasets.read_scope_headers("gs://bucket/none.fa")


def _planar(images: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] -> ImageNet-32's channel-planar rows [N, 3*S*S]."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def test_npz_image_dataset_from_gs_equals_local(tmp_path, gs_memory):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(1, 11, 23)
    folder = tmp_path / "npz"
    folder.mkdir()
    for i, part in enumerate(np.array_split(np.arange(23), 10)):  # batch_10 sorts last only in natural order
        np.savez(folder / f"train_data_batch_{i + 1}.npz", data=_planar(images[part]), labels=labels[part])
    (folder / "README.txt").write_text("not an array")
    remote = upload(folder, "gs://bucket/npz")
    a = image_datasets.load_imagenet32(folder, num_classes=10)
    b = image_datasets.load_imagenet32(remote, num_classes=10)
    np.testing.assert_array_equal(a.images, images)  # the local read is itself right
    np.testing.assert_array_equal(b.images, a.images)
    np.testing.assert_array_equal(b.labels, a.labels)
    assert (b.name, b.ids, b.class_names) == (a.name, a.ids, a.class_names)
    single = image_datasets.load_imagenet32(remote / "train_data_batch_10.npz", num_classes=10)
    np.testing.assert_array_equal(single.images, images[-2:])
    epath.Path("gs://bucket/trunc.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(image_datasets.DatasetError, match=r"gs://bucket/trunc\.npz: not a readable \.npz"):
        image_datasets.load_imagenet32("gs://bucket/trunc.npz")


def test_image_folder_from_gs_equals_local(tmp_path, gs_memory):
    from PIL import Image

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 6, 6, 3), dtype=np.uint8)
    root = tmp_path / "folder"
    for i, (cls, img) in enumerate(zip(["owl", "owl", "cat", "cat", "cat", "owl", "cat"], images, strict=True)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("skipped: not an image")
    remote = upload(root, "gs://bucket/folder")
    a = image_datasets.load_image_folder(root)
    b = image_datasets.load_image_folder(remote)
    np.testing.assert_array_equal(a.images, images[[2, 3, 4, 6, 0, 1, 5]])
    np.testing.assert_array_equal(b.images, a.images)
    assert (b.labels.tolist(), b.class_names, b.ids) == (a.labels.tolist(), a.class_names, a.ids)
    # The configured dataset: an image folder under data.root = gs://...
    x = datasets.load_examples(data_config(name="imagenet32", root=str(root)))
    y = datasets.load_examples(data_config(name="imagenet32", root=str(remote)))
    np.testing.assert_array_equal(x.inputs, y.inputs)
    assert (x.ids, x.labels.tolist()) == (y.ids, y.labels.tolist())


def test_mnist_idx_from_gs_equals_local(tmp_path, gs_memory):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(
        bytes([0, 0, 8, 3]) + b"".join(int(n).to_bytes(4, "big") for n in images.shape) + images.tobytes()))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + labels.tobytes())
    remote = upload(tmp_path, "gs://bucket/mnist")
    a, b = image_datasets.load_mnist(tmp_path), image_datasets.load_mnist(remote)
    np.testing.assert_array_equal(a.images[..., 0], images)
    np.testing.assert_array_equal(b.images, a.images)
    np.testing.assert_array_equal(b.labels, a.labels)


def test_cifar10_convnetjs_from_gs_equals_local(tmp_path, gs_memory):
    from PIL import Image

    rows = np.arange(1000 * 1024 * 3, dtype=np.int64).reshape(1000, 1024, 3)
    batch = ((rows * 7 + rows // 3072) % 251).astype(np.uint8)  # deterministic, every image different
    Image.fromarray(batch).save(tmp_path / "cifar10_batch_0.png")
    labels = np.arange(1000) % 10
    (tmp_path / "cifar10_labels.js").write_text("var labels=[" + ",".join(map(str, labels)) + "];")
    remote = upload(tmp_path, "gs://bucket/cifar")
    a = image_datasets.load_cifar10_convnetjs(tmp_path, batches=[0])
    b = image_datasets.load_cifar10_convnetjs(remote, batches=[0])
    np.testing.assert_array_equal(a.images, batch.reshape(1000, 32, 32, 3))
    np.testing.assert_array_equal(b.images, a.images)
    np.testing.assert_array_equal(b.labels, labels)


def test_heldout_record_on_gs(gs_memory):
    trained = [f"digits:{i}" for i in range(0, 1797, 3)]
    files.atomic_write_json("gs://bucket/run/data_split.json", {"train_ids": trained})
    kept = datasets.heldout_indices([f"digits:{i}" for i in range(1797)], "gs://bucket/run")
    assert kept.tolist() == [i for i in range(1797) if i % 3]
    with pytest.raises(datasets.DataSourceError, match=r"heldout_of='gs://bucket/other': no data_split\.json"):
        datasets.heldout_indices(["digits:0"], "gs://bucket/other")


# ---------------------------------------------------------------------------------------------------
# Models


@pytest.fixture(scope="module")
def tiny_esm2_hf(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    """A HF-format ESM-2 directory (config.json + model.safetensors) of random values, no torch and no compilation:
    the params' shapes come from `jax.eval_shape`, their values from numpy."""
    from safetensors.numpy import save_file

    config = esm2.get_config("tiny")
    rng = np.random.default_rng(4)
    shapes = jax.eval_shape(lambda: esm2.ESM2(config).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes)
    path = tmp_path_factory.mktemp("tiny_esm2")
    save_file(esm2.to_hf_state_dict(config, params), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "model_type": "esm", "_name_or_path": "tiny", "vocab_size": 33, "hidden_size": config.embed_dim,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": 4 * config.embed_dim, "position_embedding_type": "rotary", "token_dropout": True,
        "mask_token_id": 32, "pad_token_id": 1, "emb_layer_norm_before": False, "max_position_embeddings": 1026,
        "layer_norm_eps": 1e-5}))
    return path, params


def test_hf_checkpoint_from_gs_loads_the_same_params(tiny_esm2_hf, tmp_path, gs_memory):
    path, params = tiny_esm2_hf
    remote = upload(path, "gs://bucket/models/tiny_esm2")
    config_local, params_local = registry.load("esm2", "hf", str(path))
    config_remote, params_remote = registry.load("esm2", "hf", str(remote))  # model.path = gs://...
    chex.assert_trees_all_equal(jax.device_get(params_local), params)  # the local read is itself right
    chex.assert_trees_all_equal(jax.device_get(params_remote), jax.device_get(params_local))
    assert config_remote == config_local
    # The sharded layout (index + shards), as large checkpoints are published.
    from safetensors.numpy import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_bytes((path / "config.json").read_bytes())
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(sharded / name))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, names in shards.items() for k in names}}))
    _, params_sharded = esm2.load_hf(upload(sharded, "gs://bucket/models/sharded"))
    chex.assert_trees_all_equal(jax.device_get(params_sharded), params)


def test_damaged_or_missing_checkpoint_on_gs_named(tiny_esm2_hf, gs_memory):
    path, _ = tiny_esm2_hf
    remote = upload(path, "gs://bucket/models/cut")
    raw = (path / "model.safetensors").read_bytes()
    (remote / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(esm2.CheckpointError, match=rf"gs://bucket/models/cut/model\.safetensors \({len(raw) // 2} "
                                                   r"bytes\).*truncated or corrupt"):
        esm2.load_hf(remote)
    with pytest.raises(esm2.CheckpointError, match=r"no config\.json at gs://bucket/models/none"):
        esm2.load_hf("gs://bucket/models/none")


@pytest.mark.torch
def test_fair_esm_pt_from_gs_loads_the_same_params(tiny_esm2_hf, tmp_path, gs_memory):
    import argparse

    torch = pytest.importorskip("torch")
    _, params = tiny_esm2_hf
    config = esm2.get_config("tiny")
    flat = {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    state = {"encoder.sentence_encoder." + key: torch.from_numpy(np.ascontiguousarray(transform(flat[path])))
             for path, (key, transform) in esm2.conversion_rules(config, "fair").items()}  # transforms self-inverse
    cfg = argparse.Namespace(encoder_layers=config.num_layers, encoder_embed_dim=config.embed_dim,
                             encoder_attention_heads=config.num_heads, token_dropout=True)
    local = tmp_path / "esm2_tiny.pt"
    torch.save({"cfg": {"model": cfg}, "model": state}, local)
    remote = upload(local, "gs://bucket/models/esm2_tiny.pt")
    config_local, params_local = esm2.load_fair_esm(local)
    config_remote, params_remote = registry.load("esm2", "fair_esm", str(remote))
    chex.assert_trees_all_equal(jax.device_get(params_local), params)
    chex.assert_trees_all_equal(jax.device_get(params_remote), jax.device_get(params_local))
    assert config_remote == config_local
    (remote.parent / "cut.pt").write_bytes(local.read_bytes()[:5000])
    with pytest.raises(esm2.CheckpointError, match=r"cannot read gs://bucket/models/cut\.pt \(5000 bytes\)"):
        esm2.load_fair_esm("gs://bucket/models/cut.pt")


def test_palette_files_on_gs(tmp_path, gs_memory):
    colours = np.random.default_rng(3).uniform(-1, 1, (16, 3)).astype(np.float32)
    written = palette.save_palette("gs://bucket/run/palette", colours)
    assert str(written) == "gs://bucket/run/palette.npy"
    np.testing.assert_array_equal(palette.load_palette(written), colours)
    np.testing.assert_array_equal(palette.load_palette(palette.save_palette(tmp_path / "palette.npy", colours)),
                                  colours)
    # A checkpoint directory's own clusters: preprocessor_config.json preferred, else kmeans_centers.npy.
    ckpt = epath.Path("gs://bucket/igpt")
    files.atomic_save_npy(ckpt / palette.KMEANS_CENTERS, colours)
    assert str(palette.checkpoint_palette(ckpt)) == f"gs://bucket/igpt/{palette.KMEANS_CENTERS}"
    files.atomic_write_json(ckpt / palette.PREPROCESSOR_CONFIG, {"clusters": colours[::-1].tolist()})
    assert palette.checkpoint_palette(ckpt).name == palette.PREPROCESSOR_CONFIG
    np.testing.assert_array_equal(palette.load_palette(ckpt), colours[::-1])


def test_text_tokenizer_from_gs_equals_local(tmp_path, gs_memory):
    from models import bert, text_tokenizer

    try:
        packaged = bert.minilm_checkpoint_dir()
    except bert.checkpoints.CheckpointError as err:
        pytest.skip(str(err))
    names = ("config.json", "tokenizer.json", "sentence_bert_config.json", "modules.json", "1_Pooling/config.json")
    for name in names:
        upload(packaged / name, f"gs://bucket/minilm/{name}")
    local, remote = text_tokenizer.load_tokenizer(packaged), text_tokenizer.load_tokenizer("gs://bucket/minilm")
    texts = ["Protozoan/bacterial hemoglobin", "Ribosomal protein S5, C-terminal domain " * 40]
    a, b = text_tokenizer.encode_batch(local, texts), text_tokenizer.encode_batch(remote, texts)
    assert remote.max_length == local.max_length == 256
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert bert.read_sentence_recipe("gs://bucket/minilm") == bert.read_sentence_recipe(packaged)


# ---------------------------------------------------------------------------------------------------
# Training records


def test_append_bytes_local_and_gs(tmp_path, gs_memory):
    for path in (tmp_path / "log" / "a.bin", epath.Path("gs://bucket/log/a.bin")):
        files.append_bytes(path, b"one\n")
        files.append_bytes(path, b"two\n")
        assert epath.Path(path).read_bytes() == b"one\ntwo\n"
    assert sorted(p.name for p in epath.Path("gs://bucket/log").iterdir()) == ["a.bin"]  # no temporary left
    assert files.absolute("rel/x") == epath.Path(pathlib.Path("rel/x").absolute())
    assert str(files.absolute("gs://bucket/x")) == "gs://bucket/x"


def test_metrics_log_on_gs_equals_local(tmp_path, gs_memory, monkeypatch):
    monkeypatch.setattr(tensorboard, "_FILES", {})  # event files of other tests' directories are not ours
    records = [{"kind": "eval", "step": 0, "loss": 3.5}, {"kind": "train", "step": 4, "loss": 3.0, "lr": 0.1},
               {"kind": "eval", "step": 4, "loss": 2.9}, {"kind": "train", "step": 8, "loss": 2.5, "lr": 0.05}]
    workdirs = (tmp_path / "run", epath.Path("gs://bucket/run"))
    for workdir in workdirs:
        for record in records:
            train._append_jsonl(epath.Path(workdir) / "metrics.jsonl", record)
        files.append_bytes(epath.Path(workdir) / "metrics.jsonl", b'{"kind": "tra')  # a kill mid-append
    assert train.read_metrics(workdirs[1]) == train.read_metrics(workdirs[0]) == records
    for workdir in workdirs:
        train._truncate_metrics(epath.Path(workdir) / "metrics.jsonl", 4)
    local, remote = ((epath.Path(w) / "metrics.jsonl").read_bytes() for w in workdirs)
    assert remote == local and train.read_metrics(workdirs[1]) == records[:3]
    # TensorBoard, written with each record: the same events (wall times aside) in one event file per directory.
    events = []
    for workdir in workdirs:
        (event_file,) = list((epath.Path(workdir) / "tensorboard").iterdir())
        events.append(_payloads_without_wall_time(event_file.read_bytes()))
    assert len(events[0]) == 1 + len(records) and events[1] == events[0]


def _payloads_without_wall_time(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 8], "little")
        payload = data[pos + 12 : pos + 12 + length]
        assert payload[0] == 0x09  # field 1 (wall_time), a fixed 8-byte double, comes first
        out.append(payload[9:])
        pos += 16 + length
    return out


def test_loss_plot_and_damaged_checkpoint_moves_on_gs(tmp_path, gs_memory, monkeypatch):
    monkeypatch.setattr(tensorboard, "_FILES", {})
    for workdir in (epath.Path(tmp_path / "run"), epath.Path("gs://bucket/run")):
        files.atomic_write_json(workdir / "model_config.json", {"family": "esm2", "config": {}})
        train._append_jsonl(workdir / "metrics.jsonl", {"kind": "eval", "step": 0, "loss": 3.5})
        out = train.plot_metrics(workdir)
        assert out == workdir / "loss_curve.png" and out.read_bytes().startswith(b"\x89PNG")
        assert train.plot_metrics(workdir, workdir / "loss.pdf").read_bytes().startswith(b"%PDF")
        for content in (b"first", b"second"):  # the second replaces the first one set aside at that step
            for item in ("state/a", "data/b"):
                path = workdir / "checkpoints" / "8" / item
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content + item.encode())
            target = train._set_aside_damaged(workdir, 8)
            assert target == workdir / "checkpoints_damaged" / "8"
            assert not (workdir / "checkpoints" / "8").exists()
            assert (target / "state" / "a").read_bytes() == content + b"state/a"
            assert (target / "data" / "b").read_bytes() == content + b"data/b"
        # No temporary left behind (an object store keeps no empty "checkpoints" directory).
        assert {p.name for p in workdir.iterdir()} - {"checkpoints"} == {
            "checkpoints_damaged", "loss.pdf", "loss_curve.png", "metrics.jsonl", "model_config.json", "tensorboard"}


def test_per_layer_arrays_from_gs_equal_local(gs_memory, tmp_path):
    """`idjax.load_layers` (the reader behind `data.name=arrays` and `idjax.profile(path)`) on a directory of
    .npy files with labels, an .npz and one (L, N, D) .npy: gs:// gives the local arrays, names and labels."""
    from experiments import array_data, store
    from idjax.layer_profile import load_layers

    rng = np.random.default_rng(0)
    stacked = rng.normal(size=(3, 40, 5)).astype(np.float32)
    labels = np.arange(40) % 4
    folder = tmp_path / "layers"
    folder.mkdir()
    for i, layer in enumerate(stacked):
        np.save(folder / f"layer_{i}.npy", layer)
    np.save(folder / "labels.npy", labels)
    np.savez(tmp_path / "layers.npz", layer_0=stacked[0], layer_1=stacked[1], labels=labels)
    np.save(tmp_path / "stacked.npy", stacked)
    for local in (folder, tmp_path / "layers.npz", tmp_path / "stacked.npy"):
        remote = upload(local, f"gs://bucket/{local.name}")
        want, got = load_layers(local, min_layers=1), load_layers(remote, min_layers=1)
        assert got[1] == want[1]
        for a, b in zip(got[0], want[0], strict=True):
            np.testing.assert_array_equal(a, b)
        if want[2] is None:
            assert got[2] is None
        else:
            np.testing.assert_array_equal(got[2], want[2])
    config = base.analysis_config()
    config.data.update(name="arrays", path="gs://bucket/layers")
    manifest = array_data.extract(config, "gs://bucket/run/representations", "fp")
    reps = store.load("gs://bucket/run/representations")
    assert manifest["n_examples"] == 40
    np.testing.assert_array_equal(np.asarray(reps.layers[2]), stacked[2])
    np.testing.assert_array_equal(np.asarray(reps.labels), labels)


@pytest.mark.slow
def test_idjax_profile_reads_and_writes_gs(gs_memory, tmp_path):
    """`idjax.profile` on arrays at a gs:// URI with a gs:// cache, then `Profile.save`, `.load` and `.plot` there:
    the same IDs as the profile of the local copy, and every file in the store."""
    import idjax

    rng = np.random.default_rng(1)
    folder = tmp_path / "layers"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"layer_{i}.npy", rng.normal(size=(60, 4 + i)).astype(np.float32))
    upload(folder, "gs://bucket/layers")
    options = dict(k_max=8, gride_range_max=8, gride_rank=8, decimation=False, label_ks=(5,), overlap_k=5)
    want = idjax.profile(folder, **options)
    got = idjax.profile("gs://bucket/layers", workdir="gs://bucket/cache", **options)
    np.testing.assert_array_equal(got.id, want.id)
    assert list(epath.Path("gs://bucket/cache/profile_layers").iterdir())  # per-layer caches in the store
    got.save("gs://bucket/out")
    np.testing.assert_array_equal(idjax.Profile.load("gs://bucket/out").id, want.id)
    figures = got.plot("gs://bucket/out")
    assert figures and all(str(f).startswith("gs://") and f.exists() for f in figures)
