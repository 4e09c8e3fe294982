"""Sweeps: entries with one extraction fingerprint share a store, job-array entries and --summarize.

The model is a researcher's own numpy encoder written to tmp_path that appends one line to a file per
`pooled_states` call, so the number of model calls across a whole sweep is counted from outside.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from configs import base
from experiments import cli, extract, files, store
from tests.conftest import REPO_ROOT
from tests.test_pipeline import tiny_igpt_config

COUNTING_MODEL = textwrap.dedent('''
    """Three tanh layers over the 64 pixels of a digit; every pooled_states call is logged to a file."""
    import os

    import numpy as np


    class Encoder:
        num_layers = 3
        description = {"name": "counting numpy net", "width": 24}

        def __init__(self):
            rng = np.random.default_rng(0)
            self.weights = [rng.normal(0, 0.3, (64, 24))] + [rng.normal(0, 0.3, (24, 24)) for _ in range(3)]

        def prepare_batch(self, images):
            return np.asarray(images, np.float64).reshape(len(images), -1) / 16.0

        def pooled_states(self, x):
            with open(os.environ["COUNT_FILE"], "a") as f:
                f.write(f"{len(x)}\\n")
            h = x @ self.weights[0]
            states = [h]
            for w in self.weights[1:]:
                h = np.tanh(h @ w) + h
                states.append(h)
            return np.stack(states).astype(np.float32)


    def make_encoder():
        return Encoder()
''')

SWEEP_FILE = textwrap.dedent('''
    from configs import base


    def get_config(arg=None):
        config = base.analysis_config()
        config.model.encoder = "user_count.net:make_encoder"
        config.data.name = "digits"
        config.data.max_examples = 200
        config.extract.batch_size = 100
        config.profile.gride_range_max = 16
        config.profile.label_ks = (5,)
        config.profile.overlap_k = 5
        config.profile.decimation = False
        config.probe.steps = 20
        return config


    def get_sweep(arg=None):
        return [{"name": f"k{k}", "overrides": {"profile.k_max": k}} for k in (8, 16)]
''')

TIMINGS = ("wall_seconds", "profile_seconds", "provenance")


def _launch(tmp_path: pathlib.Path, workdir: str, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{tmp_path / 'user'}",
               COUNT_FILE=str(tmp_path / f"{workdir}.calls"))
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), f"--config={tmp_path / 'sweep_file.py'}",
                           f"--workdir={tmp_path / workdir}", "--sweep", *flags],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def _calls(tmp_path: pathlib.Path, workdir: str) -> int:
    return len((tmp_path / f"{workdir}.calls").read_text().splitlines())


def _results(path: pathlib.Path) -> dict:
    """results.json without timings, its figures by name (the sweep directories differ)."""
    results = files.read_json(path, fix="")
    results["figures"] = [pathlib.Path(f).name for f in results["figures"]]
    return {key: value for key, value in results.items() if key not in TIMINGS}


@pytest.mark.slow
def test_k_max_sweep_extracts_once_and_job_array_equals_one_sweep(tmp_path):
    (tmp_path / "user" / "user_count").mkdir(parents=True)
    (tmp_path / "user" / "user_count" / "__init__.py").write_text("")
    (tmp_path / "user" / "user_count" / "net.py").write_text(COUNTING_MODEL)
    (tmp_path / "sweep_file.py").write_text(SWEEP_FILE)

    out = _launch(tmp_path, "whole")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _calls(tmp_path, "whole") == 2  # 200 digits in batches of 100: one extraction for both entries
    whole = tmp_path / "whole"
    stores = list((whole / "stores").iterdir())
    assert len(stores) == 1 and store.is_complete(stores[0] / "representations")
    assert not (whole / "k8" / "representations").exists() and not (whole / "k16" / "representations").exists()
    k8, k16 = (_results(whole / name / "results.json") for name in ("k8", "k16"))
    assert k8["representations"] == k16["representations"]
    assert k8["representations"]["path"] == f"../stores/{stores[0].name}/representations"
    # k_max changes the graph's depth only: what the nearest neighbours give is identical, the GRIDE
    # scales beyond rank 8 exist only with k_max=16, and with them the default GRIDE rank (largest <= 64).
    assert k8["estimator_agreement"]["id"]["twonn"] == k16["estimator_agreement"]["id"]["twonn"]
    assert k8["label_overlap"] == k16["label_overlap"]
    assert k8["estimator_agreement"]["gride_rank"] == 8 and k16["estimator_agreement"]["gride_rank"] == 16
    assert k8["id"] != k16["id"]
    assert k8["probes"] == k16["probes"]  # probes read the store, not the graph

    # The same sweep as a job array: entry by entry, summarised (first with one entry missing).
    out = _launch(tmp_path, "array", "--sweep_index=0", "--sweep_count=2")
    assert out.returncode == 0, out.stderr[-3000:]
    out = _launch(tmp_path, "array", "--summarize")
    assert out.returncode == 0, out.stderr[-3000:]
    partial = json.loads((tmp_path / "array" / "sweep.json").read_text())
    assert [r["name"] for r in partial["runs"]] == ["k8"] and partial["missing"] == ["k16"]
    assert "Missing (no results.json yet): k16" in (tmp_path / "array" / "sweep.md").read_text()
    out = _launch(tmp_path, "array", "--sweep_index=1", "--sweep_count=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _calls(tmp_path, "array") == 2  # the second task found the store complete
    out = _launch(tmp_path, "array", "--summarize")
    assert out.returncode == 0, out.stderr[-3000:]
    assert _calls(tmp_path, "array") == 2  # summarising runs nothing

    array = tmp_path / "array"
    summary = json.loads((array / "sweep.json").read_text())
    assert summary == json.loads((whole / "sweep.json").read_text())
    assert summary["missing"] == [] and [r["name"] for r in summary["runs"]] == ["k8", "k16"]
    assert (array / "sweep.md").read_text() == (whole / "sweep.md").read_text()
    for name in ("k8", "k16"):
        assert _results(array / name / "results.json") == _results(whole / name / "results.json")
    for figure in summary["figures"]:
        assert (array / figure).stat().st_size > 10_000


def _igpt_config(k_max: int):
    """The pipeline tests' tiny random iGPT on 60 digits, extraction only, at `k_max`."""
    config = tiny_igpt_config(60)
    config.experiment = "extract"
    config.profile.k_max = k_max
    return config


@pytest.mark.slow
def test_entries_share_the_store_and_its_fitted_palette(tmp_path, monkeypatch):
    from models import palette

    fits = []
    fit = palette.fit_palette
    monkeypatch.setattr(palette, "fit_palette", lambda *a, **kw: fits.append(1) or fit(*a, **kw))
    for name, k_max in (("a", 8), ("b", 16)):
        config = _igpt_config(k_max)
        cli.share_store(config, tmp_path / name, tmp_path)
        extract.run(config, tmp_path / name)
    assert len(fits) == 1  # one k-means for both entries
    (home,) = (tmp_path / cli.SHARED_STORES).iterdir()
    assert (home / "palette.npy").is_file() and not list(tmp_path.glob("[ab]/palette.npy"))
    assert store.store_dir(tmp_path / "a") == tmp_path / "a" / f"../stores/{home.name}/representations"
    # Another model is another fingerprint, hence another store.
    other = _igpt_config(8)
    other.model.seed = 1
    cli.share_store(other, tmp_path / "c", tmp_path)
    assert store.store_dir(tmp_path / "c").parent.name != home.name


def test_job_array_flags_are_checked_against_the_sweep():
    assert cli.chosen_entries(3, None, None, "get_sweep") == [0, 1, 2]
    assert cli.chosen_entries(3, 2, 3, "get_sweep") == [2]
    with pytest.raises(cli.UserError, match="--sweep_count=4, but get_sweep lists 3 entries"):
        cli.chosen_entries(3, 0, 4, "get_sweep")
    with pytest.raises(cli.UserError, match="--sweep_index=3 is outside 0..2"):
        cli.chosen_entries(3, 3, None, "get_sweep")
    with pytest.raises(cli.UserError, match="--sweep_count is given without --sweep_index"):
        cli.chosen_entries(3, None, 3, "get_sweep")


def test_sweep_entry_names_are_unique_directories(tmp_path):
    config_file = tmp_path / "c.py"
    config_file.write_text(SWEEP_FILE.replace('f"k{k}"', '"stores"'))
    with pytest.raises(cli.UserError, match="name 'stores' must be a unique directory name"):
        cli.sweep_configs(base.analysis_config(), str(config_file))


HOLD_LOCK = textwrap.dedent('''
    import pathlib, sys, time
    from experiments import files
    with files.workdir_lock(sys.argv[1], "extract"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
        pathlib.Path(sys.argv[3]).write_text("released")  # just before the lock is
''')


@pytest.mark.slow
def test_a_job_reaching_a_store_being_extracted_waits_then_uses_it(tmp_path, monkeypatch, caplog):
    (tmp_path / "user" / "user_wait").mkdir(parents=True)
    (tmp_path / "user" / "user_wait" / "__init__.py").write_text("")
    (tmp_path / "user" / "user_wait" / "net.py").write_text(COUNTING_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path / "user"))
    monkeypatch.setenv("COUNT_FILE", str(tmp_path / "calls"))
    config = base.analysis_config()
    config.experiment = "extract"
    config.model.encoder = "user_wait.net:make_encoder"
    config.data.name = "digits"
    config.data.max_examples = 100
    config.extract.batch_size = 50
    cli.share_store(config, tmp_path / "a", tmp_path)
    cli.share_store(config, tmp_path / "b", tmp_path)
    home = store.store_dir(tmp_path / "a").parent.resolve()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(home), "3", str(tmp_path / "released")],
                              cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another job is extracting this store
        with caplog.at_level("INFO"):
            extract.run(config, tmp_path / "a")  # waits for it, then extracts (the holder wrote nothing)
        assert "another job is extracting it" in caplog.text  # said only by a job that waits (below: not)
        assert (tmp_path / "released").is_file()  # it did wait for the holder
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
        holder.wait()
    assert len((tmp_path / "calls").read_text().splitlines()) == 2
    caplog.clear()
    with caplog.at_level("INFO"):
        extract.run(config, tmp_path / "b")
    assert len((tmp_path / "calls").read_text().splitlines()) == 2  # found complete: no model call
    assert "already complete" in caplog.text and "another job is extracting it" not in caplog.text
    other = config.copy_and_resolve_references()
    other.data.max_examples = 60  # another store, which nobody holds: extracted at once, without "waiting"
    cli.share_store(other, tmp_path / "c", tmp_path)
    caplog.clear()
    with caplog.at_level("INFO"):
        extract.run(other, tmp_path / "c")
    assert store.is_complete(store.store_dir(tmp_path / "c")) and "another job is extracting it" not in caplog.text
