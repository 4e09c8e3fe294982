"""The paper's qualitative claims, checked at every training step of a profiles-over-training sweep.

`python -m experiments.over_training SWEEP_DIR [--loss TRAIN_OR_EXPORT_DIR]` reads the sweep entries'
results (SWEEP_DIR/step_<S>/results.json, from `launch.py --config=configs/over_training.py:... --sweep`)
and writes

  SWEEP_DIR/claims.json, claims.md    each claim per step, with the numbers it was decided on
  SWEEP_DIR/over_training.png/.pdf    ID, overlap with labels, probe accuracy and adjacent-layer overlap
                                      against relative depth, one curve per training step
  SWEEP_DIR/id_heatmap.png/.pdf       the ID profile as a step x layer heatmap
  SWEEP_DIR/loss_curve.png/.pdf       the run's training and held-out loss (with --loss)

The claims (Valeriani et al. 2023), decided by fixed rules on each step's profile; layer 0 is the input
embedding, L the last layer, the peak and the selected layer are those of `idjax.selection`
(significance-tested, the analysis's own rule and settings):

  1 early_peak        a significant ID peak in the learned layers: 1 <= peak <= L / 2
  2 minimum_after     claim 1, and a layer is selected after that peak (a relative minimum or the start
                      of a low plateau; the branch is recorded)
  3 semantic_layer    the selected layer is within one layer of both the best label-overlap layer and
                      the best probe layer
  4 overlap_plateau   the adjacent-layer overlaps from the selected layer on are at least their mean
                      before it and vary by at most 0.1 (the paper's plateau of consecutive-layer overlap
                      after the minimum); needs a selected layer and two overlaps after it
  5 emerges           (whole run) claims 1 and 2 hold at the last step and do not at step 0; not decidable
                      (null) when the sweep lacks step 0 or a later step
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from experiments.files import atomic_save_figure, atomic_write_json, atomic_write_text, read_json

PLATEAU_RANGE = 0.1
CLAIMS = ("early_peak", "minimum_after", "semantic_layer", "overlap_plateau")
CLAIM_TEXT = {
    "early_peak": "an early ID peak in the learned layers",
    "minimum_after": "a relative minimum (or low plateau) after the peak",
    "semantic_layer": "selected layer within one layer of the best label-overlap and best probe layers",
    "overlap_plateau": "adjacent-layer overlap plateau from the selected layer on",
    "emerges": "the profile emerges with training (claims 1-2 absent at step 0, present at the end)",
}


def step_results(sweep_dir: epath.PathLike) -> list[tuple[int, dict]]:
    """(step, results.json) of every finished sweep entry named step_<S>, ascending by step."""
    found = []
    for path in epath.Path(sweep_dir).glob("step_*/results.json"):
        match = re.fullmatch(r"step_(\d+)", path.parent.name)
        if match:
            found.append((int(match.group(1)), read_json(path, fix=f"delete it and re-run the sweep entry "
                                                                   f"{path.parent.name}")))
    if not found:
        raise FileNotFoundError(f"no step_<S>/results.json under {sweep_dir}: run the sweep first")
    return sorted(found, key=lambda item: item[0])


def step_claims(results: dict) -> dict[str, Any]:
    """The claims 1-4 of one step's results, each {"holds": bool, ...the numbers it was decided on}."""
    ids = np.asarray(results["id"], float)
    last = len(ids) - 1
    peak, selected = results.get("peak_layer"), results.get("selected_layer")
    best_overlap = results.get("best_overlap_layer")
    best_probe = (results.get("probes") or {}).get("best_probe_layer")
    adjacent = np.asarray([v for v in results.get("adjacent_overlap", []) if v is not None], float)  # layer l to l+1

    early = peak is not None and 1 <= peak <= last / 2
    claims: dict[str, Any] = {
        "early_peak": {"holds": bool(early), "peak_layer": peak, "last_layer": last,
                       "id_at_peak": None if peak is None else float(ids[peak]), "id_at_input": float(ids[0])},
        "minimum_after": {"holds": bool(early and selected is not None), "selected_layer": selected,
                          "branch": results.get("selection_branch"),
                          "id_at_selected": None if selected is None else float(ids[selected])},
    }
    near = (selected is not None and best_overlap is not None and best_probe is not None
            and abs(selected - best_overlap) <= 1 and abs(selected - best_probe) <= 1)
    claims["semantic_layer"] = {"holds": bool(near), "selected_layer": selected,
                                "best_overlap_layer": best_overlap, "best_probe_layer": best_probe,
                                "best_probe_metric": (results.get("probes") or {}).get("best_probe_metric")}
    plateau: dict[str, Any] = {"holds": False, "after": None, "before_mean": None}
    if selected is not None and len(adjacent) - selected >= 2:
        after, before = adjacent[selected:], adjacent[:selected]
        before_mean = float(np.nanmean(before)) if len(before) else None
        flat = np.ptp(after) <= PLATEAU_RANGE
        plateau = {"holds": bool(flat and (before_mean is None or after.min() >= before_mean)),
                   "after": after.round(4).tolist(), "before_mean": before_mean, "range_after": float(np.ptp(after))}
    claims["overlap_plateau"] = plateau
    return claims


def summarize(sweep_dir: epath.PathLike) -> dict:
    """Claims per step plus claim 5 over the run: {"steps": [...], "per_step": {...}, "emerges": {...}}."""
    entries = step_results(sweep_dir)
    per_step = {step: step_claims(results) for step, results in entries}
    first, final = entries[0][0], entries[-1][0]
    shape = {step: claims["early_peak"]["holds"] and claims["minimum_after"]["holds"]
             for step, claims in per_step.items()}
    # Without the untrained control (step 0) and a later step, "emerges" cannot be decided: None, not False.
    decidable = first == 0 and final > 0
    emerges = {"holds": bool(shape[final] and not shape[0]) if decidable else None, "first_step": first,
               "final_step": final, "shape_at_first": shape[first], "shape_at_final": shape[final]}
    final_results = entries[-1][1]
    return {
        "sweep_dir": str(sweep_dir), "steps": [step for step, _ in entries],
        "id_estimator": final_results.get("id_estimator"), "n_points": final_results.get("n_points"),
        "per_step": {str(step): claims for step, claims in per_step.items()}, "emerges": emerges,
        "final": {name: per_step[final][name]["holds"] for name in CLAIMS} | {"emerges": emerges["holds"]},
        "profiles": {str(step): {"id": results["id"], "id_err": results.get("id_err"),
                                 "peak_layer": results.get("peak_layer"),
                                 "selected_layer": results.get("selected_layer")} for step, results in entries},
    }


def claims_table(summary: dict) -> str:
    """Markdown: one row per claim, the final step's verdict and its numbers, plus step 0 for contrast."""
    final = str(summary["steps"][-1])
    first = str(summary["steps"][0])
    contrast = first != final
    rows = ["| claim | holds at the last step | evidence (last step) | at step " + (first if contrast else "-") + " |",
            "|---|---|---|---|"]
    for number, name in enumerate(CLAIMS, 1):
        claim, early = summary["per_step"][final][name], summary["per_step"][first][name]
        rows.append(f"| {number}. {CLAIM_TEXT[name]} | {_verdict(claim['holds'])} | {_evidence(name, claim)} | "
                    f"{_verdict(early['holds']) if contrast else ''} |")
    emerges = summary["emerges"]
    if emerges["holds"] is None:
        evidence = (f"needs the untrained control (step 0) and a later step; the sweep has steps "
                    f"{', '.join(map(str, summary['steps']))}")
    else:
        evidence = (f"shape (claims 1-2) at step {emerges['first_step']}: {emerges['shape_at_first']}, at step "
                    f"{emerges['final_step']}: {emerges['shape_at_final']}")
    rows.append(f"| 5. {CLAIM_TEXT['emerges']} | {_verdict(emerges['holds'])} | {evidence} | |")
    return "\n".join(rows)


def _verdict(holds: bool | None) -> str:
    return "not decidable" if holds is None else "holds" if holds else "does not hold"


def _evidence(name: str, claim: dict) -> str:
    if name == "early_peak":
        if claim["peak_layer"] is None:
            return f"no significant peak (ID at input {claim['id_at_input']:.2f})"
        return f"peak at layer {claim['peak_layer']} of {claim['last_layer']} (ID {claim['id_at_peak']:.2f})"
    if name == "minimum_after":
        if claim["selected_layer"] is None:
            return f"no layer selected ({claim['branch']})"
        return f"layer {claim['selected_layer']} ({claim['branch']}, ID {claim['id_at_selected']:.2f})"
    if name == "semantic_layer":
        return (f"selected {claim['selected_layer']}, best label overlap {claim['best_overlap_layer']}, best "
                f"probe {claim['best_probe_layer']}")
    if claim["after"] is None:
        return "needs a selected layer with two overlaps after it"
    return f"after: {claim['after']} (range {claim['range_after']:.3f}), mean before: {claim['before_mean']}"


def per_step_table(summary: dict) -> str:
    """Markdown: per step, the peak, the selected layer and each claim."""
    rows = ["| step | peak | selected (branch) | " + " | ".join(CLAIMS) + " |", "|---" * (3 + len(CLAIMS)) + "|"]
    for step in summary["steps"]:
        claims = summary["per_step"][str(step)]
        peak, minimum = claims["early_peak"]["peak_layer"], claims["minimum_after"]
        rows.append(f"| {step} | {peak} | {minimum['selected_layer']} ({minimum['branch']}) | "
                    + " | ".join("yes" if claims[name]["holds"] else "no" for name in CLAIMS) + " |")
    return "\n".join(rows)


def write_figures(sweep_dir: epath.PathLike) -> list[epath.Path]:
    """The per-step curves and the ID heatmap (PNG + PDF) in `sweep_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_dir = epath.Path(sweep_dir)
    entries = step_results(sweep_dir)
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, len(entries)))
    k = entries[-1][1].get("best_overlap_k")
    panels = [("id", "intrinsic dimension"), ("label_overlap", f"overlap with labels (k = {k})"),
              ("probe", "probe accuracy"), ("adjacent_overlap", "overlap with next layer")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=120)
    for (key, label), ax in zip(panels, axes.ravel(), strict=True):
        for colour, (step, results) in zip(colours, entries, strict=True):
            values = _curve(results, key)
            if values is None:
                continue
            depth = np.arange(len(values)) / (len(results["id"]) - 1)
            ax.plot(depth, values, "o-", ms=3, lw=1.4, color=colour, label=f"step {step}")
            if key == "id" and results.get("selected_layer") is not None:
                layer = results["selected_layer"]
                ax.plot(depth[layer], values[layer], "*", ms=12, color=colour, markeredgecolor="k")
        ax.set_xlabel("relative depth")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    estimator = entries[-1][1].get("id_estimator")
    fig.suptitle(f"{sweep_dir.name}: profiles over training ({estimator}; star: selected layer)")
    fig.tight_layout()
    written = _save(fig, sweep_dir / "over_training")
    plt.close(fig)

    heat = np.array([results["id"] for _, results in entries], float)
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=120)
    image = ax.imshow(heat, aspect="auto", cmap="magma", origin="lower")
    ax.set_yticks(range(len(entries)), [str(step) for step, _ in entries])
    ax.set_xlabel("layer")
    ax.set_ylabel("training step")
    fig.colorbar(image, ax=ax, label=f"ID ({estimator})")
    fig.tight_layout()
    written += _save(fig, sweep_dir / "id_heatmap")
    plt.close(fig)
    return written


def _curve(results: dict, key: str) -> np.ndarray | None:
    if key == "id":
        return np.asarray(results["id"], float)
    if key == "label_overlap":  # [layer, k] -> the k the best label-overlap layer is chosen at
        if results.get("label_overlap") is None:
            return None
        column = list(results["label_ks"]).index(results.get("best_overlap_k", results["label_ks"][-1]))
        return np.asarray(results["label_overlap"], float)[:, column]
    if key == "probe":
        probes = results.get("probes") or {}
        metric = probes.get("best_probe_metric")
        return None if metric is None else np.asarray(probes[metric], float)
    return np.asarray([np.nan if v is None else v for v in results.get("adjacent_overlap", [])], float)


def _save(fig: Any, stem: epath.Path) -> list[epath.Path]:
    return [atomic_save_figure(fig, stem.with_suffix(suffix)) for suffix in (".png", ".pdf")]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir")
    parser.add_argument("--loss", default=None, help="a training workdir or export (its metrics.jsonl): loss curves")
    args = parser.parse_args(argv)
    sweep_dir = epath.Path(args.sweep_dir)
    summary = summarize(sweep_dir)
    atomic_write_json(sweep_dir / "claims.json", summary)
    text = claims_table(summary) + "\n\n" + per_step_table(summary) + "\n"
    atomic_write_text(sweep_dir / "claims.md", text)
    figures = write_figures(sweep_dir)
    if args.loss:
        from experiments import train

        figures += [train.plot_metrics(args.loss, sweep_dir / "loss_curve.png", title=f"{sweep_dir.name}: loss"),
                    train.plot_metrics(args.loss, sweep_dir / "loss_curve.pdf", title=f"{sweep_dir.name}: loss")]
    print(text)
    print("written:", ", ".join(str(p) for p in [sweep_dir / "claims.json", sweep_dir / "claims.md", *figures]))


if __name__ == "__main__":
    main()
