"""Image readers, TFDS array_record route and colour palettes against known facts of the shared files."""

from __future__ import annotations

import gzip
import json
import sys

import numpy as np
import pytest

from experiments import image_datasets as D
from models import palette as P

# Facts from $IDJAX_SHARED_DATA/SOURCES.md (MNIST first labels: the canonical t10k order).
MNIST_T10K_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_T10K_FIRST = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
CIFAR_TRAIN_COUNTS = [396, 366, 420, 384, 422, 393, 414, 385, 407, 413]
CIFAR_TRAIN_FIRST = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
CIFAR_TEST_COUNTS = [103, 89, 100, 103, 90, 86, 112, 102, 106, 109]
CIFAR_TEST_FIRST = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
DIGITS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # sklearn's bundled copy


@pytest.fixture(scope="module")
def images_dir(shared_data):
    return shared_data / "images"


@pytest.fixture(scope="module")
def mnist(images_dir):
    return D.load_mnist(images_dir, "test")


@pytest.fixture(scope="module")
def cifar_train(images_dir):
    return D.load_cifar10_convnetjs(images_dir / "cifar10_convnetjs", "train")


# ---------------------------------------------------------------------------------------------------
# Readers


def test_mnist_t10k(mnist):
    assert mnist.images.shape == (10000, 28, 28, 1) and mnist.images.dtype == np.uint8
    assert mnist.class_counts().tolist() == MNIST_T10K_COUNTS
    assert mnist.labels[:10].tolist() == MNIST_T10K_FIRST
    assert mnist.images.max() == 255 and mnist.images.min() == 0
    item = mnist[3]
    assert item["label"] == 0 and item["index"] == 3 and item["image"].shape == (28, 28, 1)
    assert len(mnist) == 10000


def test_cifar10_convnetjs(images_dir, cifar_train):
    assert cifar_train.images.shape == (4000, 32, 32, 3) and cifar_train.images.dtype == np.uint8
    assert cifar_train.class_counts().tolist() == CIFAR_TRAIN_COUNTS
    assert cifar_train.labels[:10].tolist() == CIFAR_TRAIN_FIRST
    assert cifar_train.class_names[6] == "frog"
    test = D.load_cifar10_convnetjs(images_dir / "cifar10_convnetjs", "test")
    assert test.images.shape == (1000, 32, 32, 3)
    assert test.class_counts().tolist() == CIFAR_TEST_COUNTS
    assert test.labels[:10].tolist() == CIFAR_TEST_FIRST
    one = D.load_cifar10_convnetjs(images_dir / "cifar10_convnetjs", batches=[1])
    np.testing.assert_array_equal(one.images, cifar_train.images[1000:2000])
    np.testing.assert_array_equal(one.labels, cifar_train.labels[1000:2000])


def test_digits_offline_default():
    ds = D.load_image_dataset("digits")
    assert ds.images.shape == (1797, 8, 8, 1) and ds.images.dtype == np.uint8
    assert ds.class_counts().tolist() == DIGITS_COUNTS
    assert ds.labels[:10].tolist() == list(range(10))
    assert ds.images.max() == 255  # 16 -> 255


def test_prepare_resize_and_rgb(mnist):
    small = D.prepare(mnist.subset(slice(0, 50)), size=16, rgb=True)
    assert small.images.shape == (50, 16, 16, 3) and small.labels.tolist() == mnist.labels[:50].tolist()
    np.testing.assert_array_equal(small.images[..., 0], small.images[..., 2])  # grey stays grey
    const = np.full((2, 32, 32, 3), 77, np.uint8)
    for resample in ("bilinear", "box", "bicubic", "lanczos", "nearest"):
        np.testing.assert_array_equal(D.prepare_images(const, size=8, resample=resample), const[:, :8, :8])
    assert D.prepare_images(mnist.images[:2, ..., 0], rgb=True).shape == (2, 28, 28, 3)
    # downscaling antialiases: a 2x2 checkerboard of 0/255 averages to mid grey
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)[None, ..., None]
    assert abs(int(D.prepare_images(checker, size=16, resample="box").mean()) - 127) <= 1
    ds = D.load_image_dataset("digits", size=(4, 6), rgb=True)
    assert ds.images.shape == (1797, 4, 6, 3)


def test_missing_and_malformed_files(tmp_path, images_dir):
    with pytest.raises(D.DatasetError, match=r"t10k-images-idx3-ubyte\.gz or t10k-images-idx3-ubyte"):
        D.load_mnist(tmp_path)
    raw = gzip.decompress((images_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:5000])  # truncated, not gzipped
    labels = gzip.decompress((images_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(labels)
    with pytest.raises(D.DatasetError, match=r"t10k-images-idx3-ubyte: IDX header says shape \(10000, 28, 28\)"):
        D.load_mnist(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x89PNG....")
    with pytest.raises(D.DatasetError, match="not an IDX file"):
        D.load_mnist(tmp_path)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(D.DatasetError, match="bad.gz: corrupt gzip"):
        D.read_idx(tmp_path / "bad.gz")

    with pytest.raises(D.DatasetError, match="cifar10_labels.js"):
        D.load_cifar10_convnetjs(tmp_path, batches=[0])
    (tmp_path / "cifar10_labels.js").write_text("var labels=[" + ", ".join(["1"] * 2000) + "];")
    with pytest.raises(D.DatasetError, match="cifar10_batch_1.png"):
        D.load_cifar10_convnetjs(tmp_path, batches=[1])
    from PIL import Image

    Image.fromarray(np.zeros((10, 1024, 3), np.uint8)).save(tmp_path / "cifar10_batch_0.png")
    with pytest.raises(D.DatasetError, match=r"cifar10_batch_0.png: expected a 1024x1000 8-bit RGB PNG"):
        D.load_cifar10_convnetjs(tmp_path, batches=[0])
    with pytest.raises(D.DatasetError, match="cifar10_batch_1.png: not a readable PNG"):
        (tmp_path / "cifar10_batch_1.png").write_bytes(b"not a png")
        D.load_cifar10_convnetjs(tmp_path, batches=[1])
    (tmp_path / "cifar10_labels.js").write_text("labels = 3")
    with pytest.raises(D.DatasetError, match=r"expected `var labels=\[...\]`"):
        D.read_cifar10_labels_js(tmp_path / "cifar10_labels.js")
    with pytest.raises(ValueError, match="pass root"):
        D.load_image_dataset("mnist")


# ---------------------------------------------------------------------------------------------------
# ImageNet-32 layouts (synthetic files: the real data set is not shipped)


def _planar(images: np.ndarray) -> np.ndarray:
    """[N, S, S, 3] -> the official [N, 3*S*S] channel-planar rows."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def test_imagenet32_npz_layouts(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(1, 1001, 23)  # official files count classes from 1
    folder = tmp_path / "Imagenet32_train_npz"
    folder.mkdir()
    # 10 batches: natural order puts batch_10 last (lexicographic order would not)
    bounds = np.linspace(0, 23, 11).astype(int)
    for i in range(10):
        sl = slice(bounds[i], bounds[i + 1])
        np.savez(folder / f"train_data_batch_{i + 1}.npz", data=_planar(images[sl]), labels=labels[sl].tolist(),
                 mean=np.zeros(3072))
    ds = D.load_imagenet32(folder)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels - 1)
    assert ds.num_classes == 1000 and ds.image_shape == (32, 32, 3)

    np.savez(tmp_path / "val_data.npz", data=images[:5], labels=np.arange(5))  # HWC, 0-based
    val = D.load_imagenet32(tmp_path / "val_data.npz", label_base=0)
    np.testing.assert_array_equal(val.images, images[:5])
    assert val.labels.tolist() == [0, 1, 2, 3, 4]

    with pytest.raises(D.DatasetError, match=r"val_data.npz: labels minus label_base=1 span \[-1, 3\]"):
        D.load_imagenet32(tmp_path / "val_data.npz")
    np.savez(tmp_path / "broken.npz", images=images[:2])
    with pytest.raises(D.DatasetError, match=r"broken.npz: expected arrays 'data' and 'labels'"):
        D.load_imagenet32(tmp_path / "broken.npz")
    np.savez(tmp_path / "odd.npz", data=np.zeros((2, 100), np.uint8), labels=[1, 2])
    with pytest.raises(D.DatasetError, match=r"odd.npz: 'data' must be \[N, 3\*S\*S\]"):
        D.load_imagenet32(tmp_path / "odd.npz")
    (tmp_path / "trunc.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(D.DatasetError, match="trunc.npz: not a readable .npz"):
        D.load_imagenet32(tmp_path / "trunc.npz")
    with pytest.raises(D.DatasetError, match="ImageNet-32 path not found"):
        D.load_imagenet32(tmp_path / "nowhere")


def test_imagenet32_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    for i, (cls, img) in enumerate(zip(["n015", "n015", "n002", "n002", "n002"], images, strict=True)):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.fromarray(img).save(tmp_path / cls / f"{i}.png")
    ds = D.load_imagenet32(tmp_path)
    assert ds.class_names == ("n002", "n015")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    np.testing.assert_array_equal(ds.images, images[[2, 3, 4, 0, 1]])


# ---------------------------------------------------------------------------------------------------
# TFDS array_record route (no TensorFlow)


def test_tfds_array_record_without_tensorflow(tmp_path, images_dir, mnist):
    tfds = pytest.importorskip("tensorflow_datasets")
    source = D.tfds_data_source("mnist", "test", tmp_path, images_dir)
    assert len(source) == 10000
    for i in (0, 1, 4999, 9999):  # reader order is kept
        item = source[i]
        assert item["index"] == i and item["label"] == mnist.labels[i]
        np.testing.assert_array_equal(item["image"], mnist.images[i])
    labels = np.array([source[i]["label"] for i in range(len(source))])
    assert np.bincount(labels).tolist() == MNIST_T10K_COUNTS

    builder = D.build_tfds("digits", tmp_path, size=16, rgb=True)
    assert builder.info.features["image"].shape == (16, 16, 3)
    digits = builder.as_data_source("train")
    assert len(digits) == 1797 and digits[7]["label"] == 7
    # A separate reader needs only the files: `tfds.data_source` from the directory.
    again = tfds.data_source("idjax_digits/16x16_rgb", data_dir=str(tmp_path), split="train")
    np.testing.assert_array_equal(again[100]["image"], digits[100]["image"])
    assert sys.modules.get("tensorflow") is None


# ---------------------------------------------------------------------------------------------------
# Palettes


def test_fit_palette_cifar16(cifar_train):
    """16 colours on 200 CIFAR images: deterministic, every colour used, as good as scikit-learn's k-means."""
    from sklearn.cluster import KMeans

    images = cifar_train.images[:200]
    palette = P.fit_palette(images, 16, seed=0)
    assert palette.shape == (16, 3) and palette.dtype == np.float32
    assert -1 <= palette.min() and palette.max() <= 1
    np.testing.assert_array_equal(palette, P.fit_palette(images, 16, seed=0))
    tokens = P.quantize(images, palette)
    assert tokens.shape == (200, 1024) and tokens.dtype == np.int32
    assert len(np.unique(tokens)) == 16

    pixels = P.to_unit_range(images.reshape(-1, 3))

    def inertia(centers):
        return float(((pixels - centers[P.quantize(images, centers).reshape(-1)]) ** 2).sum())

    sk = KMeans(16, n_init=1, random_state=0).fit(pixels[::4])
    assert inertia(palette) <= 1.03 * inertia(sk.cluster_centers_.astype(np.float32))
    # A Lloyd fixed point: every colour is (nearly) the mean of the pixels it is assigned.
    ids = tokens.reshape(-1)
    means = np.stack([pixels[ids == j].mean(0) for j in range(16)])
    np.testing.assert_allclose(means, palette, atol=5e-3)
    # The mean colour of CIFAR is a muted grey-blue-ish: the palette's weighted mean reproduces it.
    recon = P.dequantize(tokens, palette)
    assert recon.shape == images.shape
    assert np.abs(recon.reshape(-1, 3).mean(0) - images.reshape(-1, 3).mean(0)).max() < 1.0
    assert np.sqrt(((recon.astype(float) - images) ** 2).mean()) < 20  # 16 colours: ~15 grey levels RMSE


def test_palette_on_mnist_is_grey_and_background_black(mnist):
    rgb = D.prepare_images(mnist.images[:500], rgb=True)
    palette = P.fit_palette(rgb, 16, seed=3)
    np.testing.assert_allclose(palette[:, 0], palette[:, 1], atol=1e-6)  # grey data -> grey centres
    np.testing.assert_allclose(palette[:, 0], palette[:, 2], atol=1e-6)
    tokens = P.quantize(rgb, palette)
    # Sorted by luminance, id 0 is the darkest: it holds the background (about 80% of MNIST pixels)
    frac_zero = float((mnist.images[:500] == 0).mean())
    assert 0.75 < frac_zero < 0.85
    assert (tokens == 0).mean() >= frac_zero
    # 256 grey levels <= 512 colours: the palette is the distinct colours, quantization is lossless.
    exact = P.fit_palette(rgb, 512)
    np.testing.assert_array_equal(P.dequantize(P.quantize(rgb, exact), exact, (28, 28)), rgb)


def test_quantize_matches_float64_reference_and_ties():
    rng = np.random.default_rng(0)
    palette = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    images = rng.integers(0, 256, (7, 9, 11, 3), dtype=np.uint8)  # odd sizes exercise block padding
    tokens = P.quantize(images, palette)
    assert tokens.shape == (7, 99)
    x = P.to_unit_range(images.reshape(-1, 3)).astype(np.float64)
    ref = ((x[:, None] - palette[None].astype(np.float64)) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(tokens.reshape(-1), ref)
    np.testing.assert_array_equal(P.quantize(images[0], palette), tokens[0])  # a single image
    dup = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], np.float32)  # ties -> lowest index
    assert P.quantize(np.full((1, 1, 1, 3), 128, np.uint8), dup).tolist() == [[0]]


@pytest.mark.torch
def test_quantize_matches_hf_image_processor(cifar_train):
    """Same ids as HF's ImageGPT processor (rescale, normalize, nearest cluster) on CIFAR images."""
    pytest.importorskip("transformers")
    from transformers.models.imagegpt.image_processing_pil_imagegpt import ImageGPTImageProcessorPil

    images = cifar_train.images[:16]
    palette = P.fit_palette(cifar_train.images[:100], 64, seed=0)
    proc = ImageGPTImageProcessorPil(clusters=palette, do_resize=False)
    hf_ids = np.asarray(proc(list(images), return_tensors="np")["input_ids"]).reshape(16, -1)
    ours = P.quantize(images, palette)
    diff = np.flatnonzero(hf_ids.reshape(-1) != ours.reshape(-1))
    # HF uses |a|^2 - 2ab + |b|^2 in float32: only exact float ties may differ.
    x = P.to_unit_range(images.reshape(-1, 3)).astype(np.float64)[diff]
    d = ((x[:, None] - palette[None].astype(np.float64)) ** 2).sum(-1)
    rows = np.arange(len(diff))
    assert np.all(np.abs(d[rows, hf_ids.reshape(-1)[diff]] - d[rows, ours.reshape(-1)[diff]]) < 1e-6)
    assert len(diff) <= 0.001 * hf_ids.size


def test_palette_files(tmp_path):
    rng = np.random.default_rng(0)
    palette = rng.uniform(-1, 1, (512, 3)).astype(np.float32)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/preprocessor_config.json").write_text(json.dumps({"clusters": palette.tolist(),
                                                                     "do_color_quantize": True}))
    np.testing.assert_array_equal(P.load_palette(tmp_path / "hf"), palette)
    np.save(tmp_path / "kmeans_centers.npy", palette.astype(np.float64))
    np.testing.assert_array_equal(P.load_palette(tmp_path / "kmeans_centers.npy"), palette)
    written = P.save_palette(tmp_path / "results/palette_512", palette)
    assert written.name == "palette_512.npy"
    np.testing.assert_array_equal(P.load_palette(written), palette)

    with pytest.raises(P.PaletteError, match="no 'clusters' entry"):
        (tmp_path / "empty.json").write_text("{}")
        P.load_palette(tmp_path / "empty.json")
    with pytest.raises(P.PaletteError, match=r"expected a \[K, 3\] colour palette, got shape \(512,\)"):
        np.save(tmp_path / "flat.npy", palette[:, 0])
        P.load_palette(tmp_path / "flat.npy")
    with pytest.raises(P.PaletteError, match=r"\[-1, 1\] pixel space"):
        np.save(tmp_path / "bytes.npy", (palette + 1) * 127.5)
        P.load_palette(tmp_path / "bytes.npy")
    with pytest.raises(P.PaletteError, match="palette file not found"):
        P.load_palette(tmp_path / "nothing.npy")
    with pytest.raises(P.PaletteError, match="neither preprocessor_config.json nor kmeans_centers.npy"):
        P.load_palette(tmp_path / "results")  # holds only palette_512.npy
    with pytest.raises(ValueError, match="convert grayscale first"):
        P.quantize(np.zeros((1, 4, 4, 1), np.uint8), palette)
    with pytest.raises(ValueError, match="not a square image"):
        P.dequantize(np.zeros((1, 12), np.int32), palette)
