"""What each layer knows: per-layer linear probes, kNN-classifier accuracy and label overlap.

`probe_layers` runs every probe of one labelled point set; the pipeline's probe step
(`experiments/profile.py`) and the probe study (`experiments/probe_study.py`) both call it.
All functions take pooled representations `reps` float [L+1, N, D] (one row per layer, as
`models.esm2.pooled_hidden_states` / `models.igpt.pooled_hidden_states` return them) and labels
[N], and return one score per layer (numpy [L+1]).

Remote homology (SCOPe). With `groups` (e.g. family labels) given, a neighbour in the same group as
the query is never counted: a superfamily "hit" must then come from another family, the paper's
remote-homology setting. Exclusion is exact, not "query a few more and hope": before searching we
count, for every query, how many reference points share its group (m_i), and ask the exact kNN for
k + max_i m_i neighbours; after dropping the same-group ones at least k remain for every query, and
they are the k nearest points outside the query's group. Queries whose label occurs only inside their
own group cannot be predicted; `remote_homology_subset` selects the points for which it is possible.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import idjax
from idjax import validation

# ---------------------------------------------------------------------------------------------------
# Splits and preprocessing


def _codes(labels: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Integer label codes 0..C-1 (checked by `idjax.validation.as_labels`) and the class count C."""
    codes = validation.as_labels(labels, n)
    return codes, int(codes.max()) + 1 if n else 0


class LayerRows(Sequence):
    """Layers read one at a time: `layers[i][rows]` as float32, for representations too big to stack.

    layers: L+1 arrays (N, D), e.g. the store's memory-mapped layer files; rows: indices into N (all
    rows if None). Probing (L+1, 90k, 2560) this way holds one layer (or one chunk of layers), not 34 GB.
    """

    def __init__(self, layers: Sequence[np.ndarray], rows: np.ndarray | None = None):
        self.layers, self.rows = layers, rows

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> np.ndarray:
        layer = np.asarray(self.layers[i], np.float32)
        return layer if self.rows is None else layer[self.rows]

    def take_rows(self, rows: np.ndarray) -> LayerRows:
        """The same layers restricted to `rows` (indices into this view's rows)."""
        return LayerRows(self.layers, rows if self.rows is None else self.rows[rows])

    @property
    def layer_shape(self) -> tuple[int, int]:
        """(rows, D) of each layer in this view, without reading one."""
        n, dim = np.shape(self.layers[0])
        return (n if self.rows is None else len(self.rows)), dim


Reps = np.ndarray | jax.Array | Sequence[np.ndarray]


def _as_layers(reps: Reps) -> Sequence[np.ndarray]:
    """[L+1, N, D] reps (an array, or a sequence of (N, D) layers) as something indexed by layer, shapes checked."""
    if isinstance(reps, LayerRows):
        return reps
    if isinstance(reps, list | tuple):
        shapes = {np.shape(x) for x in reps}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"reps must be L+1 >= 1 layers of one (N, D) shape; got shapes {sorted(shapes)}")
        return reps
    if np.ndim(reps) != 3:
        raise ValueError(f"reps must be [L+1, N, D] (layers, points, features); got shape {np.shape(reps)}")
    return reps


def _layer(layers: Sequence[np.ndarray], i: int) -> np.ndarray:
    """Layer i as float32, refused with its index if it holds NaN/inf."""
    x = np.asarray(layers[i], np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"reps contains NaN/inf (layer {i})")
    return x


def _layer_shape(layers: Sequence[np.ndarray]) -> tuple[int, int]:
    if isinstance(layers, LayerRows):
        return layers.layer_shape
    n, dim = np.shape(layers[0])
    return int(n), int(dim)


def split_indices(
    labels: np.ndarray | int, *, test_fraction: float = 0.25, seed: int = 0, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test (or train/held-out) split of N points: the one split of probes and training data.

    Args:
      labels: [N] labels (used only for stratification), or N itself for an unlabelled split.
      test_fraction: share of points in the test split, in (0, 1).
      seed: the permutation seed; the same (labels, fraction, seed) always gives the same split.
      stratify: if True, each class is split separately (round(n_c * test_fraction) test points,
        never all of a class), so small classes appear on both sides when they have >= 2 members.
        Without stratification the test split is the first max(1, round(N * test_fraction)) points
        of one seeded permutation.

    Returns:
      (train_idx [N_train], test_idx [N_test]), sorted int64 index arrays.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    unlabelled = isinstance(labels, (int, np.integer))
    if unlabelled and stratify:
        raise ValueError("a stratified split needs labels, not a point count; pass stratify=False")
    n = int(labels) if unlabelled else np.shape(labels)[0]
    rng = np.random.default_rng(seed)
    if not stratify:
        perm = rng.permutation(n)
        n_test = max(1, int(round(n * test_fraction)))
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    codes, n_classes = _codes(np.asarray(labels), n)
    test = []
    for c in range(n_classes):
        members = rng.permutation(np.flatnonzero(codes == c))
        n_test = int(round(len(members) * test_fraction))
        n_test = min(n_test, len(members) - 1)  # keep at least one training example per class
        test.append(members[:n_test])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train_mask = np.ones(n, bool)
    train_mask[test_idx] = False
    if not test_idx.size:
        raise ValueError("the split left no test points; raise test_fraction or use more points")
    return np.flatnonzero(train_mask), test_idx


def standardize(train: np.ndarray, test: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per layer and feature, z-scores with the TRAINING mean/std (no test leakage).

    train: [L+1, N_train, D], test: [L+1, N_test, D] -> same shapes, float32. Constant features
    (std < eps) are centred only.
    """
    mean = train.mean(axis=1, keepdims=True)
    std = train.std(axis=1, keepdims=True)
    std = np.where(std < eps, 1.0, std)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Linear probes


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_probes(
    x_train: jax.Array,
    y_train: jax.Array,
    x_test: jax.Array,
    y_test: jax.Array,
    *,
    num_classes: int,
    steps: int,
    learning_rate: float,
    l2: float,
) -> jax.Array:
    """Softmax regression per layer, vmapped: [L, N, D] inputs -> [L] test accuracies."""

    def one_layer(xtr, xte):
        d = xtr.shape[-1]
        # Zero init: the problem is convex (with l2 > 0 strictly), so the result depends only on
        # the data, the split and the step budget, never on an init seed.
        params = {"w": jnp.zeros((d, num_classes), jnp.float32), "b": jnp.zeros((num_classes,), jnp.float32)}
        opt = optax.adam(learning_rate)

        def loss_fn(p):
            logits = xtr @ p["w"] + p["b"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()
            return ce + 0.5 * l2 * jnp.sum(p["w"] ** 2)

        def body(_, carry):
            p, s = carry
            grads = jax.grad(loss_fn)(p)
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s

        params, _ = jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))
        pred = jnp.argmax(xte @ params["w"] + params["b"], axis=-1)
        return jnp.mean(pred == y_test)

    return jax.vmap(one_layer)(x_train, x_test)


def linear_probe_accuracy(
    reps: Reps,
    labels: np.ndarray,
    *,
    test_fraction: float = 0.25,
    seed: int = 0,
    steps: int = 300,
    learning_rate: float = 0.05,
    l2: float = 1e-3,
    stratify: bool = True,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    max_layers_per_batch: int | None = None,
) -> np.ndarray:
    """Test accuracy of a multinomial logistic-regression probe on every layer.

    Features are standardized per layer with training-split statistics; every layer's probe is trained
    full-batch with Adam for exactly `steps` steps (a fixed budget, the same for every layer) on
    softmax cross-entropy + l2/2 * ||W||^2, all layers at once (vmap) in one jit-compiled loop.

    Args:
      reps: float [L+1, N, D] pooled representations, or a sequence of L+1 (N, D) layers (e.g. `LayerRows`
        over memory-mapped files), read a chunk of layers at a time.
      labels: [N] class labels (any hashable values).
      test_fraction, seed, stratify: the split (see `split_indices`); ignored if train_idx/test_idx given.
      steps, learning_rate, l2: the optimisation budget and ridge penalty.
      train_idx, test_idx: explicit split (int index arrays into N).
      max_layers_per_batch: train this many layers at a time (default: as many as fit in ~1 GiB).

    Returns:
      float64 [L+1] test accuracies in [0, 1].
    """
    layers = _as_layers(reps)
    n, dim = _layer_shape(layers)
    codes, n_classes = _codes(labels, n)
    if train_idx is None or test_idx is None:
        train_idx, test_idx = split_indices(codes, test_fraction=test_fraction, seed=seed, stratify=stratify)
    # Layers are trained a chunk at a time (vmapped within it); by default a chunk holds ~1 GiB of features.
    chunk = max_layers_per_batch or max(1, 2**30 // max(1, 4 * n * dim))
    accs = []
    for start in range(0, len(layers), chunk):
        stacked = np.stack([_layer(layers, i) for i in range(start, min(start + chunk, len(layers)))])
        xtr, xte = standardize(stacked[:, train_idx], stacked[:, test_idx])
        del stacked
        accs.append(np.asarray(_fit_probes(
            jnp.asarray(xtr), jnp.asarray(codes[train_idx]), jnp.asarray(xte), jnp.asarray(codes[test_idx]),
            num_classes=max(n_classes, 2), steps=int(steps), learning_rate=float(learning_rate), l2=float(l2),
        )))
    return np.concatenate(accs).astype(np.float64)


# ---------------------------------------------------------------------------------------------------
# Neighbours with same-group exclusion


def exclusion_margin(query_groups: np.ndarray, ref_groups: np.ndarray) -> int:
    """max over queries of the number of reference points in the query's group.

    Asking kNN for k + this many neighbours guarantees k survivors after same-group exclusion.
    (With ref = queries and self excluded this over-counts by one, which is harmless.)
    """
    _, inverse = np.unique(np.concatenate([query_groups, ref_groups]), return_inverse=True)
    inverse = inverse.ravel()
    q, r = inverse[: len(query_groups)], inverse[len(query_groups):]
    counts = np.bincount(r, minlength=int(inverse.max()) + 1)
    return int(counts[q].max()) if len(q) else 0


def drop_same_group(
    indices: np.ndarray, query_groups: np.ndarray, ref_groups: np.ndarray, k: int
) -> np.ndarray:
    """Keeps, per query row, the first k neighbours whose group differs from the query's.

    Args:
      indices: int [Nq, K'] neighbour indices into the reference set, nearest first.
      query_groups: [Nq] group of each query; ref_groups: [Nr] group of each reference point.
      k: neighbours to keep.

    Returns:
      int [Nq, k], still nearest first.

    Raises:
      ValueError if some row has fewer than k neighbours outside its group (ask for more columns,
      see `exclusion_margin`).
    """
    indices = np.asarray(indices)
    keep = np.asarray(ref_groups)[indices] != np.asarray(query_groups)[:, None]
    n_ok = keep.sum(axis=1)
    if (n_ok < k).any():
        bad = int(np.argmin(n_ok))
        raise ValueError(
            f"query {bad} has only {int(n_ok[bad])} of {indices.shape[1]} neighbours outside its group, "
            f"fewer than k={k}; search k + exclusion_margin(...) neighbours"
        )
    # A stable sort on "is excluded" moves kept neighbours to the front without changing their order.
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(indices, order, axis=1)


def neighbors_excluding_groups(
    x: np.ndarray | jax.Array,
    k: int,
    groups: np.ndarray | None = None,
    *,
    y: np.ndarray | jax.Array | None = None,
    y_groups: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the k nearest neighbours outside each query's group (exact).

    Args:
      x: float [Nq, D] queries.
      k: neighbours wanted.
      groups: [Nq] group of each query, or None for plain kNN.
      y: optional float [Nr, D] reference set (default: x itself, self excluded by index).
      y_groups: [Nr] groups of y (required with y and groups).

    Returns:
      int [Nq, k] indices into the reference set, nearest first.
    """
    if groups is None:
        return np.asarray(idjax.knn(x, k, y=y).indices)
    groups = np.asarray(groups)
    ref_groups = groups if y is None else np.asarray(y_groups)
    if y is not None and y_groups is None:
        raise ValueError("y_groups is required when both y and groups are given")
    n_ref = (x if y is None else y).shape[0] - (1 if y is None else 0)
    k_search = min(k + exclusion_margin(groups, ref_groups), n_ref)
    idx = np.asarray(idjax.knn(x, k_search, y=y).indices)
    return drop_same_group(idx, groups, ref_groups, k)


# ---------------------------------------------------------------------------------------------------
# kNN classifier and label overlap


def majority_vote(neighbor_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Majority class of each row of int [Nq, k] neighbour labels -> int [Nq].

    Ties are broken in favour of the tied class whose closest member is nearest (deterministic).
    """
    nq, k = neighbor_labels.shape
    counts = np.zeros((nq, num_classes), np.float64)
    np.add.at(counts, (np.repeat(np.arange(nq), k), neighbor_labels.ravel()), 1.0)
    # Bonus in (0, 1) that decreases with the rank of a class's first occurrence: never outweighs a vote.
    bonus = np.zeros((nq, num_classes), np.float64)
    for rank in range(k - 1, -1, -1):  # nearest rank written last, so it wins
        bonus[np.arange(nq), neighbor_labels[:, rank]] = (k - rank) / (k + 1)
    return np.argmax(counts + bonus, axis=1)


def knn_accuracy(
    reps: Reps,
    labels: np.ndarray,
    k: int = 10,
    groups: np.ndarray | None = None,
    *,
    test_fraction: float | None = 0.25,
    seed: int = 0,
    stratify: bool = True,
    train_idx: np.ndarray | None = None,
    test_idx: np.ndarray | None = None,
    standardize_features: bool = False,
) -> np.ndarray:
    """Accuracy of a k-nearest-neighbour majority-vote classifier on every layer (Euclidean, exact).

    Args:
      reps: float [L+1, N, D], or a sequence of L+1 (N, D) layers, read one at a time.
      labels: [N] class labels (e.g. SCOPe superfamilies).
      k: neighbours that vote.
      groups: optional [N] groups (e.g. SCOPe families): a training point in the query's group never
        votes (remote-homology mode; exact, see the module docstring).
      test_fraction: seeded split share (see `split_indices`); None = leave-one-out: every point is
        classified by all the others (self excluded by index).
      seed, stratify, train_idx, test_idx: the split.
      standardize_features: z-score each layer with training statistics first (default off, so the
        neighbourhoods are those of the raw geometry the ID/overlap analysis sees).

    Returns:
      float64 [L+1] accuracies in [0, 1].
    """
    layers = _as_layers(reps)
    n, _ = _layer_shape(layers)
    codes, n_classes = _codes(labels, n)
    groups = None if groups is None else np.asarray(groups)
    if groups is not None and groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
    loo = test_fraction is None and train_idx is None
    if not loo and (train_idx is None or test_idx is None):
        train_idx, test_idx = split_indices(codes, test_fraction=test_fraction, seed=seed, stratify=stratify)
    accs = []
    for layer in range(len(layers)):
        x = _layer(layers, layer)
        if loo:
            xq = x if not standardize_features else standardize(x[None], x[None])[0][0]
            idx = neighbors_excluding_groups(xq, k, groups)
            pred = majority_vote(codes[idx], n_classes)
            accs.append(np.mean(pred == codes))
            continue
        xtr, xte = x[train_idx], x[test_idx]
        if standardize_features:
            xtr, xte = (a[0] for a in standardize(xtr[None], xte[None]))
        idx = neighbors_excluding_groups(
            xte, k, None if groups is None else groups[test_idx], y=xtr,
            y_groups=None if groups is None else groups[train_idx],
        )
        pred = majority_vote(codes[train_idx][idx], n_classes)
        accs.append(np.mean(pred == codes[test_idx]))
    return np.asarray(accs, np.float64)


def label_overlap_excluding(
    x: np.ndarray | jax.Array, labels: np.ndarray, k: int, groups: np.ndarray | None = None,
    *, weighted: bool = False,
) -> float:
    """Label overlap of one representation: mean fraction of each point's k neighbours sharing its label.

    With `groups`, neighbours from the point's own group are skipped (the next nearest outside the
    group take their place), e.g. superfamily overlap with same-family neighbours excluded.

    Args:
      x: float [N, D]; labels, groups: [N]; k: neighbours; weighted: see `idjax.label_overlap`.
    """
    idx = neighbors_excluding_groups(x, k, groups)
    return idjax.label_overlap(idx, labels, k, weighted=weighted)


def label_overlap_per_layer(
    reps: Reps, labels: np.ndarray, k: int, groups: np.ndarray | None = None, *, weighted: bool = False,
) -> np.ndarray:
    """`label_overlap_excluding` on every layer of float [L+1, N, D] (or L+1 (N, D) layers) -> float64 [L+1]."""
    layers = _as_layers(reps)
    return np.asarray([label_overlap_excluding(_layer(layers, i), labels, k, groups, weighted=weighted)
                       for i in range(len(layers))])


def remote_homology_subset(
    labels: np.ndarray, groups: np.ndarray, *, min_groups: int = 2, min_members: int = 2
) -> np.ndarray:
    """Indices of the points whose label can be predicted with same-group neighbours excluded.

    Keeps a point if its label (e.g. superfamily) spans >= `min_groups` distinct groups (families) and
    has >= `min_members` points in total, so every kept point has same-label points outside its group.

    Returns:
      sorted int64 [N_kept] indices.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    keep = np.zeros(labels.shape[0], bool)
    for lab in np.unique(labels):
        members = labels == lab
        if members.sum() >= min_members and np.unique(groups[members]).size >= min_groups:
            keep |= members
    return np.flatnonzero(keep)


# ---------------------------------------------------------------------------------------------------
# The one entry point


def probe_layers(
    reps: Reps,
    labels: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
    linear: bool = True,
    knn_k: int | None = 10,
    overlap_k: int | None = None,
    steps: int = 300,
    seed: int = 0,
    test_fraction: float = 0.25,
) -> dict[str, np.ndarray]:
    """Every per-layer probe of one labelled point set: the pipeline's probe step and the probe study both
    call this.

    Args:
      reps: float [L+1, N, D], or L+1 (N, D) layers (e.g. `LayerRows` over a store's memory-mapped files).
      labels: [N] class labels.
      groups: [N] groups (e.g. SCOPe families): the kNN probe and the overlap never count a neighbour from
        the query's own group (remote homology).
      split: (train_idx, test_idx); both probes are fitted on the training points and scored on the test
        points. None: the linear probe uses a seeded stratified split (`test_fraction`, `seed`) and the
        kNN probe is leave-one-out over all points.
      linear: compute the linear probe ("linear_probe"; `steps` Adam steps).
      knn_k: neighbours of the kNN probe ("knn_accuracy"); None skips it.
      overlap_k: neighbours of the label overlap over all N points ("label_overlap"); None skips it.

    Returns:
      {name: float64 [L+1]} for the probes asked for.
    """
    train_idx, test_idx = (None, None) if split is None else split
    out = {}
    if linear:
        out["linear_probe"] = linear_probe_accuracy(reps, labels, train_idx=train_idx, test_idx=test_idx,
                                                    steps=steps, seed=seed, test_fraction=test_fraction)
    if knn_k is not None:
        out["knn_accuracy"] = knn_accuracy(reps, labels, k=knn_k, groups=groups, seed=seed, train_idx=train_idx,
                                           test_idx=test_idx, test_fraction=None if split is None else test_fraction)
    if overlap_k is not None:
        out["label_overlap"] = label_overlap_per_layer(reps, labels, overlap_k, groups)
    return out
