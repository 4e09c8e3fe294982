"""Probes: high accuracy on an obvious signal, chance on shuffled labels, exact same-group exclusion."""

from __future__ import annotations

import numpy as np
import pytest

import idjax
from experiments import probe


def _layers(n: int = 480, d: int = 16, n_classes: int = 4, seed: int = 0):
    """[3, N, D] reps: layer 0 pure noise, layer 1 a weak class signal, layer 2 an obvious one."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    means = rng.normal(size=(n_classes, d))
    noise = lambda: rng.normal(size=(n, d))
    reps = np.stack([noise(), 0.3 * means[labels] + noise(), 4.0 * means[labels] + noise()]).astype(np.float32)
    return reps, labels


def test_linear_probe_signal_and_chance():
    reps, labels = _layers()
    acc = probe.linear_probe_accuracy(reps, labels, steps=200)
    assert acc.shape == (3,)
    assert acc[2] > 0.97
    assert acc[0] < 0.4  # noise layer: chance is 0.25
    assert acc[0] < acc[1] < acc[2]
    shuffled = np.random.default_rng(1).permutation(labels)
    acc_shuffled = probe.linear_probe_accuracy(reps, shuffled, steps=200)
    assert np.all(np.abs(acc_shuffled - 0.25) < 0.12), acc_shuffled


def test_knn_accuracy_signal_and_chance():
    reps, labels = _layers()
    acc = probe.knn_accuracy(reps, labels, k=10)
    assert acc[2] > 0.97 and acc[0] < 0.4
    shuffled = np.random.default_rng(1).permutation(labels)
    assert np.all(np.abs(probe.knn_accuracy(reps, shuffled, k=10) - 0.25) < 0.12)
    loo = probe.knn_accuracy(reps, labels, k=10, test_fraction=None)  # leave-one-out
    assert loo[2] > 0.97 and loo[0] < 0.4


def test_probes_read_layer_by_layer_with_the_same_results(tmp_path):
    reps, labels = _layers()
    files = []
    for i, layer in enumerate(reps):
        np.save(tmp_path / f"layer_{i}.npy", layer)
        files.append(np.load(tmp_path / f"layer_{i}.npy", mmap_mode="r"))
    rows = np.arange(0, len(labels), 2)  # a row subset, as the profile's kept points
    view = probe.LayerRows(files, rows)
    assert view.layer_shape == (len(rows), reps.shape[2])
    np.testing.assert_array_equal(probe.linear_probe_accuracy(view, labels[rows], steps=50, max_layers_per_batch=1),
                                  probe.linear_probe_accuracy(reps[:, rows], labels[rows], steps=50))
    np.testing.assert_array_equal(probe.knn_accuracy(view, labels[rows], k=5, test_fraction=None),
                                  probe.knn_accuracy(reps[:, rows], labels[rows], k=5, test_fraction=None))
    sub = np.arange(0, len(rows), 3)
    np.testing.assert_array_equal(probe.label_overlap_per_layer(view.take_rows(sub), labels[rows][sub], 5),
                                  probe.label_overlap_per_layer(reps[:, rows[sub]], labels[rows][sub], 5))
    bad = reps.copy()
    bad[1, 7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN/inf \\(layer 1\\)"):
        probe.knn_accuracy(list(bad), labels, k=5)
    with pytest.raises(ValueError, match="one \\(N, D\\) shape"):
        probe.knn_accuracy([reps[0], reps[1][:-1]], labels, k=5)
    with pytest.raises(ValueError, match=r"\[L\+1, N, D\]"):
        probe.knn_accuracy(reps[0], labels, k=5)


def test_split_is_seeded_stratified_and_disjoint():
    labels = np.repeat(np.arange(5), [40, 30, 20, 10, 2])
    tr, te = probe.split_indices(labels, test_fraction=0.25, seed=7)
    tr2, te2 = probe.split_indices(labels, test_fraction=0.25, seed=7)
    np.testing.assert_array_equal(te, te2)
    assert not set(tr) & set(te) and len(tr) + len(te) == len(labels)
    assert set(labels[tr]) == set(range(5))  # every class keeps a training example
    assert np.bincount(labels[te], minlength=5)[:4].tolist() == [10, 8, 5, 2]


def test_majority_vote_ties_go_to_the_nearest():
    votes = np.array([[2, 1, 1, 2], [0, 0, 3, 3], [5, 4, 4, 4]])
    assert probe.majority_vote(votes, 6).tolist() == [2, 0, 4]


def _remote_homology_data(seed: int = 0):
    """Families that are tight clusters inside superfamilies: with same-family neighbours allowed,
    superfamily overlap is trivially ~1; excluding them leaves the (weaker) superfamily signal."""
    rng = np.random.default_rng(seed)
    n_sf, fam_per_sf, per_fam, d = 4, 3, 12, 8
    sf_centres = rng.normal(size=(n_sf, d)) * 3.0
    x, sf, fam = [], [], []
    for s in range(n_sf):
        for f in range(fam_per_sf):
            centre = sf_centres[s] + rng.normal(size=d) * 2.5
            x.append(centre + 0.05 * rng.normal(size=(per_fam, d)))
            sf += [s] * per_fam
            fam += [s * fam_per_sf + f] * per_fam
    return np.concatenate(x).astype(np.float32), np.array(sf), np.array(fam)


def test_neighbors_excluding_groups_is_exact():
    x, _, fam = _remote_homology_data()
    k = 10
    idx = probe.neighbors_excluding_groups(x, k, fam)
    assert idx.shape == (len(x), k)
    assert not (fam[idx] == fam[:, None]).any()  # no same-family neighbour survives
    # Brute force: the k nearest points outside each point's family, in order.
    d2 = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    d2[fam[:, None] == fam[None, :]] = np.inf
    np.testing.assert_array_equal(idx, np.argsort(d2, axis=1, kind="stable")[:, :k])


def test_remote_homology_overlap_and_knn():
    x, sf, fam = _remote_homology_data()
    reps = np.stack([x, x])
    k = 5
    plain = idjax.label_overlap(idjax.knn(x, k).indices, sf, k)
    excluded = probe.label_overlap_excluding(x, sf, k, fam)
    assert plain > 0.99  # the k=5 nearest are all family mates
    assert 0.4 < excluded < 0.9  # superfamily signal from other families only (chance: 0.25)
    per_layer = probe.label_overlap_per_layer(reps, sf, k, fam)
    np.testing.assert_allclose(per_layer, [excluded, excluded])
    # kNN classification with family exclusion, on a split and leave-one-out.
    acc_split = probe.knn_accuracy(reps, sf, k=k, groups=fam, test_fraction=0.3)
    acc_loo = probe.knn_accuracy(reps, sf, k=k, groups=fam, test_fraction=None)
    assert acc_split.shape == acc_loo.shape == (2,)
    assert np.all(acc_loo > 0.5) and np.all(acc_loo < 0.95)  # well above chance (0.25), below the trivial 1.0
    assert np.all(probe.knn_accuracy(reps, sf, k=k, test_fraction=None) == 1.0)  # without exclusion: trivial


def test_drop_same_group_raises_when_too_few():
    idx = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="fewer than k"):
        probe.drop_same_group(idx, np.array([0]), np.array([9, 0, 0, 1]), k=2)


def test_remote_homology_subset():
    sf = np.array([0, 0, 0, 1, 1, 2])
    fam = np.array([0, 0, 1, 2, 2, 3])
    np.testing.assert_array_equal(probe.remote_homology_subset(sf, fam), [0, 1, 2])
