"""The default main job (`make demo`): fully offline, no $IDJAX_SHARED_DATA needed, < 10 min on 2 CPU cores.

Trains a tiny iGPT on scikit-learn's digits (configs/train_igpt_tiny.py), extracts every layer's
pooled representation of all 1,797 digits, profiles ID and overlaps, selects the layer at the
relative ID minimum, and checks it against linear and kNN probes.
"""

import ml_collections

from configs import base, train_igpt_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = base.analysis_config()
    config.name = "igpt-tiny-digits"
    config.training = train_igpt_tiny.get_config("digits")
    config.model.family = "igpt"
    config.model.source = "trained"  # set to workdir/train by the full job after training
    config.data.name = "digits"
    config.extract.batch_size = 128
    config.profile.k_max = 64
    return config
