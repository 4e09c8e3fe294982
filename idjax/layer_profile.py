"""One call from your own per-layer arrays to a full layer profile: `idjax.profile(layers, labels)`.

It runs the pipeline's own profile code (experiments/profile.py `compute_profile`) on an in-memory
representation set, so its numbers are exactly those of `launch.py` on the same arrays
(`data.name=arrays`). The pipeline package is found beside this one in a clone or an editable
install, or in `idjax/bundled/` in an installed wheel (see the README's Installation section).
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from etils import epath

PathLike = str | os.PathLike
LayersLike = Sequence[Any] | Mapping[str, Any] | PathLike | np.ndarray


# ---------------------------------------------------------------------------------------------------
# The pipeline packages (experiments/, configs/) beside idjax/


def pipeline_root() -> pathlib.Path:
    """The directory holding the pipeline packages `experiments` and `configs`."""
    here = pathlib.Path(__file__).resolve().parent
    for root in (here.parent, here / "bundled"):
        if (root / "experiments" / "profile.py").is_file() and (root / "configs" / "base.py").is_file():
            return root
    raise ImportError(f"idjax's pipeline packages (experiments/, configs/) are neither beside {here} nor in "
                      f"{here / 'bundled'}; reinstall idjax (pip install .) or run from a clone")


def import_pipeline(module: str, *, keep_on_path: bool = False):
    """Imports `module` (e.g. "experiments.profile") from the pipeline root, never a user's same-named package."""
    root = pipeline_root()
    top = module.split(".")[0]
    loaded = sys.modules.get(top)
    if loaded is not None:
        locations = [pathlib.Path(p).resolve() for p in getattr(loaded, "__path__", [])]
        if root not in [p.parent for p in locations]:
            raise ImportError(f"a package named {top!r} from {locations} is already imported; idjax's pipeline "
                              f"needs its own {top!r} from {root} (import idjax.profile before your own {top!r})")
        return importlib.import_module(module)
    added = str(root) not in sys.path
    if added:
        sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module)
    finally:
        if added and not keep_on_path:
            sys.path.remove(str(root))


def default_options():
    """The pipeline's profile defaults (configs/base.py `config.profile`), as a ConfigDict."""
    path = pipeline_root() / "configs" / "base.py"
    spec = importlib.util.spec_from_file_location("idjax_pipeline_defaults", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.analysis_config().profile


# ---------------------------------------------------------------------------------------------------
# Inputs


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """numpy (memory maps stay lazy), JAX, torch (CPU or GPU, any float dtype) or array-likes -> numpy."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if not x.dtype.is_floating_point or x.dtype.itemsize < 4:  # bf16/fp16/int: numpy needs a real dtype
            x = x.float()
        return x.numpy()
    try:
        out = np.asarray(x)
    except Exception as err:
        raise TypeError(f"layer {name}: cannot convert {type(x).__name__} to an array ({err})") from err
    if out.dtype == object:
        raise TypeError(f"layer {name}: {type(x).__name__} is not a numeric array")
    return out


def _read_array(path: epath.Path, *, mmap: bool) -> np.ndarray:
    """An .npy file: memory-mapped when local and `mmap`, else read whole (a gs:// or other URI through epath)."""
    if mmap and "://" not in os.fspath(path):
        return np.load(os.fspath(path), mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)


def load_layers(layers: LayersLike, *, min_layers: int = 2) -> tuple[list[np.ndarray], list[str], np.ndarray | None]:
    """Per-layer (N, D) arrays from any accepted input, their names, and labels found beside them.

    min_layers: fewer layers are refused (a profile needs 2; a store for probes alone may hold 1).

    layers: a list/tuple of (N, D) arrays (input embedding first), a dict name -> array (in its order),
      an (L, N, D) array, a directory of per-layer `.npy` files (natural order: layer_2 before
      layer_10; a `labels.npy` there is the labels), or an `.npz` (key `labels` likewise). A path may be
      local (its .npy files memory-mapped) or a gs:// (any etils.epath) URI (read whole).
    """
    labels = None
    if isinstance(layers, (str, os.PathLike)):
        path = epath.Path(layers)
        if path.is_dir():
            files = sorted((p for p in path.glob("*.npy") if p.stem != "labels"), key=lambda p: _natural_key(p.name))
            if not files:
                raise FileNotFoundError(f"{path} holds no .npy files; save one (N, D) array per layer there")
            if (path / "labels.npy").is_file():
                labels = _read_array(path / "labels.npy", mmap=False)
            named = {p.stem: _read_array(p, mmap=True) for p in files}
        elif path.suffix == ".npz" and path.is_file():
            local = "://" not in os.fspath(path)
            with np.load(os.fspath(path) if local else io.BytesIO(path.read_bytes()), allow_pickle=False) as archive:
                keys = sorted((k for k in archive.files if k != "labels"), key=_natural_key)
                named = {k: archive[k] for k in keys}
                labels = archive["labels"] if "labels" in archive.files else None
        elif path.suffix == ".npy" and path.is_file():
            named = {str(i): a for i, a in enumerate(_read_array(path, mmap=True))}
        else:
            raise FileNotFoundError(f"{path}: expected a directory of per-layer .npy files, an .npz or an .npy "
                                    "of shape (L, N, D)")
    elif isinstance(layers, Mapping):
        named = {str(k): v for k, v in layers.items()}
    elif isinstance(layers, Sequence) and not isinstance(layers, (str, bytes)):
        named = {str(i): v for i, v in enumerate(layers)}
    else:
        stacked = _to_numpy(layers, "input")
        if stacked.ndim != 3:
            raise ValueError(f"expected a list of (N, D) arrays or one (L, N, D) array; got shape {stacked.shape}")
        named = {str(i): a for i, a in enumerate(stacked)}
    arrays = [_to_numpy(v, k) for k, v in named.items()]
    names = list(named)
    if len(arrays) < min_layers:
        raise ValueError(f"got {len(arrays)} layer(s); a layer profile needs at least 2")
    for name, a in zip(names, arrays, strict=True):
        if a.ndim != 2:
            raise ValueError(f"layer {name} has shape {a.shape}; every layer must be (N, D) (points x features)")
        if a.shape[0] != arrays[0].shape[0]:
            raise ValueError(f"layer {name} has {a.shape[0]} rows, layer {names[0]} has {arrays[0].shape[0]}: every "
                             "layer must hold the same points in the same order")
        if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a):
            raise ValueError(f"layer {name} has dtype {a.dtype}; expected real numbers")
    return arrays, names, labels


def _labels(labels: Any, n: int) -> tuple[np.ndarray | None, list[str] | None]:
    """Integer codes (N,) and, for non-integer labels, the names the codes stand for."""
    if labels is None:
        return None, None
    values = _to_numpy(labels, "labels")
    if values.ndim != 1 or len(values) != n:
        raise ValueError(f"labels have shape {values.shape}; expected ({n},), one per point")
    names, codes = np.unique(values, return_inverse=True)  # codes 0..C-1 (overlaps only compare labels)
    return codes.astype(np.int64), (None if np.issubdtype(values.dtype, np.integer) else [str(v) for v in names])


def options_config(**options: Any):
    """The pipeline's profile defaults with `options` applied and validated (names and allowed values)."""
    config_schema = import_pipeline("experiments.config_schema")
    cfg = default_options()
    schema = {k.removeprefix("profile."): v for k, v in config_schema.ANALYSIS.items() if k.startswith("profile.")}
    for key, value in options.items():
        if key not in cfg:
            raise TypeError(f"unknown profile option {key!r}{config_schema.suggest(key, list(cfg))}; "
                            f"options: {', '.join(sorted(cfg))}")
        problem = schema[key](value) if key in schema else None
        if problem is not None:  # before assigning: ml_collections' own type error names no fix
            raise ValueError(f"profile option {key}={value!r}: {problem}")
        cfg[key] = tuple(value) if isinstance(cfg[key], tuple) else value
    config_schema.validate(cfg, schema=schema, prefix="")
    return cfg


# ---------------------------------------------------------------------------------------------------
# The result


@dataclass
class Profile:
    """A layer profile: `summary` is what results.json holds, `arrays` what profile.npz holds.

    Layer l is row l of every per-layer array (input embedding first). Fields worth knowing:
    `id`, `id_err` (L,), the chosen estimator's ID and standard error; `twonn`, `twonn_mle` (L,);
    `gride_ids`, `gride_errs` (L, S) at `gride_ranks` (S,); `decimation_ids` (L, R) at
    `decimation_sizes`; `label_overlap` (L, K) at `label_ks`; `adjacent_overlap` (L-1,).
    """

    summary: dict
    arrays: dict[str, np.ndarray]
    layer_names: list[str] = field(default_factory=list)

    @property
    def id(self) -> np.ndarray:
        return self.arrays["id"]

    @property
    def id_err(self) -> np.ndarray:
        return self.arrays["id_err"]

    @property
    def selected_layer(self) -> int | None:
        """The selected layer, or None when the rule selects none (see `selection_branch`)."""
        layer = self.summary["selected_layer"]
        return None if layer is None else int(layer)

    @property
    def peak_layer(self) -> int | None:
        """The first significant peak, or None when the profile has none."""
        layer = self.summary["peak_layer"]
        return None if layer is None else int(layer)

    @property
    def selection_rule(self) -> str:
        return self.summary["selection_rule"]

    @property
    def estimators(self) -> dict[str, np.ndarray]:
        """Every estimator's (L,) curve: twonn, twonn_mle, gride(n1,n2) per rank, decimated TwoNN per size."""
        curves = {"twonn": self.arrays["twonn"], "twonn_mle": self.arrays["twonn_mle"]}
        for j, rank in enumerate(self.arrays["gride_ranks"]):
            curves[f"gride_{int(rank) // 2}_{int(rank)}"] = self.arrays["gride_ids"][:, j]
        if "decimation_ids" in self.arrays:
            for j, size in enumerate(self.arrays["decimation_sizes"]):
                curves[f"twonn_decimated_n{int(size)}"] = self.arrays["decimation_ids"][:, j]
        return curves

    @property
    def label_overlap(self) -> np.ndarray | None:
        return self.arrays.get("label_overlap")

    @property
    def adjacent_overlap(self) -> np.ndarray:
        return self.arrays["adjacent_overlap"]

    def save(self, directory: PathLike) -> epath.Path:
        """Writes results.json and profile.npz (the pipeline's names) atomically into `directory` (local or a
        gs:// / any etils.epath URI); returns the directory."""
        files = import_pipeline("experiments.files")
        directory = epath.Path(directory)
        files.atomic_save_npz(directory / "profile.npz", **self.arrays)
        files.atomic_write_json(directory / "results.json", {**self.summary, "layer_names": self.layer_names},
                                checksum=True)
        return directory

    @classmethod
    def load(cls, directory: PathLike) -> Profile:
        """Reads a profile saved by `save` or written by the pipeline (`launch.py`) into `directory`."""
        files = import_pipeline("experiments.files")
        directory = epath.Path(directory)
        fix = f"re-run the profile that wrote {directory}"
        summary = files.read_json(directory / "results.json", fix=fix)  # checksums verified
        arrays = files.load_npz(directory / "profile.npz", fix=fix)
        names = summary.get("layer_names") or [str(i) for i in range(len(arrays["id"]))]
        return cls(summary, arrays, names)

    def plot(self, directory: PathLike, name: str | None = None) -> list[pathlib.Path | epath.Path]:
        """The pipeline's figures (PNG + PDF) for this profile, written into `directory`; returns their paths
        (`pathlib.Path` on the local disk, `epath.Path` for a gs:// or other URI)."""
        files, report = import_pipeline("experiments.files"), import_pipeline("experiments.report")
        return [files.local_path(p) or epath.Path(p) for p in report.write_figures(epath.Path(directory), [
            (name or self.summary.get("name", "profile"), self.summary, self.arrays)])]

    def to_markdown(self) -> str:
        """The per-layer summary table (ID +- error, overlaps, selection) in Markdown."""
        return import_pipeline("experiments.report").summary_markdown(self.summary)

    def __repr__(self) -> str:
        ids = ", ".join(f"{v:.1f}" for v in self.id)
        return (f"Profile({len(self.id)} layers, {self.summary['n_points']} points, {self.summary['id_estimator']} "
                f"ID [{ids}], peak {self.peak_layer}, selected {self.selected_layer})")


def profile(layers: LayersLike, labels: Any = None, *, workdir: PathLike | None = None, seed: int = 0,
            name: str = "profile", **options: Any) -> Profile:
    """The layer profile of per-layer representations, computed exactly as the pipeline computes it.

    Args:
      layers: per-layer (N, D) arrays, input embedding first: a list/tuple or dict of numpy, JAX or
        torch arrays (memory-mapped .npy stay on disk until used), an (L, N, D) array, a directory of
        per-layer .npy files, or an .npz (see `load_layers`).
      labels: (N,) class labels (integers or strings) for the label overlap, or None. A `labels.npy`
        in the directory / `labels` in the .npz is used when this is None.
      workdir: where each layer's metrics are cached (a rerun resumes there; local or an etils.epath URI such as
        gs://); None: a temporary directory.
      seed: the decimation subsets' seed (layer l uses seed + l, as the pipeline does).
      **options: any key of the pipeline's `config.profile` (configs/base.py), e.g. k_max=32,
        id_estimator="twonn_decimated", duplicates="error", label_ks=(10, 30).

    Returns:
      A `Profile`.
    """
    arrays, names, found_labels = load_layers(layers)
    codes, label_names = _labels(found_labels if labels is None else labels, arrays[0].shape[0])
    cfg = options_config(**options)
    pipeline = import_pipeline("experiments.profile")
    store = import_pipeline("experiments.store")
    reps = store.Representations(arrays, codes, [str(i) for i in range(arrays[0].shape[0])],
                                 {"metadata": {"label_names": label_names}})
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="idjax_profile_") as cache:
            summary, out = pipeline.compute_profile(reps, cfg, epath.Path(cache), seed=seed)
    else:
        cache = epath.Path(workdir) / "profile_layers"
        cache.mkdir(parents=True, exist_ok=True)
        summary, out = pipeline.compute_profile(reps, cfg, cache, seed=seed)
    summary = {"name": name, "label_names": label_names, **summary, "layer_names": names,
               "config": {"profile": cfg.to_dict(), "seed": seed}}
    return Profile(summary, out, names)
