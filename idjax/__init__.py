"""idjax: the geometry of hidden representations (intrinsic dimension, neighbourhood overlap) in JAX.

Names are imported on first use (PEP 562), so `import idjax` is fast and loads neither JAX nor
anything optional until a function is called.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "idjax.intrinsic_dim": ("DecimationScaling", "Estimate", "GrideEstimate", "GrideScaling", "gride",
                            "gride_from_mus", "gride_log_likelihood", "gride_ranks", "gride_scaling", "twonn",
                            "twonn_decimation", "twonn_from_mus"),
    "idjax.neighbors": ("Duplicates", "KnnPlan", "Neighbors", "find_duplicates", "knn", "plan_knn"),
    "idjax.overlap": ("data_overlap", "data_overlap_per_point", "label_overlap", "label_overlap_per_point"),
    "idjax.layer_profile": ("Profile", "load_layers", "profile"),
}
_SUBMODULES = ("sharded", "selection", "validation", "intrinsic_dim", "neighbors", "overlap",
               "layer_profile")
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_WHERE, "sharded"])


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"idjax.{name}")
    else:
        raise AttributeError(f"module 'idjax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE, *_SUBMODULES])

