"""Per-layer probes of a model trained here, against the same network untrained and a feature baseline.

  --config=configs/probe_study.py:workdirs/esm2_tiny_ecoli    (ESM-2: SCOPe classes a-d, remote homology)
  --config=configs/probe_study.py:workdirs/igpt_tiny_digits   (iGPT: fitted on its training images, scored
                                                               on the held-out ones)

arg = the --workdir of a configs/train_*.py run. Extracts three stores (trained, untrained, features)
and probes them (experiments/probe_study.py); k = probe.knn_k, linear-probe budget = probe.steps.
"""

import json
import pathlib

import ml_collections

from configs import base
from models import registry


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base.analysis_config()
    config.experiment = "probe_study"
    config.name = "probe-study"
    config.model.source = "trained"
    config.model.path = arg or str(base.REPO / "workdirs" / "esm2_tiny_ecoli")
    saved = pathlib.Path(config.model.path) / "model_config.json"
    config.model.family = json.loads(saved.read_text())["family"] if saved.is_file() else "esm2"
    # Images are short, equal-length sequences: bigger batches than proteins (length-bucketed, up to 1022).
    config.extract.batch_size = {"proteins": 64, "images": 128}[registry.trainable_family(config.model.family)
                                                                  .TRAINING_DATA]
    config.study = ml_collections.ConfigDict()
    config.study.classes = "abcd"  # esm2: the SCOP classes of the class task
    config.study.min_superfamily_members = 20  # esm2: remote-homology superfamilies need this many domains
    config.study.untrained = True  # also probe the network at its initialisation
    return config
