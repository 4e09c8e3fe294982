"""Estimators on synthetic manifolds of known ID. The default main job until the pipeline lands.."""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.experiment = "synthetic"
    config.n_points = 4000
    config.ambient_dim = 32
    config.k_max = 64
    config.twonn_fraction = 0.9
    config.seed = 0
    config.manifolds = (("linear", 2), ("linear", 5), ("linear", 10), ("sphere", 4), ("swiss_roll", 2))
    return config
