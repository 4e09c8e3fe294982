"""Paper-style figures of layer profiles; several runs overlay in one figure (sweeps).

Each run is (name, results dict, arrays dict) as written by `experiments/profile.py`.
Figures: ID vs relative depth (error bars, selected layer marked), label overlap (and probe
accuracy) vs relative depth, neighbour overlap between consecutive layers, GRIDE scale dependence.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Run = tuple[str, dict, dict]


def _style(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    fig.tight_layout()
    fig.savefig(path)
    fig.savefig(path.with_suffix(".pdf"))  # vector copy for papers, beside the PNG
    plt.close(fig)
    return path


def plot_id(runs: Sequence[Run], path: pathlib.Path) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=150)
    for name, results, arrays in runs:
        depth = arrays["relative_depth"]
        line = ax.errorbar(depth, arrays["id"], yerr=arrays["id_err"], marker="o", ms=3, capsize=2, lw=1.4,
                           label=name)
        sel = results["selected_layer"]
        ax.plot(depth[sel], arrays["id"][sel], marker="*", ms=14, color=line[0].get_color(), mec="k", zorder=5)
    _style(ax, "relative depth", f"intrinsic dimension ({runs[0][1]['id_estimator']})")
    ax.set_title("ID profile (star: selected layer)", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)


def plot_label_overlap(runs: Sequence[Run], path: pathlib.Path) -> pathlib.Path | None:
    runs = [r for r in runs if "label_overlap" in r[2]]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=150)
    for name, results, arrays in runs:
        depth = arrays["relative_depth"]
        k_index = results["label_ks"].index(results["best_overlap_k"])
        line, = ax.plot(depth, arrays["label_overlap"][:, k_index], marker="o", ms=3,
                        label=f"{name}: overlap with labels (k={results['best_overlap_k']})")
        sel = results["selected_layer"]
        ax.axvline(depth[sel], color=line.get_color(), ls="--", lw=0.8)
        for key, style in (("linear_probe_accuracy", ":"), ("knn_accuracy", "-."),
                           ("remote_homology_label_overlap", "--")):
            if key in arrays:
                ax.plot(depth, arrays[key], ls=style, color=line.get_color(), lw=1,
                        label=f"{name}: {key.replace('_', ' ')}")
    _style(ax, "relative depth", "overlap / accuracy")
    ax.set_title("semantic content per layer (dashed: ID-selected layer)", fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, frameon=False)
    return _save(fig, path)


def plot_adjacent_overlap(runs: Sequence[Run], path: pathlib.Path) -> pathlib.Path:
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=150)
    for name, _, arrays in runs:
        depth = arrays["relative_depth"][1:]
        ax.plot(depth, arrays["adjacent_overlap"], marker="o", ms=3, label=name)
    _style(ax, "relative depth (layer l+1)", f"overlap of layers l, l+1 (k={runs[0][1]['adjacent_overlap_k']})")
    ax.set_ylim(0, 1.02)
    ax.set_title("neighbour overlap between consecutive layers", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return _save(fig, path)


def plot_gride_scaling(run: Run, path: pathlib.Path) -> pathlib.Path:
    name, _, arrays = run
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=150)
    n_layers = arrays["gride_ids"].shape[0]
    colours = plt.cm.viridis(np.linspace(0, 1, n_layers))
    for layer in range(n_layers):
        ax.errorbar(arrays["gride_ranks"], arrays["gride_ids"][layer], yerr=arrays["gride_errs"][layer],
                    color=colours[layer], lw=1, capsize=1.5)
    ax.set_xscale("log", base=2)
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, n_layers - 1))
    fig.colorbar(sm, ax=ax, label="layer")
    _style(ax, "neighbour rank n2 (GRIDE, n1 = n2/2)", "intrinsic dimension")
    ax.set_title(f"{name}: scale dependence of the ID", fontsize=10)
    return _save(fig, path)


def write_figures(directory: pathlib.Path, runs: Sequence[Run], prefix: str = "") -> list[pathlib.Path]:
    """Writes every figure for `runs` into `directory`; returns their paths."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [plot_id(runs, directory / f"{prefix}id_profile.png"),
             plot_label_overlap(runs, directory / f"{prefix}label_overlap.png"),
             plot_adjacent_overlap(runs, directory / f"{prefix}adjacent_overlap.png")]
    if len(runs) == 1:
        paths.append(plot_gride_scaling(runs[0], directory / f"{prefix}gride_scaling.png"))
    return [p for p in paths if p is not None]


# ---------------------------------------------------------------------------------------------------
# Tables


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def summary_markdown(results: dict) -> str:
    """Per-layer table (ID +- error, overlaps, probe, peak and selected layer) and the selection line."""
    n_layers = len(results["id"])
    names = results.get("layer_names") or [str(i) for i in range(n_layers)]
    probes = results.get("probes", {})
    probe_key = probes.get("best_probe_metric")
    header = ["layer", f"ID ({results['id_estimator']}) +- err"]
    label_column = None
    if "label_overlap" in results:
        label_column = results["label_ks"].index(results["best_overlap_k"])
        header.append(f"overlap with labels (k={results['best_overlap_k']})")
    header.append(f"overlap with next layer (k={results['adjacent_overlap_k']})")
    if probe_key:
        header.append(probe_key.replace("_", " "))
    header.append("")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for layer in range(n_layers):
        marks = []
        if layer == results["peak_layer"]:
            marks.append("peak")
        if layer == results["selected_layer"]:
            marks.append("**selected**")
        row = [names[layer], f"{results['id'][layer]:.2f} +- {results['id_err'][layer]:.2f}"]
        if label_column is not None:
            row.append(_fmt(results["label_overlap"][layer][label_column]))
        row.append(_fmt(results["adjacent_overlap"][layer]) if layer < n_layers - 1 else "")
        if probe_key:
            row.append(_fmt(probes[probe_key][layer]))
        row.append(", ".join(marks))
        lines.append("| " + " | ".join(row) + " |")
    branch = results.get("selection_branch") or results.get("selection_rule", "")
    lines.append("")
    lines.append(f"Selected layer {names[results['selected_layer']]} (peak {names[results['peak_layer']]}); "
                 f"rule: {branch}. {results['n_points']} points"
                 + (f", {results['n_duplicates_dropped']} duplicates dropped" if results.get("n_duplicates_dropped")
                    else "") + ".")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Provenance and report.md


def provenance(config_json: dict | None = None) -> dict:
    """What produced a result: idjax version, git commit, jax/flax versions, devices, config hash."""
    import hashlib
    import json
    import platform
    import subprocess
    from importlib import metadata

    import idjax

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    repo = pathlib.Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    try:
        import jax

        devices = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
    except Exception as err:  # a broken accelerator setup must not lose the result
        devices = [f"unavailable: {err}"]
    out = {"idjax_version": idjax.__version__, "git_commit": commit, "git_dirty": dirty,
           "jax_version": version("jax"), "jaxlib_version": version("jaxlib"), "flax_version": version("flax"),
           "numpy_version": version("numpy"), "python": platform.python_version(), "devices": devices,
           "host": platform.node()}
    if config_json is not None:
        out["config_hash"] = hashlib.sha256(json.dumps(config_json, sort_keys=True).encode()).hexdigest()[:16]
    return out


def write_report_md(directory: pathlib.Path, results: dict, figures: Sequence[pathlib.Path]) -> pathlib.Path:
    """report.md beside the figures: the summary table, the figures, provenance and the config."""
    import json

    from idjax.files import atomic_write_text

    directory = pathlib.Path(directory)
    lines = [f"# {results.get('name', 'profile')}", ""]
    if results.get("model") or results.get("data"):
        lines += [f"Model: `{json.dumps(results.get('model'))}`  ", f"Data: `{json.dumps(results.get('data'))}`", ""]
    lines += [summary_markdown(results), ""]
    for figure in figures:
        figure = pathlib.Path(figure)
        lines += [f"![{figure.stem}]({figure.name}) ([PDF]({figure.with_suffix('.pdf').name}))", ""]
    prov = results.get("provenance")
    if prov:
        lines += ["## Provenance", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in prov.items()]
        lines.append("")
    if results.get("config"):
        lines += ["## Config", "", "```json", json.dumps(results["config"], indent=2, default=str), "```", ""]
    path = directory / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
