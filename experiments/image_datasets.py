"""Labelled image datasets from files (local or at any `etils.epath` URI such as gs://), as numpy arrays or TFDS
array_record data sources.

Every reader returns an `ImageDataset`: uint8 images [N, H, W, C] (C = 1 for grayscale, 3 for RGB),
int64 labels [N] and the class names. `ImageDataset` is itself a random-access data source
(`len(ds)`, `ds[i] -> {"image", "label", "index"}`), the protocol Grain and TFDS data sources share.

Sources (see $IDJAX_SHARED_DATA/SOURCES.md for the shared files):
  - MNIST IDX files (`load_mnist`): `{t10k,train}-{images-idx3,labels-idx1}-ubyte[.gz]`.
  - CIFAR-10 as ConvNetJS PNG batches (`load_cifar10_convnetjs`): `cifar10_batch_{b}.png`, each
    1024 wide x 1000 high RGB, row i = image i flattened 32x32 row-major; labels in
    `cifar10_labels.js` (`var labels=[...]`, image i of batch b -> labels[1000*b + i]). Batches
    0..49 are the training set (in data_batch order), batch 50 the first 1000 test images.
  - scikit-learn's bundled digits (`load_digits`): 1797 8x8 images, shipped with the package, so the
    offline default. Values 0..16 are scaled to uint8 by round(v * 255 / 16).
  - ImageNet-32 (`load_imagenet32`): see its docstring for the accepted npz / folder layouts.

TFDS route (`build_tfds` / `tfds_data_source`): `GeneratorBasedBuilder`s with file_format
array_record, read back with `builder.as_data_source(split)` or, from another process,
`tfds.data_source(name, data_dir=...)`. This works without TensorFlow in tfds 4.9.10 as long as no
feature needs a TF codec: images are stored as raw `tfds.features.Tensor(uint8)` (the `Image`
feature's PNG encoding calls `tf.image.encode_png` and fails without TF). Examples keep the reader's
order (`disable_shuffling`), so `source[i]` is example i, with its `index` stored alongside.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import re
import types
import zipfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike

MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_TEST_BATCH = 50
CIFAR10_TRAIN_BATCHES = tuple(range(50))


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and what was expected."""


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images with labels; a random-access data source (`__len__`, `__getitem__`).

    ids: one string per image, "<name>:<index in the file>" (the name says the split, e.g. "mnist_t10k"),
    kept through `subset`, so a training run's split and an analysis of the same file name the same images.
    """

    name: str
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]
    class_names: tuple[str, ...]
    ids: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.ids is None:
            object.__setattr__(self, "ids", tuple(f"{self.name}:{i}" for i in range(self.images.shape[0])))
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"{self.name}: images must be uint8 [N, H, W, C], got {self.images.dtype} "
                             f"{self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: {self.images.shape[0]} images but labels of shape {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        return {"image": self.images[index], "label": int(self.labels[index]), "index": index}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> np.ndarray:
        """int64 [num_classes]: examples per class."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices: Sequence[int] | np.ndarray | slice) -> ImageDataset:
        kept = np.arange(len(self.ids))[indices]
        return dataclasses.replace(self, images=self.images[indices], labels=self.labels[indices],
                                   ids=tuple(self.ids[i] for i in kept))


# ---------------------------------------------------------------------------------------------------
# Transforms


def prepare_images(
    images: np.ndarray, *, size: int | tuple[int, int] | None = None, rgb: bool = False,
    resample: str = "bilinear",
) -> np.ndarray:
    """Optional resize and grayscale -> RGB, so MNIST/digits can feed an RGB palette or a tiny model.

    Args:
      images: uint8 [N, H, W], [N, H, W, 1] or [N, H, W, 3].
      size: output side (int) or (H, W); None keeps the size. Resizing uses PIL, which antialiases
        when downscaling (e.g. 32 -> 16 or 28 -> 8).
      rgb: repeat a single channel three times.
      resample: PIL filter name: "bilinear" (HF's iGPT processor), "box" (area mean), "bicubic",
        "lanczos" or "nearest".

    Returns:
      uint8 [N, H', W', C'] with C' = 3 if rgb else C.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected [N, H, W, 1|3] images, got shape {images.shape}")
    if size is not None:
        from PIL import Image

        filters = {
            "bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX,
            "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
            "nearest": Image.Resampling.NEAREST,
        }
        if resample not in filters:
            raise ValueError(f"resample must be one of {sorted(filters)}, got {resample!r}")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        if (h, w) != images.shape[1:3]:
            gray = images.shape[-1] == 1
            out = np.empty((images.shape[0], h, w, images.shape[-1]), np.uint8)
            for i, img in enumerate(images):
                pil = Image.fromarray(np.ascontiguousarray(img[..., 0] if gray else img))  # "L" / "RGB"
                resized = np.asarray(pil.resize((w, h), resample=filters[resample]))  # PIL takes (W, H)
                out[i] = resized[..., None] if gray else resized
            images = out
    if rgb and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images)


def prepare(dataset: ImageDataset, *, size: int | tuple[int, int] | None = None, rgb: bool = False,
            resample: str = "bilinear") -> ImageDataset:
    """`prepare_images` applied to a dataset (labels unchanged)."""
    images = prepare_images(dataset.images, size=size, rgb=rgb, resample=resample)
    return dataclasses.replace(dataset, images=images)


# ---------------------------------------------------------------------------------------------------
# MNIST (IDX)

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: epath.Path) -> bytes:
    if not path.is_file():
        raise DatasetError(f"file not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the suffix says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DatasetError(f"{path}: corrupt gzip stream ({err})") from err
    return raw


def read_idx(path: PathLike) -> np.ndarray:
    """Reads an IDX file (plain or gzipped): big-endian magic 0x0000 <type> <ndim>, ndim uint32 dims, data."""
    path = epath.Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (expected magic 0x0000 <type> <ndim>, got {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DatasetError(
            f"{path}: IDX header says shape {dims} ({expected} data bytes) but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(root: epath.Path, stem: str) -> epath.Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root}: expected {stem}.gz or {stem}")


def load_mnist(root: PathLike, split: str = "test") -> ImageDataset:
    """MNIST from IDX files in `root`. split: "test"/"t10k" or "train"."""
    root = epath.Path(root)
    prefix = {"test": "t10k", "t10k": "t10k", "train": "train"}.get(split)
    if prefix is None:
        raise ValueError(f"MNIST split must be 'train' or 'test', got {split!r}")
    images_path = _find(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{images_path}: expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{labels_path}: expected {images.shape[0]} labels, got shape {labels.shape}")
    if labels.max(initial=0) > 9:
        raise DatasetError(f"{labels_path}: labels must be digits 0..9, found {labels.max()}")
    return ImageDataset(f"mnist_{prefix}", images[..., None], labels.astype(np.int64), MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------------
# CIFAR-10 (ConvNetJS PNG batches)


def read_cifar10_labels_js(path: PathLike) -> np.ndarray:
    """`var labels=[6, 9, ...];` -> int64 [n]."""
    path = epath.Path(path)
    if not path.is_file():
        raise DatasetError(f"file not found: {path} (expected the ConvNetJS cifar10_labels.js)")
    text = path.read_text()
    match = re.search(r"\[([\d,\s]*)\]", text)
    if not match or not text.lstrip().startswith("var labels"):
        raise DatasetError(f"{path}: expected `var labels=[...]` holding integers 0..9")
    labels = np.array([int(t) for t in re.findall(r"\d+", match.group(1))], dtype=np.int64)
    if labels.size == 0 or labels.max() > 9:
        raise DatasetError(f"{path}: expected labels 0..9, got {labels.size} values up to {labels.max(initial=0)}")
    return labels


def read_cifar10_png_batch(path: PathLike) -> np.ndarray:
    """One ConvNetJS batch PNG (1024 wide x 1000 high, 8-bit RGB) -> uint8 [1000, 32, 32, 3]."""
    from PIL import Image, UnidentifiedImageError

    path = epath.Path(path)
    if not path.is_file():
        raise DatasetError(f"file not found: {path}")
    try:
        with Image.open(io.BytesIO(path.read_bytes())) as img:  # PIL reads bytes from any backend
            if img.mode != "RGB" or img.size != (1024, 1000):
                raise DatasetError(
                    f"{path}: expected a 1024x1000 8-bit RGB PNG, got mode {img.mode} size {img.size}"
                )
            arr = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"{path}: not a readable PNG ({err})") from err
    return arr.reshape(1000, 32, 32, 3)


def load_cifar10_convnetjs(
    root: PathLike, split: str = "train", *, batches: Sequence[int] | None = None
) -> ImageDataset:
    """CIFAR-10 ConvNetJS batches from `root` (see module docstring).

    Args:
      split: "train" (every batch file among 0..49 present, at least one), "test" (batch 50) or
        "all" (both). Ignored when `batches` is given.
      batches: explicit batch numbers; each file must exist.
    """
    root = epath.Path(root)
    if batches is None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"CIFAR-10 split must be 'train', 'test' or 'all', got {split!r}")
        train = [b for b in CIFAR10_TRAIN_BATCHES if (root / f"cifar10_batch_{b}.png").is_file()]
        if split in ("train", "all") and not train:
            raise DatasetError(f"{root}: no training batch cifar10_batch_{{0..49}}.png found")
        batches = {"train": train, "test": [CIFAR10_TEST_BATCH], "all": train + [CIFAR10_TEST_BATCH]}[split]
    else:
        split = "batches_" + "_".join(str(b) for b in batches)
    all_labels = read_cifar10_labels_js(root / "cifar10_labels.js")
    images, labels = [], []
    for b in batches:
        if not 0 <= b <= CIFAR10_TEST_BATCH:
            raise ValueError(f"CIFAR-10 ConvNetJS batch numbers run 0..50, got {b}")
        if all_labels.size < 1000 * (b + 1):
            raise DatasetError(f"{root / 'cifar10_labels.js'}: {all_labels.size} labels, batch {b} needs "
                               f"{1000 * (b + 1)}")
        images.append(read_cifar10_png_batch(root / f"cifar10_batch_{b}.png"))
        labels.append(all_labels[1000 * b : 1000 * (b + 1)])
    return ImageDataset(f"cifar10_convnetjs_{split}", np.concatenate(images), np.concatenate(labels),
                        CIFAR10_CLASSES)


# ---------------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits() -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, ships with the package: no download)."""
    from sklearn.datasets import load_digits as sk_load_digits

    data = sk_load_digits()
    images = np.rint(np.asarray(data.images) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ImageDataset("digits", images, np.asarray(data.target, np.int64), MNIST_CLASSES)


# ---------------------------------------------------------------------------------------------------
# ImageNet-32 (or any downsampled-ImageNet-style npz, and image folders)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _natural_key(path: epath.Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _npz_files(directory: epath.Path) -> list[epath.Path]:
    """The .npz files of a directory (hidden ones left out, as a glob would) in natural order; listed rather than
    globbed, which behaves the same on every epath backend."""
    return sorted((p for p in directory.iterdir() if p.suffix == ".npz" and not p.name.startswith(".")),
                  key=_natural_key)


def _npz_images(data: np.ndarray, path: epath.Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[-1] == 3:
        return data
    if data.ndim == 2 and data.shape[1] % 3 == 0:
        side = int(round((data.shape[1] // 3) ** 0.5))
        if 3 * side * side == data.shape[1]:
            # Official layout: channel-planar rows (all R, then G, then B), each side x side row-major.
            return data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1)
    raise DatasetError(f"{path}: 'data' must be [N, 3*S*S] channel-planar or [N, S, S, 3], got {data.shape}")


def load_imagenet32(
    path: PathLike, *, label_base: int = 1, class_names: Sequence[str] | None = None, num_classes: int = 1000,
) -> ImageDataset:
    """ImageNet-32 (Chrabaszcz et al. 2017 "downsampled ImageNet") from files (local or gs://...).

    Accepted layouts:
      - one `.npz` file, or a directory of `.npz` files read in natural order
        (train_data_batch_1, ..., train_data_batch_10; the official `Imagenet32_train_npz/` and
        `Imagenet32_val_npz/` folders each form one split). Each file holds
          `data`: uint8 [N, 3*S*S], channel-planar as distributed (S*S red values, then green, then
                  blue, each row-major), or uint8 [N, S, S, 3];
          `labels`: int [N]; the official files number classes from 1, hence `label_base=1`
                  (subtracted); pass label_base=0 for 0-based files. Other keys (`mean`) are ignored.
      - an image folder: `path/<class_name>/<image files>`; classes are the sorted sub-folder names,
        every image must be RGB-convertible and of one size (label_base does not apply).

    Args:
      class_names: names for the npz class ids (default "0".."num_classes-1").
    """
    path = epath.Path(path)
    if not path.exists():
        raise DatasetError(f"ImageNet-32 path not found: {path} (expected an .npz file or a directory)")
    if path.is_dir() and not _npz_files(path):
        return load_image_folder(path, name="imagenet32")
    if path.is_file() and path.suffix != ".npz":
        raise DatasetError(f"{path}: expected an .npz file (arrays 'data' and 'labels') or a directory")
    files = [path] if path.is_file() else _npz_files(path)
    images, labels = [], []
    for file in files:
        try:
            # Our own handle: np.load leaks the one it opens when the zip is corrupt.
            with file.open("rb") as handle, np.load(handle, allow_pickle=False) as npz:
                if "data" not in npz or "labels" not in npz:
                    raise DatasetError(f"{file}: expected arrays 'data' and 'labels', found {sorted(npz.files)}")
                data, lab = npz["data"], np.asarray(npz["labels"]).reshape(-1)
        except DatasetError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise DatasetError(f"{file}: not a readable .npz archive ({err})") from err
        if data.dtype != np.uint8:
            raise DatasetError(f"{file}: 'data' must be uint8, got {data.dtype}")
        img = _npz_images(data, file)
        if lab.shape[0] != img.shape[0] or not np.issubdtype(lab.dtype, np.integer):
            raise DatasetError(f"{file}: expected {img.shape[0]} integer labels, got {lab.dtype} {lab.shape}")
        lab = lab.astype(np.int64) - label_base
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise DatasetError(
                f"{file}: labels minus label_base={label_base} span [{lab.min()}, {lab.max()}], "
                f"expected [0, {num_classes})"
            )
        if images and img.shape[1:] != images[0].shape[1:]:
            raise DatasetError(f"{file}: images of shape {img.shape[1:]} differ from {images[0].shape[1:]}")
        images.append(img)
        labels.append(lab)
    names = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    return ImageDataset("imagenet32", np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), names)


def load_image_folder(root: PathLike, *, name: str = "image_folder") -> ImageDataset:
    """`root/<class_name>/*.{png,jpg,...}`: labels follow the sorted class folder names."""
    from PIL import Image, UnidentifiedImageError

    root = epath.Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise DatasetError(f"{root}: expected class sub-folders holding images (or .npz files)")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for file in sorted((root / cls).iterdir(), key=_natural_key):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(io.BytesIO(file.read_bytes())) as img:
                    arr = np.asarray(img.convert("RGB"))
            except (UnidentifiedImageError, OSError) as err:
                raise DatasetError(f"{file}: not a readable image ({err})") from err
            if images and arr.shape != images[0].shape:
                raise DatasetError(f"{file}: shape {arr.shape} differs from the first image's {images[0].shape}")
            images.append(arr)
            labels.append(label)
    if not images:
        raise DatasetError(f"{root}: no image files ({', '.join(_IMAGE_SUFFIXES)}) in the class folders")
    return ImageDataset(name, np.stack(images), np.asarray(labels, np.int64), tuple(classes))


# ---------------------------------------------------------------------------------------------------
# One entry point


def load_image_dataset(
    name: str, root: PathLike | None = None, split: str | None = None, *,
    size: int | tuple[int, int] | None = None, rgb: bool = False, resample: str = "bilinear",
) -> ImageDataset:
    """Dispatches to a reader, then `prepare`.

    name: "mnist" (root: the folder with the IDX files; split test|train), "cifar10" (root: the
    ConvNetJS folder; split train|test|all), "digits" (no root; the offline default), "imagenet32"
    (root: npz file, folder of npz files, or image folder).
    """
    if name == "mnist":
        ds = load_mnist(_need_root(name, root), split or "test")
    elif name in ("cifar10", "cifar10_convnetjs"):
        ds = load_cifar10_convnetjs(_need_root(name, root), split or "train")
    elif name == "digits":
        ds = load_digits()
    elif name == "imagenet32":
        ds = load_imagenet32(_need_root(name, root))
    else:
        raise ValueError(f"unknown image dataset {name!r}: mnist, cifar10, digits or imagenet32")
    if size is None and not rgb:
        return ds
    return prepare(ds, size=size, rgb=rgb, resample=resample)


def _need_root(name: str, root: PathLike | None) -> epath.Path:
    if root is None:
        raise ValueError(f"dataset {name!r} reads files: pass root=<folder> (local or an epath URI such as gs://...)")
    return epath.Path(root)


# ---------------------------------------------------------------------------------------------------
# TFDS (array_record) builders


def _tfds():
    import tensorflow_datasets as tfds

    return tfds


def _builder_config_name(size: int | tuple[int, int] | None, rgb: bool) -> str:
    if size is None:
        shape = "native"
    else:
        h, w = (size, size) if isinstance(size, int) else size
        shape = f"{h}x{w}"
    return shape + ("_rgb" if rgb else "")


def _make_builder_class() -> type:
    """Defined lazily so importing this module does not import tensorflow_datasets."""
    tfds = _tfds()

    class LocalImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        """Array-record TFDS builder over an `ImageDataset` reader; one split per reader call.

        Unregistered on purpose (registration is global and would clash on re-import); read back
        through the builder, `tfds.builder_from_directory`, or `tfds.data_source(name, data_dir=...)`.
        """

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Local-file reader (idjax)."}

        def __init__(self, *, split_readers: dict[str, Callable[[], ImageDataset]],
                     image_shape: tuple[int, int, int], class_names: Sequence[str], **kwargs):
            self._split_readers = split_readers
            self._image_shape = tuple(image_shape)
            self._class_names = list(class_names)
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="Local image files read by experiments/image_datasets.py.",
                features=tfds.features.FeaturesDict({
                    # Raw uint8 tensor: the Image feature's PNG codec needs TensorFlow.
                    "image": tfds.features.Tensor(shape=self._image_shape, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=self._class_names),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }),
                supervised_keys=("image", "label"),
                disable_shuffling=True,  # keep reader order: source[i] is example i
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download: the readers open the files themselves
            return {split: self._generate_examples(reader) for split, reader in self._split_readers.items()}

        def _generate_examples(self, reader):
            ds = reader()
            if ds.image_shape != self._image_shape:
                raise DatasetError(f"{ds.name}: images of shape {ds.image_shape}, builder expects {self._image_shape}")
            for i in range(len(ds)):
                yield i, {"image": ds.images[i], "label": int(ds.labels[i]), "index": i}

    return LocalImageBuilder


# Native image shapes and splits of each source, needed before any file is read (TFDS _info).
_TFDS_SOURCES = {
    "mnist": ((28, 28, 1), MNIST_CLASSES, ("test", "train")),
    "cifar10": ((32, 32, 3), CIFAR10_CLASSES, ("train", "test")),
    "digits": ((8, 8, 1), MNIST_CLASSES, ("train",)),
    "imagenet32": ((32, 32, 3), tuple(str(i) for i in range(1000)), ("train",)),
}


def build_tfds(
    name: str, data_dir: PathLike, root: PathLike | None = None, *, splits: Sequence[str] | None = None,
    size: int | tuple[int, int] | None = None, rgb: bool = False, resample: str = "bilinear",
):
    """Prepares (once) a TFDS array_record dataset `idjax_<name>/<config>` under `data_dir`.

    Args:
      name: "mnist", "cifar10", "digits" or "imagenet32" (see `load_image_dataset`).
      root: the source folder or file, local or an epath URI (not needed for digits). For imagenet32 the one
        split is "train": point `root` at the split's npz file/folder and use a separate data_dir per split.
      splits: which splits to write (default: MNIST test, CIFAR train+test, digits train,
        ImageNet-32 train). A split's files must exist.
      size, rgb, resample: as `prepare_images`; they name the builder config, e.g. "16x16_rgb".

    Returns:
      The prepared `tfds.core.GeneratorBasedBuilder`; `.as_data_source(split)` gives an
      ArrayRecordDataSource whose items are {"image": uint8 [H, W, C], "label": int, "index": int}.
    """
    if name not in _TFDS_SOURCES:
        raise ValueError(f"unknown image dataset {name!r}: one of {sorted(_TFDS_SOURCES)}")
    tfds = _tfds()
    native, classes, known_splits = _TFDS_SOURCES[name]
    if splits is None:
        splits = {"mnist": ("test",), "cifar10": ("train", "test")}.get(name, known_splits)
    unknown = [s for s in splits if s not in known_splits]
    if unknown:
        raise ValueError(f"{name}: unknown splits {unknown}; known {known_splits}")
    h, w = native[:2] if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    shape = (h, w, 3 if rgb else native[2])

    def reader(split: str) -> Callable[[], ImageDataset]:
        return lambda: load_image_dataset(name, root, split if name != "imagenet32" else None,
                                          size=size, rgb=rgb, resample=resample)

    config = tfds.core.BuilderConfig(name=_builder_config_name(size, rgb))
    attrs = {"name": f"idjax_{name}", "BUILDER_CONFIGS": [config]}
    cls = types.new_class(f"Idjax{name.capitalize()}", (_make_builder_class(),), {"skip_registration": True},
                          lambda ns: ns.update(attrs))
    builder = cls(
        split_readers={s: reader(s) for s in splits},
        image_shape=shape,
        class_names=classes,
        data_dir=os.fspath(data_dir),
        config=config.name,
        file_format="array_record",
    )
    builder.download_and_prepare()
    return builder


def tfds_data_source(name: str, split: str, data_dir: PathLike, root: PathLike | None = None, **kwargs):
    """`build_tfds(...).as_data_source(split)`: random access (`len`, `[i]`) without TensorFlow.

    A dataset already prepared under `data_dir` (same name and config) is reused as it is: if it was
    prepared without `split`, this fails; use another data_dir or prepare all splits at once.
    """
    defaults = {"mnist": ("test",), "cifar10": ("train", "test")}.get(name, (split,))
    kwargs.setdefault("splits", tuple(dict.fromkeys((*defaults, split))))
    builder = build_tfds(name, data_dir, root, **kwargs)
    if split not in builder.info.splits:
        raise DatasetError(
            f"{builder.data_dir}: prepared without split {split!r} (has {sorted(builder.info.splits)}); "
            "use another data_dir or pass every split to build_tfds at once"
        )
    return builder.as_data_source(split)
