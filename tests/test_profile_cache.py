"""The profile cache is never stale: a rerun of a finished workdir under changed options, or after the
representations changed, gives exactly a fresh run's numbers, and recomputes only what the change affects."""

import collections
import json
import shutil

import numpy as np
import pytest

import idjax
from configs import base
from experiments import probe, profile, store
from experiments.synthetic import manifold

N_LAYERS = 3


def make_store(directory, n=150, seed=0, labels=True, scale_layer_1=1.0):
    """A tiny store: 3 layers on manifolds of different dimension, 4 classes, 2 families per class, one
    duplicate row (so the kept points are a strict subset)."""
    layers = [manifold("linear", n, d, 8, seed=seed + i) for i, d in enumerate((3, 6, 4))]
    layers[1] = layers[1] * scale_layer_1
    for x in layers:
        x[n - 1] = x[0]
    y = np.arange(n) % 4
    groups = (np.arange(n) // 4) % 2 + 2 * y
    store.open_plan(directory, [list(range(n))], {"synthetic": True})
    store.write_batch(directory, 0, np.stack(layers), np.arange(n))
    store.finalize(directory, n, labels=y if labels else None, ids=[str(i) for i in range(n)],
                   metadata={"model": "synthetic", "groups": groups.tolist()})


def small_config():
    config = base.analysis_config()
    config.name = "cache"
    config.profile.k_max = 16
    config.profile.gride_range_max = 16
    config.profile.gride_rank = 8  # the default GRIDE(n2/2, n2) must stay computable under every changed option
    config.profile.label_ks = (5, 10)
    config.profile.overlap_k = 10
    config.profile.decimation_min_size = 30
    config.probe.steps = 20
    return config


def set_option(config, dotted, value):
    section, name = dotted.split(".") if "." in dotted else (None, dotted)
    target = config if section is None else config[section]
    target[name] = value


# option -> (changed value, the cached computations it must redo, overrides of the base run).
# Every option of configs/base.py's profile and probe blocks must be listed (checked below).
CHANGES = {
    "profile.k_max": (12, {"graph"}, {}),
    "profile.sharded": ("always", set(), {}),
    "profile.processes": ("ring", set(), {}),  # several processes only: one process computes it all itself
    "profile.verify_store": (False, set(), {}),
    "profile.twonn_fraction": (0.5, {"decimation"}, {}),
    "profile.gride_range_max": (8, set(), {}),
    "profile.decimation": (False, set(), {}),
    "profile.decimation_min_size": (50, {"decimation"}, {}),
    "profile.decimation_target_ratio": (2, set(), {"profile.id_estimator": "twonn_decimated"}),
    "profile.decimation_min_subset": (16, set(), {"profile.id_estimator": "twonn_decimated"}),
    "profile.id_estimator": ("twonn", set(), {}),
    "profile.gride_rank": (4, set(), {"profile.id_estimator": "gride"}),
    "profile.label_ks": ((3, 10, 16), set(), {}),
    "profile.overlap_k": (5, set(), {}),
    "profile.duplicates": ("error", set(), {}),
    "profile.selection_min_plateau": (5, set(), {}),
    "profile.selection_min_drop": (0.3, set(), {}),
    "profile.selection_min_rise": (0.01, set(), {}),
    "profile.selection_z": (0.5, set(), {}),
    "seed": (3, {"decimation"}, {}),
    "probe.enabled": (False, set(), {}),
    "probe.linear": (False, set(), {}),
    "probe.steps": (10, {"linear_probe"}, {}),
    "probe.test_fraction": (0.5, {"linear_probe"}, {}),
    "probe.knn_k": (5, {"knn_probe"}, {}),
    "probe.remote_homology": (True, {"knn_probe"}, {}),
    "probe.seed": (1, {"linear_probe"}, {}),
}


def test_every_profile_and_probe_option_is_covered():
    defaults = base.analysis_config()
    options = {f"{section}.{name}" for section in ("profile", "probe") for name in defaults[section]}
    assert options - set(CHANGES) == set(), "add the new option to CHANGES with a value that changes it"
    for option, (value, _, _) in CHANGES.items():
        section, name = option.split(".") if "." in option else (None, option)
        assert (defaults if section is None else defaults[section])[name] != value, option


@pytest.fixture
def counts(monkeypatch):
    """How often each cached computation ran."""
    calls = collections.Counter()

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(profile, "knn_graph", counting("graph", profile.knn_graph))
    monkeypatch.setattr(idjax, "twonn_decimation", counting("decimation", idjax.twonn_decimation))
    monkeypatch.setattr(probe, "linear_probe_accuracy", counting("linear_probe", probe.linear_probe_accuracy))
    monkeypatch.setattr(probe, "knn_accuracy", counting("knn_probe", probe.knn_accuracy))
    return calls


@pytest.fixture
def no_figures(monkeypatch):
    """Figures take most of a tiny run's time; they have their own test below."""
    monkeypatch.setattr(profile.report, "write_figures", lambda *args, **kwargs: [])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A workdir profiled with the small config (its store, its cache, its results)."""
    workdir = tmp_path_factory.mktemp("finished")
    make_store(store.store_dir(workdir))
    profile.run(small_config(), workdir)
    return workdir


def comparable(workdir):
    """results.json without what legitimately differs between two workdirs, and every array."""
    results = json.loads((workdir / "results.json").read_text())
    for key in ("profile_seconds", "wall_seconds", "figures", "_sha256"):  # timings, paths, their checksum
        results.pop(key, None)
    with np.load(workdir / "profile.npz") as npz:
        arrays = {name: npz[name] for name in npz.files}
    return results, arrays


def assert_same(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        np.testing.assert_array_equal(a[1][name], b[1][name], err_msg=name)


def run_or_error(config, workdir):
    try:
        profile.run(config, workdir)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize("option", sorted(CHANGES))
def test_rerun_with_a_changed_option_equals_a_fresh_run(option, finished, counts, no_figures, tmp_path):
    value, redone, base_overrides = CHANGES[option]
    rerun_dir, fresh_dir = tmp_path / "rerun", tmp_path / "fresh"
    shutil.copytree(finished, rerun_dir)
    shutil.copytree(store.store_dir(finished), store.store_dir(fresh_dir))
    config = small_config()
    for name, v in base_overrides.items():
        set_option(config, name, v)
    if base_overrides:  # the base run of this case differs from the shared finished workdir
        profile.run(config, rerun_dir)
    before = comparable(rerun_dir)
    set_option(config, option, value)
    counts.clear()
    error = run_or_error(config, rerun_dir)
    assert {name for name, n in counts.items() if n} == redone
    assert run_or_error(config, fresh_dir) == error
    if error is None:
        after = comparable(rerun_dir)
        assert_same(after, comparable(fresh_dir))
        assert after[0]["config"] != before[0]["config"]


def test_unchanged_rerun_recomputes_nothing(finished, counts, tmp_path):
    shutil.copytree(finished, tmp_path / "w")
    before = comparable(tmp_path / "w")
    profile.run(small_config(), tmp_path / "w")
    assert sum(counts.values()) == 0
    assert_same(comparable(tmp_path / "w"), before)


def test_options_that_change_numbers_do_change_them(finished, no_figures, tmp_path):
    """The comparisons above could not fail if an option did nothing: these change the numbers."""
    reference = comparable(finished)
    for option in ("profile.k_max", "profile.twonn_fraction", "profile.gride_range_max", "profile.label_ks",
                   "profile.decimation_min_size", "seed", "probe.steps", "probe.knn_k"):
        workdir = tmp_path / option
        shutil.copytree(finished, workdir)
        config = small_config()
        set_option(config, option, CHANGES[option][0])
        profile.run(config, workdir)
        results, arrays = comparable(workdir)
        changed = [name for name in arrays if name in reference[1] and
                   (arrays[name].shape != reference[1][name].shape or not np.array_equal(arrays[name],
                                                                                        reference[1][name]))]
        assert changed, option


def test_reextraction_invalidates_the_cache(finished, counts, no_figures, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    # Fewer points, same store description (so the same fingerprint): the content decides.
    shutil.rmtree(store.store_dir(workdir))
    make_store(store.store_dir(workdir), n=120)
    make_store(store.store_dir(tmp_path / "fresh"), n=120)
    counts.clear()
    profile.run(small_config(), workdir)
    assert counts["graph"] == N_LAYERS and counts["decimation"] == N_LAYERS
    assert counts["linear_probe"] == counts["knn_probe"] == 1
    profile.run(small_config(), tmp_path / "fresh")
    assert_same(comparable(workdir), comparable(tmp_path / "fresh"))
    assert comparable(workdir)[0]["n_points"] == 119

    # Same number of points, one layer's values changed (a re-extraction, since the store is checksummed):
    # only that layer's graph is redone.
    shutil.rmtree(store.store_dir(workdir))
    make_store(store.store_dir(workdir), n=120, scale_layer_1=2.0)
    counts.clear()
    profile.run(small_config(), workdir)
    assert counts["graph"] == 1 and counts["decimation"] == 1


def test_a_mismatched_or_unreadable_cache_entry_is_never_read(finished, counts, no_figures, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    cache = workdir / "profile_layers"
    shutil.copy(cache / "layer_000_graph.npz", cache / "layer_001_graph.npz")  # another layer's graph
    (cache / "layer_002_ids.npz").write_bytes(b"truncated")
    counts.clear()
    profile.run(small_config(), workdir)
    assert counts["graph"] == 1
    assert_same(comparable(workdir), comparable(finished))


def test_figures_follow_the_results(finished, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    assert (workdir / "label_overlap.png").exists()
    shutil.rmtree(store.store_dir(workdir))
    make_store(store.store_dir(workdir), labels=False)
    results = profile.run(small_config(), workdir)
    assert not (workdir / "label_overlap.png").exists()
    assert all((workdir / name).exists() for name in ("id_profile.png", "adjacent_overlap.png"))
    assert json.loads((workdir / "results.json").read_text())["figures"] == results["figures"]
    assert (finished / "label_overlap.png").exists()  # the workdir it was copied from keeps its own
