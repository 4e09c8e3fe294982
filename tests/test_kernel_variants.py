"""Every jit-able kernel of the geometry library gives the same result jitted, unjitted and vmapped
(chex variants), and its chex invariants reject malformed internal inputs."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import idjax
from idjax import neighbors, overlap

RNG = np.random.default_rng(5)
X = RNG.normal(size=(64, 3)).astype(np.float32)
DIST, IDX = (np.asarray(a) for a in idjax.knn(X, 8))
IDX_B = np.asarray(idjax.knn(X + RNG.normal(scale=0.3, size=X.shape).astype(np.float32), 8).indices)
MUS = jnp.asarray(DIST[:, 1] / DIST[:, 0])
MUS_48 = jnp.asarray(DIST[:, 7] / DIST[:, 3])
VALID = jnp.asarray(np.arange(64) % 9 != 0)
LABELS = jnp.asarray(np.arange(64) % 4, jnp.int32)

# name -> (kernel of array arguments only, its arguments, a batch of such arguments along axis 0)
KERNELS = {
    "twonn_from_mus_fit": (functools.partial(idjax.twonn_from_mus, method="fit", fraction=0.9), (MUS,)),
    "twonn_from_mus_mle": (functools.partial(idjax.twonn_from_mus, method="mle"), (MUS,)),
    "twonn_from_mus_masked": (lambda m, v: idjax.twonn_from_mus(m, v, n_keep=50), (MUS, VALID)),
    "gride_from_mus": (lambda m, v: idjax.gride_from_mus(m, v, 1, 2), (MUS, VALID)),
    "gride_from_mus_4_8": (lambda m, v: idjax.gride_from_mus(m, v, 4, 8), (MUS_48, VALID)),
    "gride_log_likelihood": (lambda m, v: idjax.gride_log_likelihood(jnp.float32(2.5), m, v, 1.0, 2.0),
                             (MUS, VALID)),
    "label_overlap_per_point": (overlap.label_overlap_per_point.__wrapped__, (jnp.asarray(IDX), LABELS)),
    "data_overlap_per_point": (overlap.data_overlap_per_point.__wrapped__, (jnp.asarray(IDX), jnp.asarray(IDX_B))),
    "smallest_columns": (lambda d: neighbors.smallest_columns(d, 5, 8), (jnp.asarray(DIST @ DIST.T),)),
    "knn_in_blocks": (lambda x: neighbors.knn_in_blocks(x, x, k=4, k_search=8, block_size=16, exclude_self=True,
                                                        rerank_rows=0), (jnp.asarray(X),)),
    "knn_in_blocks_chunked": (lambda x: neighbors.knn_in_blocks(x, x, k=4, k_search=8, block_size=16,
                                                                exclude_self=True, rerank_rows=5), (jnp.asarray(X),)),
}

# The log-likelihood is a float32 sum of terms that largely cancel, so XLA's summation order (fused
# under jit, split under vmap) moves it by ~2e-5 relative; everything else agrees to rounding.
RTOL = {"gride_log_likelihood": 1e-4}


def _batch(args, size=3):
    """`size` different argument tuples (rows permuted) stacked along a new leading axis."""
    perms = [np.random.default_rng(i).permutation(args[0].shape[0]) for i in range(size)]
    if all(a.ndim == 1 for a in args):
        return tuple(jnp.stack([a[p] for p in perms]) for a in args)
    return tuple(jnp.stack([a] * size) for a in args)


class KernelVariants(parameterized.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*[(name, name) for name in KERNELS])
    def test_same_jitted_and_unjitted(self, name):
        kernel, args = KERNELS[name]
        reference = kernel(*args)
        chex.assert_trees_all_close(self.variant(kernel)(*args), reference, rtol=RTOL.get(name, 1e-6))

    @parameterized.named_parameters(*[(name, name) for name in KERNELS])
    def test_vmapped_equals_one_at_a_time(self, name):
        kernel, args = KERNELS[name]
        batch = _batch(args)
        one_by_one = [kernel(*(a[i] for a in batch)) for i in range(3)]
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *one_by_one)
        rtol = RTOL.get(name, 1e-6)
        chex.assert_trees_all_close(jax.vmap(kernel)(*batch), stacked, rtol=rtol)
        chex.assert_trees_all_close(jax.jit(jax.vmap(kernel))(*batch), stacked, rtol=rtol)


def test_internal_invariants_are_checked():
    """Malformed internal inputs fail at trace time with chex's shape/rank/type message."""
    with pytest.raises(AssertionError, match="rank"):
        idjax.twonn_from_mus(jnp.ones((4, 2)))
    with pytest.raises(AssertionError, match="shape"):
        idjax.gride_from_mus(MUS, VALID[:10], 1, 2)
    with pytest.raises(AssertionError, match="type|dtype"):
        overlap.data_overlap_per_point(jnp.asarray(IDX, jnp.float32), jnp.asarray(IDX_B, jnp.float32))
    with pytest.raises(AssertionError, match="shape"):
        overlap.label_overlap_per_point(jnp.asarray(IDX), LABELS[:10])
