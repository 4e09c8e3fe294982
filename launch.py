"""Entry point: `python launch.py --config=configs/X.py:arg --workdir=DIR [--config.key=value ...]`.

Dispatches on `config.experiment` to `experiments.<name>.run(config, workdir)`.
"""

import importlib
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, checkpoints and figures.")
flags.mark_flags_as_required(["config", "workdir"])

EXPERIMENTS = {
    "synthetic": "experiments.synthetic",
}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    name = config.experiment
    if name not in EXPERIMENTS:
        raise app.UsageError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)}")
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    logging.info("running %s in %s", name, workdir)
    importlib.import_module(EXPERIMENTS[name]).run(config, workdir)


if __name__ == "__main__":
    app.run(main)
