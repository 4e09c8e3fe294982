"""What each layer knows: per-layer linear probes, kNN-classifier accuracy and label overlap.

All entry points take pooled representations `reps` float [L+1, N, D] (one row per layer, as
`models.esm2.pooled_hidden_states` / `models.igpt.pooled_representations` return them) and labels
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
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import idjax
from experiments.files import atomic_write_json
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
    labels: np.ndarray, *, test_fraction: float = 0.25, seed: int = 0, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test split of N points.

    Args:
      labels: [N] labels (used only for stratification).
      test_fraction: share of points in the test split, in (0, 1).
      seed: the permutation seed; the same (labels, fraction, seed) always gives the same split.
      stratify: if True, each class is split separately (round(n_c * test_fraction) test points,
        never all of a class), so small classes appear on both sides when they have >= 2 members.

    Returns:
      (train_idx [N_train], test_idx [N_test]), sorted int64 index arrays.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    n = labels.shape[0]
    rng = np.random.default_rng(seed)
    if not stratify:
        perm = rng.permutation(n)
        n_test = max(1, int(round(n * test_fraction)))
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    codes, n_classes = _codes(labels, n)
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
# Probing trained models (workdirs written by experiments/train.py)


def esm2_representations(
    model: Any, params: Any, sequences: Sequence[str], *, max_residues: int, batch_size: int = 64,
    pooling: str = "mean",
) -> np.ndarray:
    """Pooled ESM-2 hidden states of protein sequences: float32 [L+1, N, D], rows in input order.

    Sequences longer than `max_residues` keep their first `max_residues` residues (for a model
    trained on crops of that length, longer inputs would reach rotary offsets it never saw).
    Batches are length-bucketed (padding to a multiple of 16 bounds the number of compilations).
    """
    from models import esm2
    from models import protein_tokenizer as ptok

    toks = [ptok.tokenize(s, seq_id=str(i), unknown="X", long_policy="crop", max_residues=max_residues)
            for i, s in enumerate(sequences)]
    out = None
    for batch in ptok.length_bucketed_batches(toks, batch_size=batch_size, pad_to_multiple=16):
        pooled = np.asarray(esm2.pooled_hidden_states(model, params, batch.tokens, pooling=pooling))
        if out is None:
            out = np.zeros((pooled.shape[0], len(sequences), pooled.shape[-1]), np.float32)
        out[:, batch.source] = pooled
    return out


def igpt_representations(model: Any, params: Any, pixels: np.ndarray, *, batch_size: int = 128,
                         stream: str = "paper") -> np.ndarray:
    """Pooled iGPT representations of quantized images int [N, T]: float32 [L+1, N, D] (start token
    prepended; the last batch is padded with copies and trimmed)."""
    from models import igpt

    n = len(pixels)
    chunks = []
    for start in range(0, n, batch_size):
        rows = pixels[start : start + batch_size]
        pad = batch_size - len(rows)
        if pad:  # one shape, one compilation
            rows = np.concatenate([rows, np.repeat(rows[:1], pad, axis=0)])
        tokens = igpt.add_start_token(np.asarray(rows, np.int32), model.config.start_token)
        pooled = np.asarray(igpt.pooled_representations(model, params, tokens, stream=stream))
        chunks.append(pooled[:, : batch_size - pad])
    return np.concatenate(chunks, axis=1)


def aa_composition(sequences: Sequence[str]) -> np.ndarray:
    """Amino-acid composition baseline: float32 [N, 20], fractions of the 20 standard residues."""
    letters = "ACDEFGHIKLMNPQRSTVWY"
    table = np.full(256, -1, np.int64)
    table[np.frombuffer(letters.encode(), np.uint8)] = np.arange(20)
    out = np.zeros((len(sequences), 20), np.float32)
    for i, s in enumerate(sequences):
        codes = table[np.frombuffer(s.upper().encode(), np.uint8)]
        codes = codes[codes >= 0]
        out[i] = np.bincount(codes, minlength=20) / max(len(codes), 1)
    return out


def _all_scores(reps: np.ndarray, labels: np.ndarray, *, k: int, train_idx=None, test_idx=None,
                probe_steps: int = 300, seed: int = 0) -> dict[str, list[float]]:
    lin = linear_probe_accuracy(reps, labels, train_idx=train_idx, test_idx=test_idx, steps=probe_steps, seed=seed)
    knn = knn_accuracy(reps, labels, k=k, train_idx=train_idx, test_idx=test_idx, seed=seed)
    overlap = label_overlap_per_layer(reps, labels, k)
    return {"linear_probe": lin.tolist(), "knn_accuracy": knn.tolist(), "label_overlap": overlap.tolist()}


def probe_esm2_on_scope(
    workdir: pathlib.Path | str, scope_fasta: pathlib.Path | str, *, classes: str = "abcd",
    min_superfamily_members: int = 20, k: int = 10, max_residues: int | None = None,
    probe_steps: int = 300, seed: int = 0, baseline_untrained: bool = True,
) -> dict:
    """Per-layer probes of a trained ESM-2 workdir on SCOPe (ASTRAL 40%) domains.

    Tasks (each a list over layers 0..L):
      class: SCOPe classes `classes` (default a-d, the four main ones), every such domain; linear
        probe and kNN accuracy on a seeded stratified 75/25 split, plus label overlap.
      superfamily_remote: superfamilies with >= 2 families and >= `min_superfamily_members` domains;
        leave-one-out kNN accuracy and superfamily overlap with SAME-FAMILY NEIGHBOURS EXCLUDED, and,
        for contrast, the same without exclusion.
    Baselines: amino-acid composition (20 features) and, if `baseline_untrained`, the same
    architecture at its random initialisation (train seed).
    """
    from experiments import protein_datasets, train

    t0 = time.perf_counter()
    model, params, config = train.load_trained(workdir)
    max_residues = max_residues or int(config.data.max_residues)
    ds = protein_datasets.read_scope_astral(scope_fasta)
    names = ds.label_names["class"]
    wanted = [names.index(c) for c in classes]
    cls_idx = np.flatnonzero(np.isin(ds.labels["class"], wanted))
    sf_all, fam_all = ds.labels["superfamily"], ds.labels["family"]
    rh_idx = remote_homology_subset(sf_all, fam_all, min_groups=2, min_members=min_superfamily_members)
    needed = np.union1d(cls_idx, rh_idx)
    seqs = [ds.sequences[i] for i in needed]
    pos = {int(j): i for i, j in enumerate(needed)}
    cls_rows, rh_rows = np.array([pos[i] for i in cls_idx]), np.array([pos[i] for i in rh_idx])

    def evaluate_reps(reps: np.ndarray) -> dict:
        cls_labels = ds.labels["class"][cls_idx]
        tr, te = split_indices(cls_labels, test_fraction=0.25, seed=seed)
        out = {"class": _all_scores(reps[:, cls_rows], cls_labels, k=k, train_idx=tr, test_idx=te,
                                    probe_steps=probe_steps, seed=seed)}
        rh = reps[:, rh_rows]
        sf, fam = sf_all[rh_idx], fam_all[rh_idx]
        out["superfamily_remote"] = {
            "knn_accuracy_family_excluded": knn_accuracy(rh, sf, k=k, groups=fam, test_fraction=None).tolist(),
            "overlap_family_excluded": label_overlap_per_layer(rh, sf, k, fam).tolist(),
            "knn_accuracy_all_neighbours": knn_accuracy(rh, sf, k=k, test_fraction=None).tolist(),
            "overlap_all_neighbours": label_overlap_per_layer(rh, sf, k).tolist(),
        }
        return out

    t_extract = time.perf_counter()
    reps = esm2_representations(model, params, seqs, max_residues=max_residues)
    extract_s = time.perf_counter() - t_extract
    result = {
        "workdir": str(workdir), "scope_fasta": str(scope_fasta), "classes": classes, "k": k,
        "max_residues": max_residues, "n_class_domains": int(len(cls_idx)),
        "class_counts": np.bincount(ds.labels["class"][cls_idx], minlength=len(names))[wanted].tolist(),
        "n_remote_domains": int(len(rh_idx)), "n_superfamilies": int(np.unique(sf_all[rh_idx]).size),
        "n_families": int(np.unique(fam_all[rh_idx]).size), "trained": evaluate_reps(reps),
        "extract_s": extract_s,
    }
    comp = aa_composition(seqs)[None]
    result["aa_composition"] = evaluate_reps(comp)
    if baseline_untrained:
        from experiments.train import init_params

        init = init_params(model.config, int(config.seed))
        result["untrained"] = evaluate_reps(esm2_representations(model, init, seqs, max_residues=max_residues))
    result["wall_time_s"] = time.perf_counter() - t0
    return result


def probe_igpt_on_heldout(workdir: pathlib.Path | str, *, k: int = 10, probe_steps: int = 300,
                          seed: int = 0, baseline_untrained: bool = True, stream: str = "paper") -> dict:
    """Per-layer probes of a trained iGPT workdir: fit on the training-split images, score on the
    held-out split the model never trained on (linear probe and kNN), label overlap on the held-out
    split. Baselines: raw palette ids as features ("pixels") and the untrained model."""
    from experiments import train
    from models import palette as palette_lib

    t0 = time.perf_counter()
    model, params, config = train.load_trained(workdir)
    pal = palette_lib.load_palette(pathlib.Path(workdir) / "palette.npy")
    train_ds, val_ds = train.load_image_splits(config.data)
    pixels = np.concatenate([palette_lib.quantize(train_ds.images, pal), palette_lib.quantize(val_ds.images, pal)])
    labels = np.concatenate([train_ds.labels, val_ds.labels])
    tr = np.arange(len(train_ds))
    te = np.arange(len(train_ds), len(labels))

    def evaluate_reps(reps: np.ndarray) -> dict:
        scores = _all_scores(reps, labels, k=k, train_idx=tr, test_idx=te, probe_steps=probe_steps, seed=seed)
        scores["label_overlap"] = label_overlap_per_layer(reps[:, te], labels[te], k).tolist()
        return scores

    t_extract = time.perf_counter()
    reps = igpt_representations(model, params, pixels, stream=stream)
    result = {"workdir": str(workdir), "dataset": config.data.name, "stream": stream, "k": k,
              "n_train": int(len(tr)), "n_test": int(len(te)), "trained": evaluate_reps(reps),
              "extract_s": time.perf_counter() - t_extract}
    gray = palette_lib.dequantize(pixels, pal, shape=tuple(train_ds.images.shape[1:3]))[..., 0]
    result["pixels"] = evaluate_reps(gray.reshape(len(labels), -1).astype(np.float32)[None])
    if baseline_untrained:
        from experiments.train import init_params

        init = init_params(model.config, int(config.seed))
        result["untrained"] = evaluate_reps(igpt_representations(model, init, pixels, stream=stream))
    result["wall_time_s"] = time.perf_counter() - t0
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m experiments.probe --workdir DIR [--scope FASTA]`: probes every layer of a trained
    model (ESM-2: on SCOPe; iGPT: on its held-out images) and writes DIR/probe_results.json."""
    import argparse
    import json

    from experiments import train

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--workdir", required=True, type=pathlib.Path)
    parser.add_argument("--scope", type=pathlib.Path, help="SCOPe ASTRAL FASTA (ESM-2 only)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--classes", default="abcd")
    parser.add_argument("--min-superfamily-members", type=int, default=20)
    parser.add_argument("--probe-steps", type=int, default=300)
    args = parser.parse_args(argv)
    family = train.load_config(args.workdir).model.family
    if family == "esm2":
        if args.scope is None:
            parser.error("--scope is required for an ESM-2 workdir")
        result = probe_esm2_on_scope(args.workdir, args.scope, classes=args.classes, k=args.k,
                                     min_superfamily_members=args.min_superfamily_members,
                                     probe_steps=args.probe_steps)
    else:
        result = probe_igpt_on_heldout(args.workdir, k=args.k, probe_steps=args.probe_steps)
    out = args.workdir / "probe_results.json"
    atomic_write_json(out, result, checksum=True)
    if family == "esm2":
        t, rh = result["trained"], result["trained"]["superfamily_remote"]
        curves = {
            "class: linear probe": t["class"]["linear_probe"], "class: kNN": t["class"]["knn_accuracy"],
            "superfamily kNN, family excluded": rh["knn_accuracy_family_excluded"],
            "superfamily kNN, all neighbours": rh["knn_accuracy_all_neighbours"],
            "class: linear probe, untrained": result.get("untrained", {}).get("class", {}).get("linear_probe", []),
            "class: linear probe, AA composition": result["aa_composition"]["class"]["linear_probe"],
        }
    else:
        t = result["trained"]
        curves = {"linear probe": t["linear_probe"], "kNN": t["knn_accuracy"],
                  "linear probe, untrained": result.get("untrained", {}).get("linear_probe", []),
                  "linear probe, pixels": result["pixels"]["linear_probe"]}
    plot_layer_scores({k: v for k, v in curves.items() if len(v)}, args.workdir / "probe_layers.png",
                      title=f"{args.workdir.name}: per-layer probes (k={args.k})")
    print(json.dumps({k: v for k, v in result.items() if k in ("trained", "wall_time_s")}, indent=1))
    return result


def plot_layer_scores(curves: dict[str, Sequence[float]], out: pathlib.Path | str, *, title: str = "",
                      ylabel: str = "accuracy") -> pathlib.Path:
    """One line per named per-layer score list (x = layer 0..L) -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, ys in curves.items():
        ys = list(ys)
        if len(ys) == 1:  # a baseline with one "layer": a horizontal line
            ax.axhline(ys[0], ls="--", lw=1, color="gray", label=name)
        else:
            ax.plot(range(len(ys)), ys, "o-", ms=3, label=name)
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = pathlib.Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
