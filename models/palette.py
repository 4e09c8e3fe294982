"""Colour palettes for iGPT: load the published clusters, or fit one with k-means; quantize images.

Conventions (HF `ImageGPTImageProcessor`, OpenAI image-gpt): a palette is float32 [K, 3] in the
[-1, 1] pixel space, i.e. pixel/127.5 - 1; a pixel's token is the index of its nearest cluster
(squared Euclidean distance, ties to the lowest index); tokens run in raster order; de-quantization
is rint(127.5 * (c + 1)).

A pretrained checkpoint's colour ids mean the colours of the clusters it was trained with: a HF
ImageGPT directory carries them as `clusters` in its `preprocessor_config.json` (OpenAI's release as
`kmeans_centers.npy`); `checkpoint_palette` finds them. `fit_palette` fits a palette with k-means for a
model trained here or from random init (any size, e.g. 16 or 512).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from experiments.files import atomic_save_npy

PathLike = str | os.PathLike

PREPROCESSOR_CONFIG = "preprocessor_config.json"
KMEANS_CENTERS = "kmeans_centers.npy"
_CHUNK = 8192  # points per distance block: [8192, 512] float32 = 16 MiB
_PIECE = 256 * _CHUNK  # pixels per quantize call (2**21)


class PaletteError(ValueError):
    """A palette file is missing or does not hold a [K, 3] array in [-1, 1]."""


def _validate(palette: np.ndarray, source: str) -> np.ndarray:
    palette = np.asarray(palette, dtype=np.float32)
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.shape[0] < 1:
        raise PaletteError(f"{source}: expected a [K, 3] colour palette, got shape {palette.shape}")
    if not np.all(np.isfinite(palette)):
        raise PaletteError(f"{source}: palette holds non-finite values")
    # A small tolerance: published centres are k-means means of values in [-1, 1].
    if palette.min() < -1.0 - 1e-3 or palette.max() > 1.0 + 1e-3:
        raise PaletteError(
            f"{source}: palette values span [{palette.min():.3f}, {palette.max():.3f}], expected the [-1, 1] "
            "pixel space (pixel/127.5 - 1); a 0..255 palette must be converted first"
        )
    return palette


def load_palette(path: PathLike) -> np.ndarray:
    """Loads a palette: float32 [K, 3] in [-1, 1].

    `path` (local or any `etils.epath` URI, e.g. gs://) is a HF `preprocessor_config.json` (key `clusters`),
    an `.npy` file (OpenAI's `kmeans_centers.npy` or one written by `save_palette`), or a directory holding
    either (the JSON is preferred).
    """
    path = epath.Path(path)
    if path.is_dir():
        for name in (PREPROCESSOR_CONFIG, KMEANS_CENTERS):
            if (path / name).is_file():
                return load_palette(path / name)
        raise PaletteError(f"{path}: directory holds neither {PREPROCESSOR_CONFIG} nor {KMEANS_CENTERS}")
    if not path.is_file():
        raise PaletteError(f"palette file not found: {path}")
    if path.suffix == ".json":
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise PaletteError(f"{path} is not valid JSON: {err}") from err
        if not isinstance(config, dict) or config.get("clusters") is None:
            raise PaletteError(f"{path}: no 'clusters' entry (expected a [K, 3] list, e.g. 512 x 3)")
        return _validate(np.asarray(config["clusters"], dtype=np.float32), str(path))
    if path.suffix == ".npy":
        try:
            with path.open("rb") as f:
                array = np.load(f, allow_pickle=False)
        except (ValueError, OSError) as err:
            raise PaletteError(f"{path}: not a readable .npy array ({err})") from err
        return _validate(array, str(path))
    raise PaletteError(f"{path}: expected a .json (HF preprocessor config) or .npy palette")


def checkpoint_palette(directory: PathLike) -> epath.Path | None:
    """The file holding a checkpoint directory's own colour clusters: its `preprocessor_config.json`
    if that has `clusters`, else its `kmeans_centers.npy`; None when it has neither."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return None
    config = directory / PREPROCESSOR_CONFIG
    if config.is_file():
        try:
            has_clusters = json.loads(config.read_text()).get("clusters") is not None
        except (json.JSONDecodeError, AttributeError) as err:
            raise PaletteError(f"{config} is not a valid preprocessor config ({err})") from err
        if has_clusters:
            return config
    centers = directory / KMEANS_CENTERS
    return centers if centers.is_file() else None


def palette_digest(palette: np.ndarray) -> str:
    """A short content hash of a palette (its float32 values), to record which colours were used."""
    palette = np.ascontiguousarray(palette, dtype=np.float32)
    return hashlib.sha256(repr(palette.shape).encode() + palette.tobytes()).hexdigest()[:16]


def save_palette(path: PathLike, palette: np.ndarray) -> epath.Path:
    """Writes the palette as float32 .npy (atomically); returns the path written."""
    path = epath.Path(path)
    if path.suffix != ".npy":
        path = path.with_suffix(".npy")
    palette = _validate(palette, "palette to save")
    atomic_save_npy(path, palette)
    return path


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 in [-1, 1] (HF: rescale 1/255, normalize mean 0.5 std 0.5)."""
    return np.asarray(pixels, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def _rgb_pixels(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    if images.ndim < 2 or images.shape[-1] != 3:
        raise ValueError(
            f"expected RGB images [..., 3], got shape {images.shape}; convert grayscale first "
            "(experiments.image_datasets.prepare_images(rgb=True))"
        )
    return images.reshape(-1, 3)


# ---------------------------------------------------------------------------------------------------
# Nearest-cluster assignment (shared by k-means and quantize)


def _sq_dist(points: jax.Array, centers: jax.Array) -> jax.Array:
    """[P, 3], [K, 3] -> [P, K] summed per-channel squared differences.

    Exact (no ‖x‖² - 2x·c + ‖c‖² cancellation) and written channel by channel so XLA fuses it into
    one elementwise pass instead of materializing [P, K, 3].
    """
    d = (points[:, None, 0] - centers[None, :, 0]) ** 2
    d = d + (points[:, None, 1] - centers[None, :, 1]) ** 2
    return d + (points[:, None, 2] - centers[None, :, 2]) ** 2


def _argmin_rows(d: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row-wise (first argmin, min) of [P, K]; ties go to the lowest index, like numpy/torch argmin.

    jnp.argmin lowers to a variadic reduce that is ~20x slower on XLA:CPU; a float min, then the
    smallest column index attaining it (as float32: exact for K < 2**24), vectorizes.
    """
    best = jnp.min(d, axis=-1, keepdims=True)
    cols = jnp.arange(d.shape[-1], dtype=jnp.float32)
    ids = jnp.min(jnp.where(d == best, cols, jnp.float32(d.shape[-1])), axis=-1)
    return ids.astype(jnp.int32), best[:, 0]


def _assign(points: jax.Array, centers: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest centre per point, in fixed-size blocks so [P, K] is never materialized.

    points: [P, 3] with P a multiple of _CHUNK. Returns (int32 [P] ids, float32 [P] squared distances).
    """
    ids, dist = jax.lax.map(lambda block: _argmin_rows(_sq_dist(block, centers)), points.reshape(-1, _CHUNK, 3))
    return ids.reshape(-1), dist.reshape(-1)


def _pad_to_chunk(x: np.ndarray, fill: float = 0.0) -> tuple[np.ndarray, int]:
    n = x.shape[0]
    padded = -(-max(n, 1) // _CHUNK) * _CHUNK
    if padded == n:
        return x, n
    pad = np.full((padded - n,) + x.shape[1:], fill, dtype=x.dtype)
    return np.concatenate([x, pad]), n


@jax.jit
def _quantize_points(points: jax.Array, palette: jax.Array) -> jax.Array:
    return _assign(points, palette)[0]


def quantize(images: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Maps every pixel to its nearest palette colour.

    Args:
      images: uint8 [N, H, W, 3] (or [H, W, 3] for one image).
      palette: float32 [K, 3] in [-1, 1].

    Returns:
      int32 [N, H*W] cluster ids in raster order (row-major, as iGPT reads them); [H*W] for one image.
    """
    images = np.asarray(images)
    single = images.ndim == 3
    batch = images[None] if single else images
    if batch.ndim != 4:
        raise ValueError(f"expected uint8 [N, H, W, 3] images, got shape {images.shape}")
    pixels = _rgb_pixels(batch)
    centers = jnp.asarray(_validate(palette, "palette"))
    ids = np.empty(pixels.shape[0], np.int32)
    # Pieces of at most _PIECE pixels bound host and device memory (ImageNet-32 has 1.3e9 pixels);
    # every full piece has one shape, so this compiles at most twice.
    for start in range(0, pixels.shape[0], _PIECE):
        points, n = _pad_to_chunk(to_unit_range(pixels[start : start + _PIECE]))
        ids[start : start + n] = np.asarray(_quantize_points(jnp.asarray(points), centers))[:n]
    tokens = ids.reshape(batch.shape[0], -1)
    return tokens[0] if single else tokens


def dequantize(tokens: np.ndarray, palette: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Cluster ids -> uint8 RGB pixels, rint(127.5 * (c + 1)) as HF's sampling example does.

    Args:
      tokens: int [N, T] (or [T]) ids in [0, K).
      palette: float32 [K, 3].
      shape: (H, W) with H*W = T; default: square side sqrt(T).

    Returns:
      uint8 [N, H, W, 3] (or [H, W, 3]).
    """
    tokens = np.asarray(tokens)
    palette = _validate(palette, "palette")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= len(palette)):
        raise ValueError(f"token ids span [{tokens.min()}, {tokens.max()}], palette has {len(palette)} colours")
    t = tokens.shape[-1]
    if shape is None:
        side = int(round(t**0.5))
        if side * side != t:
            raise ValueError(f"{t} tokens are not a square image; pass shape=(H, W)")
        shape = (side, side)
    if shape[0] * shape[1] != t:
        raise ValueError(f"shape {shape} does not hold {t} tokens")
    colours = np.clip(np.rint(127.5 * (palette.astype(np.float64) + 1.0)), 0, 255).astype(np.uint8)
    return colours[tokens].reshape(tokens.shape[:-1] + tuple(shape) + (3,))


# ---------------------------------------------------------------------------------------------------
# k-means


@functools.partial(jax.jit, static_argnames=("k",))
def _kmeans_pp_init(points: jax.Array, weights: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """Greedy weighted k-means++ seeding (as scikit-learn) on distinct [P, 3] points.

    Each step draws 2 + ln(k) candidates with probability ∝ w·D² and keeps the one that lowers the
    potential Σ w·D² most; plain k-means++ lands in visibly worse local optima on pixel data.
    """
    trials = 2 + int(np.log(k))

    def d2_to(c):  # [..., 3] -> [..., P]
        return sum((points[:, j] - c[..., j, None]) ** 2 for j in range(3))

    def draw(key, score, n):
        # Inverse-CDF draws; chosen points have score 0 so they are not drawn again while any
        # other point has mass (fit_palette guarantees P > k distinct points).
        cdf = jnp.cumsum(score)
        u = jax.random.uniform(key, (n,), dtype=cdf.dtype) * cdf[-1]
        return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), points.shape[0] - 1)

    key, sub = jax.random.split(key)
    first = points[draw(sub, weights, 1)[0]]
    centers = jnp.zeros((k, 3), points.dtype).at[0].set(first)

    def body(i, carry):
        centers, d2, key = carry
        key, sub = jax.random.split(key)
        candidates = points[draw(sub, weights * d2, trials)]  # [trials, 3]
        new_d2 = jnp.minimum(d2[None], d2_to(candidates))  # [trials, P]
        best = jnp.argmin((new_d2 * weights[None]).sum(-1))
        return centers.at[i].set(candidates[best]), new_d2[best], key

    centers, _, _ = jax.lax.fori_loop(1, k, body, (centers, d2_to(first), key))
    return centers


@functools.partial(jax.jit, static_argnames=("n_iter",))
def _lloyd(
    points: jax.Array, weights: jax.Array, centers: jax.Array, n_iter: int, tol: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Weighted Lloyd iterations.

    Stops like scikit-learn: when the summed squared centre shift is <= tol * (mean per-channel
    variance of the data), or after n_iter. points: [P, 3] (P a multiple of _CHUNK; padding has
    weight 0). Returns (centers, inertia of the returned centers' last assignment, iterations).
    """
    k = centers.shape[0]
    total = weights.sum()
    mean = (points * weights[:, None]).sum(0) / total
    threshold = tol * jnp.mean(((points - mean) ** 2 * weights[:, None]).sum(0) / total)

    def step(centers):
        ids, dist = _assign(points, centers)
        sums = jax.ops.segment_sum(points * weights[:, None], ids, num_segments=k)
        counts = jax.ops.segment_sum(weights, ids, num_segments=k)
        means = sums / jnp.maximum(counts, 1e-30)[:, None]
        # An empty cluster moves to one of the points farthest from their centres (as scikit-learn
        # does), so no palette entry is wasted.
        empty = counts <= 0
        far = jax.lax.top_k(jnp.where(weights > 0, dist, -1.0), k)[1]
        relocated = points[far[jnp.cumsum(empty) - 1]]
        new = jnp.where(empty[:, None], relocated, means)
        return new, jnp.sum(weights * dist)

    def cond(carry):
        _, _, shift, i = carry
        return (i < n_iter) & (shift > threshold)

    def body(carry):
        centers, _, _, i = carry
        new, inertia = step(centers)
        return new, inertia, jnp.sum((new - centers) ** 2), i + 1

    init = (centers, jnp.float32(jnp.inf), jnp.float32(jnp.inf), jnp.int32(0))
    centers, inertia, _, iters = jax.lax.while_loop(cond, body, init)
    return centers, inertia, iters


def fit_palette(
    images: np.ndarray,
    n_colors: int = 512,
    *,
    seed: int = 0,
    max_pixels: int = 1_000_000,
    n_iter: int = 300,
    tol: float = 1e-4,
    init_sample: int = 32768,
) -> np.ndarray:
    """Fits a colour palette with k-means (k-means++ seeding, jit-compiled Lloyd iterations).

    The objective is the usual pixel-level one: k-means runs on the distinct colours weighted by
    their pixel counts, which is exact and much smaller than the pixel list.

    Args:
      images: uint8 [..., 3] RGB pixels (e.g. [N, H, W, 3]).
      n_colors: palette size K (e.g. 16 or 512).
      seed: deterministic: same images and seed -> same palette.
      max_pixels: pixels drawn uniformly (without replacement, from `seed`) when there are more.
      n_iter, tol: Lloyd stops after n_iter iterations, or once the summed squared centre shift is
        <= tol x the data's mean per-channel variance (scikit-learn's rule and default tol).
      init_sample: k-means++ seeds on the colours of this many pixels drawn ∝ colour counts.

    Returns:
      float32 [n_colors, 3] in [-1, 1], sorted by luminance so the ids are independent of seeding
      order. With fewer distinct colours than n_colors, the palette holds every distinct colour
      (quantization is then exact) and the remaining slots repeat colours (those ids go unused).
    """
    if n_colors < 1:
        raise ValueError(f"n_colors must be >= 1, got {n_colors}")
    pixels = _rgb_pixels(images)
    if pixels.shape[0] == 0:
        raise ValueError("no pixels to fit a palette on")
    rng = np.random.default_rng(seed)
    if pixels.shape[0] > max_pixels:
        pixels = pixels[np.sort(rng.choice(pixels.shape[0], max_pixels, replace=False))]
    packed = (pixels[:, 0].astype(np.uint32) << 16) | (pixels[:, 1].astype(np.uint32) << 8) | pixels[:, 2]
    colours, counts = np.unique(packed, return_counts=True)
    rgb = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=-1).astype(np.uint8)
    points = to_unit_range(rgb)
    weights = counts.astype(np.float32)

    if len(points) <= n_colors:
        # Every distinct colour is its own cluster; pad with the most frequent colour.
        extra = np.repeat(points[np.argmax(weights)][None], n_colors - len(points), axis=0)
        return _sort_by_luminance(np.concatenate([points, extra]))

    padded, n = _pad_to_chunk(points)
    w = np.zeros(padded.shape[0], np.float32)
    w[:n] = weights
    seed_points, seed_weights = points, weights
    if len(points) > init_sample:
        # Seed on a count-proportional sample of the colours: k-means++ makes k sequential passes,
        # each over every candidate; the sample keeps that cheap. Its distinct colours, weighted by
        # multiplicity; topped up with unsampled colours if it has too few.
        drawn, mult = np.unique(rng.choice(len(points), init_sample, p=weights / weights.sum()), return_counts=True)
        if len(drawn) <= n_colors:
            rest = np.setdiff1d(np.arange(len(points)), drawn)[: 2 * n_colors]
            drawn, mult = np.concatenate([drawn, rest]), np.concatenate([mult, np.ones(len(rest), mult.dtype)])
        seed_points, seed_weights = points[drawn], mult.astype(np.float32)
    init = _kmeans_pp_init(jnp.asarray(seed_points), jnp.asarray(seed_weights), jax.random.key(seed), n_colors)
    centers, _, _ = _lloyd(jnp.asarray(padded), jnp.asarray(w), init, n_iter, tol)
    return _sort_by_luminance(np.clip(np.asarray(centers, np.float32), -1.0, 1.0))


def _sort_by_luminance(palette: np.ndarray) -> np.ndarray:
    # Rec. 601 luma, ties broken by R, G, B: a canonical order for a given set of colours.
    luma = palette @ np.array([0.299, 0.587, 0.114], np.float32)
    order = np.lexsort((palette[:, 2], palette[:, 1], palette[:, 0], luma))
    return np.ascontiguousarray(palette[order], dtype=np.float32)
