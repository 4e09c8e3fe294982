"""The whole job: (train) -> extract -> profile + probes -> figures, each stage resumable."""

from __future__ import annotations

import ml_collections
from absl import logging
from etils import epath

from experiments import distributed, extract, profile


def run(config: ml_collections.ConfigDict, workdir: epath.PathLike) -> dict:
    """Runs every stage in `workdir`; a finished stage is skipped, an interrupted one resumes.

    If `config.training` is set, the model is trained first in `workdir/train` (resuming from its last
    checkpoint) and `config.model` reads it (source "trained").
    """
    workdir = epath.Path(workdir)
    if config.get("training") and not config.model.get("encoder"):  # the researcher's own model is not trained here
        from experiments import train

        train_dir = workdir / "train"
        result_file = train_dir / "train_result.json"
        if result_file.exists():
            logging.info("training already finished in %s", train_dir)
        else:
            train.run(config.training, train_dir)
        with config.unlocked():
            config.model.source = "trained"
            config.model.path = str(train_dir)
    extract.run(config, workdir)
    results = profile.run(config, workdir)
    if distributed.is_writer():  # the other processes of a job hold no figures or results files to name
        _print_summary(results, workdir)
    return results


def _print_summary(results: dict, workdir: epath.Path) -> None:
    """After the profile job's per-layer table: the selection, estimator agreement and the checks' layers."""
    ids = ", ".join(f"{v:.1f}" for v in results["id"])
    print(f"\nID profile ({results['id_estimator']}, {results['n_points']} points): [{ids}]")
    print(f"peak layer {results['peak_layer']}, selected layer: {results['selected_layer']} "
          f"[{results['selection_branch']}: {results['selection_rule']}]")
    agreement = results["estimator_agreement"]
    print(f"estimator agreement ({', '.join(agreement['estimators'])}): largest relative spread "
          f"{agreement['max_relative_spread']:.0%} at layer {agreement['max_spread_layer']}")
    if "best_overlap_layer" in results:
        print(f"best label-overlap layer (k={results['best_overlap_k']}): {results['best_overlap_layer']}")
    if "probes" in results:
        p = results["probes"]
        print(f"best probe layer ({p['best_probe_metric']}): {p['best_probe_layer']}")
    print(f"arrays: {workdir / 'profile.npz'}; figures (PNG + PDF): " + ", ".join(results.get("figures", [])))
