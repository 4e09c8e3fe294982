"""idjax: the geometry of hidden representations (intrinsic dimension, neighbourhood overlap) in JAX."""

from idjax import sharded
from idjax.intrinsic_dim import (
    DecimationScaling,
    Estimate,
    GrideEstimate,
    GrideScaling,
    gride,
    gride_from_mus,
    gride_log_likelihood,
    gride_ranks,
    gride_scaling,
    twonn,
    twonn_decimation,
    twonn_from_mus,
)
from idjax.neighbors import Duplicates, KnnPlan, Neighbors, find_duplicates, knn, plan_knn
from idjax.overlap import data_overlap, data_overlap_per_point, label_overlap, label_overlap_per_point

__all__ = [
    "DecimationScaling",
    "Duplicates",
    "Estimate",
    "GrideEstimate",
    "GrideScaling",
    "KnnPlan",
    "Neighbors",
    "data_overlap",
    "data_overlap_per_point",
    "find_duplicates",
    "gride",
    "gride_from_mus",
    "gride_log_likelihood",
    "gride_ranks",
    "gride_scaling",
    "knn",
    "label_overlap",
    "label_overlap_per_point",
    "plan_knn",
    "sharded",
    "twonn",
    "twonn_decimation",
    "twonn_from_mus",
]
