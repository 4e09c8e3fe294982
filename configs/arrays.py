"""Your own per-layer arrays through the whole pipeline (store, profile, probes, figures, sweeps).

  --config=configs/arrays.py:DIR_OR_NPZ   (a directory of per-layer .npy files + optional labels.npy,
                                           an .npz with a `labels` key, or an (L, N, D) .npy)

No model is loaded; the arrays are copied into the representation store (experiments/array_data.py).
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base.analysis_config()
    config.name = "arrays"
    config.data.name = "arrays"
    config.data.path = arg or None
    return config
