"""Profiles over training: one analysis per exported checkpoint of a model trained here, on the examples
its run held out, with the settings of the family's own config (configs/igpt.py, configs/esm2.py).

  --config=configs/over_training.py:igpt --sweep --workdir=workdirs/over_training/igpt
  --config=configs/over_training.py:esm2,workdirs/trained/esm2_scope_deep --sweep --workdir=...

arg = family [, export directory]. The export directory is what `python -m experiments.export` wrote
from a training run (step_<S>/ per kept checkpoint, data_split.json); default: the `deep` runs'
exports under workdirs/trained (README, "The paper's claims on models trained here"). Without
--sweep the last exported step is analysed. Then `python -m experiments.over_training DIR` tabulates
the paper's claims per step and draws the figures.

iGPT: MNIST test images, 14x14 RGB as in training, the 2000 the run held out, labelled by digit.
ESM-2: the SCOPe domains of the held-out families (never in training), superfamilies with at least 20
of them, 40 each at most (configs/esm2.py), remote-homology probes; sequences in windows of the
128-residue crops the model was trained on.
"""

import pathlib

import ml_collections

from configs import base, common

EXPORTS = {"igpt": common.REPO / "workdirs" / "trained" / "igpt_mnist_deep",
           "esm2": common.REPO / "workdirs" / "trained" / "esm2_scope_deep"}


def _parse(arg: str | None) -> tuple[str, pathlib.Path]:
    family, _, export_dir = (arg or "igpt").partition(",")
    family = family.strip().lower()
    if family not in EXPORTS:
        raise ValueError(f"arg must be igpt or esm2, optionally followed by ',EXPORT_DIR'; got {arg!r}")
    return family, pathlib.Path(export_dir.strip()) if export_dir.strip() else EXPORTS[family]


def _steps(export_dir: pathlib.Path) -> list[int]:
    """The exported steps, ascending (`experiments.export` names and lists them; imported here, not at the top,
    so that reading the config loads no pipeline module); empty when the export does not exist yet."""
    from experiments import export

    return export.exported_steps(export_dir)


def _step_dir(export_dir: pathlib.Path, step: int) -> pathlib.Path:
    from experiments import export

    return export.step_dir(export_dir, step)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    family, export_dir = _parse(arg)
    config = base.analysis_config()
    config.name = f"{family}-over-training"
    config.model.family = family
    config.model.source = "orbax"
    steps = _steps(export_dir)
    config.model.path = str(_step_dir(export_dir, steps[-1] if steps else 0))
    config.data.heldout_of = str(export_dir)
    if family == "igpt":
        config.data.name = "mnist"
        config.data.root = str(common.MNIST_ROOT)
        config.data.split = "test"
        config.data.size = 14
        config.data.rgb = True
        config.extract.batch_size = 100
    else:
        config.data.name = "scope"
        config.data.path = str(common.SCOPE_FASTA)
        config.data.label = "superfamily"
        config.data.min_class_size = 20
        config.data.per_class = 40
        config.model.esm2.long_policy = "windows"
        config.model.esm2.max_residues = 128
        config.extract.batch_size = 32
        config.probe.remote_homology = True
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    """One entry per exported step, named step_<S> (zero-padded, so names sort by step)."""
    family, export_dir = _parse(arg)
    steps = _steps(export_dir)
    if not steps:
        raise FileNotFoundError(f"no exported checkpoints (step_<S>/) under {export_dir}: train with "
                                f"configs/train_*.py ...deep and export with `python -m experiments.export`")
    return [{"name": f"step_{step:06d}", "overrides": {"model.path": str(_step_dir(export_dir, step))}}
            for step in steps]
