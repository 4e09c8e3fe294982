"""Your own per-layer arrays as a dataset: `--config.data.name=arrays --config.data.path=DIR_OR_NPZ`.

The arrays (a directory of per-layer .npy files with an optional labels.npy, an .npz, or an (L, N, D)
.npy; see `idjax.load_layers`) are copied into the representation store batch by batch, so the rest of
the pipeline (profile, probes, figures, resume, sweeps) runs on them exactly as on a model's
representations. No model is loaded.
"""

from __future__ import annotations

import time

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from experiments import store
from idjax.layer_profile import _labels, load_layers

BATCH_BYTES = 64 << 20  # rows per stored batch: about 64 MiB of float32 over all layers


def extract(config: ml_collections.ConfigDict, directory: epath.PathLike, config_fingerprint: str) -> dict:
    """Writes the arrays at `config.data.path` into the store at `directory`; returns its manifest."""
    start = time.perf_counter()
    layers, names, labels = load_layers(config.data.path, min_layers=1)  # one layer: a store for probes
    n = layers[0].shape[0]
    codes, label_names = _labels(labels, n)
    width = sum(a.shape[1] for a in layers)
    dims = {a.shape[1] for a in layers}
    if len(dims) != 1:
        raise ValueError(f"{config.data.path}: layers have different widths {sorted(dims)}; the store keeps one "
                         "width for all layers (profile such arrays with idjax.profile instead)")
    rows = max(1, BATCH_BYTES // (4 * width))
    plan = [list(range(i, min(i + rows, n))) for i in range(0, n, rows)]
    description = {"model": {"family": "arrays", "layer_names": names},
                   "data": {"dataset": "arrays", "path": str(config.data.path), "n": n},
                   "ids_head": [str(i) for i in range(min(n, 5))], "config_fingerprint": config_fingerprint}
    store.open_plan(directory, plan, description)
    done = store.finished_batches(directory)
    for b, indices in enumerate(plan):
        if b not in done:
            rows_b = slice(indices[0], indices[-1] + 1)
            store.write_batch(directory, b, np.stack([np.asarray(a[rows_b], np.float32) for a in layers]),
                              np.asarray(indices))
    store.finalize(directory, n, labels=codes, ids=[str(i) for i in range(n)],
                   metadata={**description, "label_names": label_names, "groups": None,
                             "extract_seconds": time.perf_counter() - start})
    logging.info("stored %d layers x %d points from %s", len(layers), n, config.data.path)
    return store.load(directory).manifest
