"""Paper-style figures of layer profiles; several runs overlay in one figure (sweeps).

Each run is (name, results dict, arrays dict) as written by `experiments/profile.py`.
Figures (PNG and PDF): ID per layer (error bars, peak and selected layer marked, the selection rule
that fired), label overlap and probe accuracy with chance levels, neighbour overlap between
consecutive layers (error bars: standard error over points), GRIDE scale dependence. Layers are on
integer ticks; runs of different depths (sweeps) share a relative-depth axis. Every file is written
atomically through `experiments.files`, so the directory may be local or remote (gs://...).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

from experiments import files  # noqa: E402

Run = tuple[str, dict, dict]


# One meaning per line style, the same in every figure: solid = the measured quantity (colour = run),
# dashed = kNN-classifier accuracy, dotted grey = chance level; the ID-selected layer is a star on
# the ID curve and a light band elsewhere (never a line). Single-column width (3.4 in), 8 pt text.
WIDTH, HEIGHT = 3.4, 2.5
CHANCE_STYLE = {"color": "0.45", "ls": ":", "lw": 1.0}
plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "legend.fontsize": 6.5, "axes.labelsize": 8,
                     "savefig.dpi": 300, "pdf.fonttype": 42})


def _style(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.25, lw=0.5)
    ax.spines[["top", "right"]].set_visible(False)


def _save(fig, path: epath.Path) -> epath.Path:
    fig.tight_layout()
    files.atomic_save_figure(fig, path, bbox_inches="tight")  # "tight" keeps a legend placed below the axes
    files.atomic_save_figure(fig, path.with_suffix(".pdf"), bbox_inches="tight")  # vector copy beside the PNG
    plt.close(fig)
    return path


def _same_depth(runs: Sequence[Run]) -> bool:
    return len({len(arrays["id"]) for _, _, arrays in runs}) == 1


def _x(runs: Sequence[Run], arrays: dict) -> np.ndarray:
    """Layer index when every run has the same depth (integer ticks), relative depth otherwise."""
    n = len(arrays["id"])
    return np.arange(n, dtype=float) if _same_depth(runs) else np.arange(n) / (n - 1)


def _x_axis(ax, runs: Sequence[Run], label_suffix: str = "") -> str:
    if _same_depth(runs):
        n = len(runs[0][2]["id"])
        step = max(1, int(np.ceil(n / 12)))
        ax.set_xticks(np.arange(0, n, step))
        ax.set_xlim(-0.4, n - 0.6)
        return "layer" + label_suffix
    ax.set_xlim(-0.03, 1.03)
    return "relative depth" + label_suffix


def _fit_y(ax, values: Sequence[np.ndarray], chance: Sequence[float] = (), floor: float | None = None) -> None:
    """A y range that fits the data (and the chance levels) with a 10% margin."""
    flat = np.concatenate([np.ravel(v) for v in values] + [np.asarray(chance, float)])
    flat = flat[np.isfinite(flat)]
    lo, hi = float(flat.min()), float(flat.max())
    pad = 0.1 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
    ax.set_ylim(lo - pad if floor is None else max(floor, lo - pad), hi + pad)


def _legend(ax, fig, entries: int) -> None:
    """Inside when it is small; otherwise below the axes, so it never covers data."""
    if entries <= 2:
        ax.legend(frameon=False, loc="best")
    else:
        ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2)


def _colours(runs: Sequence[Run]) -> list:
    return [plt.cm.tab10(i % 10) for i in range(len(runs))]


def _band(ax, x: np.ndarray, layer: int | None, colour) -> None:
    """A light band a quarter of a layer spacing to each side of `layer` (x: the run's layer positions);
    nothing when no layer was selected."""
    if layer is None:
        return
    half = 0.25 * (x[1] - x[0])
    ax.axvspan(x[layer] - half, x[layer] + half, color=colour, alpha=0.12, lw=0)


def plot_id(runs: Sequence[Run], path: epath.Path) -> epath.Path:
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    for (name, results, arrays), colour in zip(runs, _colours(runs), strict=True):
        x = _x(runs, arrays)
        ax.errorbar(x, arrays["id"], yerr=arrays["id_err"], marker="o", ms=3, capsize=2, lw=1.2, color=colour,
                    label=name)
        selected, peak = results["selected_layer"], results["peak_layer"]
        if selected is not None:  # a profile without a significant peak or minimum selects nothing
            ax.plot(x[selected], arrays["id"][selected], marker="*", ms=12, color=colour, mec="k", mew=0.6, zorder=5,
                    ls="none")
        if peak is not None:
            ax.plot(x[peak], arrays["id"][peak], marker="^", ms=6, color=colour, mec="k", mew=0.6, zorder=5,
                    ls="none")
    _fit_y(ax, [a["id"] - a["id_err"] for _, _, a in runs] + [a["id"] + a["id_err"] for _, _, a in runs])
    xlabel = _x_axis(ax, runs)
    _style(ax, xlabel, f"intrinsic dimension ({runs[0][1]['id_estimator']})")
    if len(runs) == 1:
        results = runs[0][1]
        branch = results.get("selection_branch") or results.get("selection_rule", "")
        chosen = "no layer selected" if results["selected_layer"] is None else \
            f"star: selected layer {results['selected_layer']}"
        ax.set_title(f"{chosen}, triangle: peak\nrule: {branch}", fontsize=6.5)
    else:
        ax.set_title("star: selected layer, triangle: peak", fontsize=7)
    if len(runs) > 1:
        _legend(ax, fig, len(runs))
    return _save(fig, path)


def plot_label_overlap(runs: Sequence[Run], path: epath.Path) -> epath.Path | None:
    """Label overlap (left) and probe accuracy (right, when probed), chance levels dotted."""
    runs = [r for r in runs if "label_overlap" in r[2]]
    if not runs:
        return None
    probed = any(k in a for _, _, a in runs for k in ("linear_probe_accuracy", "knn_accuracy"))
    fig, axes = plt.subplots(1, 2 if probed else 1, figsize=(2 * WIDTH if probed else WIDTH,
                                                             HEIGHT), squeeze=False)
    ax = axes[0, 0]
    overlap_values, chances = [], []
    for (name, results, arrays), colour in zip(runs, _colours(runs), strict=True):
        x = _x(runs, arrays)
        k_index = results["label_ks"].index(results["best_overlap_k"])
        y = arrays["label_overlap"][:, k_index]
        err = arrays["label_overlap_err"][:, k_index] if "label_overlap_err" in arrays else None
        ax.errorbar(x, y, yerr=err, marker="o", ms=3, capsize=2, lw=1.2, color=colour, label=name)
        _band(ax, x, results["selected_layer"], colour)
        overlap_values.append(y if err is None else np.concatenate([y - err, y + err]))
        if "chance_label_overlap" in results:
            chances.append(results["chance_label_overlap"])
            ax.axhline(results["chance_label_overlap"], **CHANCE_STYLE)
    _fit_y(ax, overlap_values, chances, floor=0)
    _style(ax, _x_axis(ax, runs), f"overlap with labels (k={runs[0][1]['best_overlap_k']})")
    ax.set_title("band: ID-selected layer; dotted: chance", fontsize=7)
    if len(runs) > 1:
        _legend(ax, fig, len(runs))
    if probed:
        ax = axes[0, 1]
        values, chances = [], []
        for (name, results, arrays), colour in zip(runs, _colours(runs), strict=True):
            x = _x(runs, arrays)
            for key, style, label in (("linear_probe_accuracy", "-", "linear probe"),
                                      ("knn_accuracy", "--", "kNN classifier")):
                if key in arrays:
                    ax.plot(x, arrays[key], ls=style, marker="o", ms=2.5, lw=1.2, color=colour,
                            label=label if len(runs) == 1 else f"{name}: {label}")
                    values.append(arrays[key])
            _band(ax, x, results["selected_layer"], colour)
            if "chance_accuracy" in results:
                chances.append(results["chance_accuracy"])
                ax.axhline(results["chance_accuracy"], **CHANCE_STYLE)
        _fit_y(ax, values, chances, floor=0)
        _style(ax, _x_axis(ax, runs), "probe accuracy")
        ax.set_title("solid: linear probe, dashed: kNN; dotted: chance", fontsize=7)
        _legend(ax, fig, 2 * len(runs))
    return _save(fig, path)


def plot_adjacent_overlap(runs: Sequence[Run], path: epath.Path) -> epath.Path:
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    values = []
    for (name, _, arrays), colour in zip(runs, _colours(runs), strict=True):
        x = _x(runs, arrays)[1:]
        err = arrays.get("adjacent_overlap_err")
        ax.errorbar(x, arrays["adjacent_overlap"], yerr=err, marker="o", ms=3, capsize=2, lw=1.2, color=colour,
                    label=name)
        values.append(arrays["adjacent_overlap"] if err is None else
                      np.concatenate([arrays["adjacent_overlap"] - err, arrays["adjacent_overlap"] + err]))
    _fit_y(ax, values, floor=0)
    _style(ax, _x_axis(ax, runs, " l+1"), f"overlap of layers l, l+1 (k={runs[0][1]['adjacent_overlap_k']})")
    ax.set_title("neighbour overlap between consecutive layers", fontsize=7)
    if len(runs) > 1:
        _legend(ax, fig, len(runs))
    return _save(fig, path)


def plot_gride_scaling(run: Run, path: epath.Path) -> epath.Path:
    name, _, arrays = run
    fig, ax = plt.subplots(figsize=(WIDTH, HEIGHT))
    n_layers = arrays["gride_ids"].shape[0]
    colours = plt.cm.viridis(np.linspace(0, 1, n_layers))
    for layer in range(n_layers):
        ax.errorbar(arrays["gride_ranks"], arrays["gride_ids"][layer], yerr=arrays["gride_errs"][layer],
                    color=colours[layer], lw=1, capsize=1.5, marker="o", ms=2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(arrays["gride_ranks"], [str(int(r)) for r in arrays["gride_ranks"]])
    layer_colours = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, n_layers - 1))
    bar = fig.colorbar(layer_colours, ax=ax, label="layer")
    bar.set_ticks(np.arange(0, n_layers, max(1, int(np.ceil(n_layers / 8)))))
    _style(ax, "neighbour rank n2 (GRIDE, n1 = n2/2)", "intrinsic dimension")
    ax.set_title(f"{name}: scale dependence of the ID", fontsize=7)
    return _save(fig, path)


def write_figures(directory: epath.PathLike, runs: Sequence[Run], prefix: str = "") -> list[epath.Path]:
    """Writes every figure for `runs` into `directory` (PNG, and a PDF beside each); returns the PNG paths."""
    directory = epath.Path(directory)
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
    def name_of(layer):
        return "none" if layer is None else names[layer]

    lines.append(f"Selected layer {name_of(results['selected_layer'])} (peak {name_of(results['peak_layer'])}); "
                 f"rule: {branch}: {results.get('selection_rule', '')}. {results['n_points']} points"
                 + (f", {results['n_duplicates_dropped']} duplicates dropped" if results.get("n_duplicates_dropped")
                    else "") + ".")
    if "chance_label_overlap" in results:
        lines.append(f"Chance: overlap with labels {results['chance_label_overlap']:.3f}, "
                     f"accuracy {results['chance_accuracy']:.3f} (majority class).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Provenance and report.md


def sweep_row(results: dict) -> dict:
    """One sweep entry's line of sweep.json and sweep.md, from its results.json."""
    selected = results.get("selected_layer")
    probes = results.get("probes", {})
    return {"name": results.get("name"), "peak_layer": results.get("peak_layer"), "selected_layer": selected,
            "id_at_selected": None if selected is None else results["id"][selected],
            "id_at_selected_err": None if selected is None else results["id_err"][selected],
            "best_overlap_layer": results.get("best_overlap_layer"), "best_probe_layer": probes.get("best_probe_layer"),
            "best_probe_metric": probes.get("best_probe_metric"), "id": results.get("id"),
            "id_estimator": results.get("id_estimator"), "n_points": results.get("n_points"),
            "selection_rule": results.get("selection_rule"),
            "representations": results.get("representations", {}).get("path")}


def sweep_markdown(rows: Sequence[dict], missing: Sequence[str]) -> str:
    """sweep.md: one line per finished entry (ID peak, selected layer and its ID, best label-overlap and
    probe layers, store) and the entries that have no results yet."""

    def cell(value) -> str:
        return "-" if value is None else str(value)

    lines = ["| entry | ID peak layer | selected layer | ID there | best label-overlap layer | best probe layer "
             "| store |", "|---|---:|---:|---|---:|---:|---|"]
    for row in rows:
        at = "-" if row["id_at_selected"] is None else \
            f"{row['id_at_selected']:.2f} +- {row['id_at_selected_err']:.2f} ({row['id_estimator']})"
        lines.append(f"| {row['name']} | {cell(row['peak_layer'])} | {cell(row['selected_layer'])} | {at} | "
                     f"{cell(row['best_overlap_layer'])} | {cell(row['best_probe_layer'])} | "
                     f"{cell(row['representations'])} |")
    lines.append("")
    lines.append(f"Missing (no results.json yet): {', '.join(missing)}" if missing else "Missing: none")
    return "\n".join(lines) + "\n"


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


def write_report_md(directory: epath.PathLike, results: dict, figures: Sequence[epath.PathLike]) -> epath.Path:
    """report.md beside the figures: the summary table, the figures, provenance and the config."""
    import json

    directory = epath.Path(directory)
    lines = [f"# {results.get('name', 'profile')}", ""]
    if results.get("model") or results.get("data"):
        lines += [f"Model: `{json.dumps(results.get('model'))}`  ", f"Data: `{json.dumps(results.get('data'))}`", ""]
    lines += [summary_markdown(results), ""]
    for figure in figures:
        figure = epath.Path(figure)
        lines += [f"![{figure.stem}]({figure.name}) ([PDF]({figure.with_suffix('.pdf').name}))", ""]
    provenance = results.get("provenance")
    if provenance:
        lines += ["## Provenance", "", "| | |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in provenance.items()]
        lines.append("")
    if results.get("config"):
        lines += ["## Config", "", "```json", json.dumps(results["config"], indent=2, default=str), "```", ""]
    path = directory / "report.md"
    files.atomic_write_text(path, "\n".join(lines))
    return path
