"""Entry point: `python launch.py --config=configs/X.py:arg --workdir=DIR [--config.key=value ...] [--sweep]`.

Dispatches on `config.experiment`: extract | profile | probe | train | full | synthetic. With
`--sweep`, the config file's `get_sweep(arg)` gives a list of runs (name + flattened overrides such
as {"model.path": ..., "profile.k_max": 32}); each runs in DIR/<name>, one after another (each
resumable), and their profiles are then overlaid in DIR/sweep_*.png and summarised in DIR/sweep.json.
"""

import copy
import importlib
import importlib.util
import json
import logging as std_logging
import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, checkpoints and figures.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Run every entry of the config file's get_sweep(arg).")
flags.mark_flags_as_required(["config", "workdir"])

EXPERIMENTS = {
    "extract": ("experiments.extract", "run"),
    "profile": ("experiments.profile", "run"),
    "probe": ("experiments.profile", "run_probe_only"),
    "train": ("experiments.train", "run"),
    "full": ("experiments.full", "run"),
    "synthetic": ("experiments.synthetic", "run"),
}


def run_one(config, workdir: pathlib.Path):
    name = config.experiment
    if name not in EXPERIMENTS:
        raise app.UsageError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)}")
    workdir.mkdir(parents=True, exist_ok=True)
    module, function = EXPERIMENTS[name]
    logging.info("running %s in %s", name, workdir)
    return getattr(importlib.import_module(module), function)(config, workdir)


def sweep_entries(config_arg: str) -> list[dict]:
    """Loads get_sweep(arg) from the config file named in --config."""
    path, _, arg = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise app.UsageError(f"{path} defines no get_sweep(arg); drop --sweep or add one")
    return module.get_sweep(arg or None)


def run_sweep(config, workdir: pathlib.Path) -> None:
    from experiments import report

    entries = sweep_entries(config_flags.get_config_filename(flags.FLAGS["config"]))
    runs, summary = [], []
    for i, entry in enumerate(entries):
        name = entry.get("name", f"run{i}")
        child = copy.deepcopy(config)
        with child.unlocked():
            child.update_from_flattened_dict(entry.get("overrides", {}))
            child.name = name
        logging.info("sweep %d/%d: %s", i + 1, len(entries), name)
        results = run_one(child, workdir / name)
        if isinstance(results, dict) and "id" in results:
            from idjax.files import load_npz

            arrays = load_npz(workdir / name / "profile.npz", fix="delete it and re-run this sweep entry")
            runs.append((name, results, arrays))
            summary.append({k: results.get(k) for k in ("name", "selected_layer", "peak_layer", "best_overlap_layer",
                                                         "id", "n_points")})
    if runs:
        figures = report.write_figures(workdir, runs, prefix="sweep_")
        (workdir / "sweep.json").write_text(json.dumps({"runs": summary, "figures": [str(f) for f in figures]},
                                                       indent=2))
        print(f"sweep of {len(runs)} runs: {workdir / 'sweep.json'}; figures: {', '.join(map(str, figures))}")


class _QuietLibraries(std_logging.Filter):
    """Keeps idjax's own INFO lines; drops the INFO chatter of orbax and jax internals."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(
            part in record.pathname for part in ("/orbax/", "/jax/_src/", "/etils/"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    workdir = pathlib.Path(_WORKDIR.value)
    if _SWEEP.value:
        run_sweep(_CONFIG.value, workdir)
    else:
        run_one(_CONFIG.value, workdir)


if __name__ == "__main__":
    app.run(main)
