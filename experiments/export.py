"""A training run's checkpoints as self-contained model checkpoints, for analysis and for shipping.

`python -m experiments.export --workdir=TRAIN_DIR --out=EXPORT_DIR [--steps=0,30,100]` writes

  EXPORT_DIR/step_<S>/          the family's Orbax checkpoint of step S (`models.<family>.save`: params, and
                                the model config in metadata.json), read back by `model.source=orbax`
                                `model.path=EXPORT_DIR/step_<S>`; an iGPT's colour palette beside it as
                                kmeans_centers.npy, which the orbax source finds by itself
  EXPORT_DIR/data_split.json    which examples the run trained on (`data.heldout_of=EXPORT_DIR` analyses
                                the others), and the run's config.json, model_config.json, metrics.jsonl,
                                train_result.json and loss_curve.png, so the directory says what it holds

Optimizer state is left behind: an export is for reading representations, not for resuming training
(the workdir's own checkpoints do that). Each step directory is written by Orbax atomically; rerunning
replaces it. EXPORT_DIR may be local or remote (gs://...): the run records are copied through
`experiments.files` (atomic), the checkpoints by Orbax.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from etils import epath

from experiments import train
from experiments.files import atomic_open, atomic_write_json
from models import palette, registry

RUN_RECORDS = ("config.json", "model_config.json", "data_split.json", "metrics.jsonl", "train_result.json",
               "loss_curve.png")


def step_dir(out: epath.PathLike, step: int) -> epath.Path:
    """Where `export` puts checkpoint `step`."""
    return epath.Path(out) / f"step_{int(step)}"


def exported_steps(out: epath.PathLike) -> list[int]:
    """The steps exported under `out`, ascending."""
    return sorted(int(p.name.removeprefix("step_")) for p in epath.Path(out).glob("step_*")
                  if p.name.removeprefix("step_").isdigit() and (p / "metadata.json").is_file())


def export(workdir: epath.PathLike, out: epath.PathLike, steps: Sequence[int] | None = None) -> list[int]:
    """Writes checkpoints `steps` (default: the run's `checkpoint.keep_steps` and its last step, those of them
    present) of the training run in `workdir` to `out` (layout in the module docstring). Returns the steps
    written."""
    workdir, out = epath.Path(workdir), epath.Path(out)
    if steps is None:
        config = train.load_config(workdir)
        kept = set(config.checkpoint.get("keep_steps") or ()) | {int(config.train.steps)}  # and the trained model
        present = {int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()}
        steps = sorted(kept & present)
        if not steps:
            raise FileNotFoundError(f"{workdir / 'checkpoints'} holds none of the kept steps {sorted(kept)}: name "
                                    "the steps to export with --steps")
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_RECORDS:
        if (workdir / name).is_file():
            with atomic_open(out / name) as f:
                f.write((workdir / name).read_bytes())
    for step in steps:
        model, params, _ = train.load_trained(workdir, step=step)
        target = step_dir(out, step)
        registry.family(registry.family_of(model.config)).save(target, model.config, params)
        if (workdir / "palette.npy").is_file():
            palette.save_palette(target / palette.KMEANS_CENTERS, palette.load_palette(workdir / "palette.npy"))
    atomic_write_json(out / "export.json", {"workdir": str(workdir), "steps": exported_steps(out)})
    return list(steps)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the training run's workdir")
    parser.add_argument("--out", required=True, help="the export directory")
    parser.add_argument("--steps", default=None, help="comma-separated steps (default: the kept ones and the last)")
    args = parser.parse_args(argv)
    steps = None if args.steps is None else [int(s) for s in args.steps.split(",") if s.strip()]
    written = export(args.workdir, args.out, steps)
    print(f"exported steps {written} of {args.workdir} to {args.out}")


if __name__ == "__main__":
    main()
