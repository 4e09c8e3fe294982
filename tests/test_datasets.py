"""Datasets: the built-in loaders and the researcher's own `data.source` through one protocol."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import base
from experiments import datasets, extract, store
from tests.conftest import REPO_ROOT

# A researcher's package, written into tmp_path: digits as images (8x8 grayscale) with their labels, and
# loaders that get something wrong, one mistake each.
USER_PACKAGE = textwrap.dedent('''
    import os

    import numpy as np
    from sklearn.datasets import load_digits

    from experiments.datasets import Examples


    def digits(config):
        data = load_digits()
        images = np.rint(data.images * (255 / 16)).astype(np.uint8)[..., None]
        first = int(os.environ.get("MYDATA_FIRST", "0"))  # lets a test change the data
        return Examples(images[first:], data.target[first:], ids=[f"img{i}" for i in range(first, len(images))],
                        label_names=[str(d) for d in range(10)], description={"origin": "sklearn digits"})


    def texts(config):
        return Examples(["a cat", "a dog", "the cat", "the dog", "one cat", "one dog"], [0, 1, 0, 1, 0, 1],
                        label_names=["cat", "dog"])


    def a_tuple(config):
        return ["a", "b", "c"], [0, 1, 0]


    def short_labels(config):
        return Examples(["a", "b", "c", "d"], [0, 1, 0])


    def float_labels(config):
        return Examples(["a", "b", "c", "d"], [0.5, 1.0, 0.0, 1.0])


    def string_labels(config):
        return Examples(["a", "b", "c", "d"], ["x", "y", "x", "y"])


    def two_examples(config):
        return Examples(["a", "b"], [0, 1])


    def unnamed_code(config):
        return Examples(["a", "b", "c"], [0, 1, 2], label_names=["x", "y"])


    NOT_A_FUNCTION = 3
''')


@pytest.fixture()
def user_package(tmp_path, monkeypatch):
    package = tmp_path / "mydata"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "loaders.py").write_text(USER_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def data_config(**values):
    config = base.analysis_config()
    config.data.update(values)
    return config.data


def test_user_source_loads_checks_and_selects(user_package):
    examples = datasets.load_examples(data_config(source="mydata.loaders:digits", max_examples=100, seed=3))
    assert len(examples) == 100 and examples.inputs.shape == (100, 8, 8, 1)
    # The selection knobs act on the user's data exactly as on a built-in dataset's.
    keep = np.sort(np.random.default_rng(3).choice(1797, 100, replace=False))
    from sklearn.datasets import load_digits

    assert examples.ids == tuple(f"img{i}" for i in keep)
    np.testing.assert_array_equal(examples.labels, np.unique(load_digits().target[keep], return_inverse=True)[1])
    assert examples.description == {"dataset": "mydata.loaders:digits", "origin": "sklearn digits", "n": 100}
    texts = datasets.load_examples(data_config(source="mydata.loaders:texts", per_class=2))
    assert len(texts) == 4 and set(texts.ids) <= {str(i) for i in range(6)}
    assert texts.label_names == ("cat", "dog") and sorted(texts.labels.tolist()) == [0, 0, 1, 1]


@pytest.mark.parametrize("source, needles", [
    ("nosuchpackage.loaders:load", ["cannot import module 'nosuchpackage.loaders'", "PYTHONPATH"]),
    ("mydata.loaders:nothing", ["has no attribute 'nothing'", "digits", "texts"]),
    ("mydata.loaders:NOT_A_FUNCTION", ["is a int, not a callable", "load(data_config)"]),
    ("mydata.loaders", ["must be 'package.module:callable'", "load(data_config)"]),
    ("mydata.loaders:a_tuple", ["returned a tuple", "Examples("]),
    ("mydata.loaders:short_labels", ["labels have shape (3,)", "4 examples"]),
    ("mydata.loaders:float_labels", ["labels must be integer codes", "float64", "label_names"]),
    ("mydata.loaders:string_labels", ["labels must be integer codes", "np.unique"]),
    ("mydata.loaders:unnamed_code", ["label code 2 has no name"]),
    ("mydata.loaders:two_examples", ["2 left after selection", "need at least 3"]),
])
def test_user_source_errors_name_the_problem(user_package, source, needles):
    with pytest.raises(ValueError) as err:
        datasets.load_examples(data_config(source=source))
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    assert source in str(err.value)


def test_changed_user_data_is_not_read_as_the_old_store(user_package, monkeypatch, tmp_path):
    """The data the source returns is part of the store's fingerprint: other ids or labels under the same
    config are refused rather than profiled as the old representations."""
    config = base.analysis_config()
    config.model.update(family="igpt", source="random", size="tiny", seed=0)
    config.model.overrides = {"vocab_size": 17, "n_positions": 64}
    config.data.update(source="mydata.loaders:digits", max_examples=40)
    config.extract.batch_size = 40
    workdir = tmp_path / "wd"
    first = extract.run(config, workdir)
    assert extract.run(config, workdir)["fingerprint"] == first["fingerprint"]  # unchanged: reused
    monkeypatch.setenv("MYDATA_FIRST", "1")
    with pytest.raises(store.StoreError, match="different model or dataset"):
        extract.run(config, workdir)


def test_user_source_through_launch_to_results_and_figures(user_package, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(user_package)]))
    args = ["--config=configs/igpt.py:tiny", "--config.data.source=mydata.loaders:digits",
            "--config.data.max_examples=150", "--config.extract.batch_size=75", "--config.profile.k_max=8",
            "--config.profile.gride_range_max=8", "--config.profile.gride_rank=8", "--config.profile.label_ks=(5,)",
            "--config.profile.overlap_k=5", "--config.profile.decimation=False", "--config.probe.steps=20"]
    out = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), *args, f"--workdir={tmp_path / 'wd'}"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "wd" / "results.json").read_text())
    assert results["data"] == {"dataset": "mydata.loaders:digits", "origin": "sklearn digits", "n": 150}
    assert results["n_points"] <= 150 and len(results["id"]) == 5  # configs/igpt.py:tiny has 4 blocks
    assert results["label_names"] == [str(d) for d in range(10)]
    assert len(results["probes"]["linear_probe_accuracy"]) == 5
    for figure in results["figures"]:
        assert pathlib.Path(figure).stat().st_size > 10_000
    assert json.loads((tmp_path / "wd" / "representations" / "ids.json").read_text())[:1][0].startswith("img")

    # An unimportable source fails before any work, in two lines naming it and the fix.
    out = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "--config=configs/igpt.py:tiny",
                          "--config.data.source=mydata.missing:load", f"--workdir={tmp_path / 'wd2'}"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    last = out.stderr.strip().splitlines()[-2:]
    assert out.returncode != 0 and last[0].startswith("error: ") and "mydata.missing" in last[0], out.stderr
    assert "PYTHONPATH" in last[0] and not (tmp_path / "wd2" / "representations").exists()


def _read_scope_headers(path: pathlib.Path) -> list[tuple[str, str, str]]:
    """(sid, superfamily, family) of every ASTRAL record, read here from the FASTA headers alone."""
    out = []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            sid, sccs = line[1:].split()[:2]
            parts = sccs.split(".")
            out.append((sid, ".".join(parts[:3]), ".".join(parts[:4])))
    return out


def test_scope_gives_the_same_domains_and_labels_as_before(shared_data):
    """configs/esm2.py's selection (superfamilies with >= 20 domains, 40 of each, seed 0), recomputed
    from an independent read of the FASTA with the selection the pipeline has always used: classes in
    sorted name order, a seeded permutation of each class's members, the first 40 kept."""
    fasta = shared_data / "protein" / "astral-scopedom-seqres-gd-sel-gs-bib-40-2.07.fa"
    records = _read_scope_headers(fasta)
    names = sorted({sf for _, sf, _ in records})
    codes = np.array([names.index(sf) for _, sf, _ in records])
    counts = np.bincount(codes)
    rng = np.random.default_rng(0)
    keep = np.flatnonzero(counts[codes] >= 20)
    keep = np.sort(np.concatenate([rng.permutation(keep[codes[keep] == c])[:40] for c in np.unique(codes[keep])]))

    examples = datasets.load_examples(data_config(name="scope", path=str(fasta), label="superfamily",
                                                  min_class_size=20, per_class=40))
    assert examples.ids == tuple(records[i][0] for i in keep)
    assert [examples.label_names[c] for c in examples.labels] == [records[i][1] for i in keep]
    families = [records[i][2] for i in keep]
    same_family = np.equal.outer(examples.groups, examples.groups)
    assert (same_family == np.equal.outer(np.array(families), np.array(families))).all()
    assert len(examples) == 5317  # the README's ESM-2 run


def test_digits_gives_the_same_images_and_labels_as_before():
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.sort(np.random.default_rng(0).choice(len(data.target), 150, replace=False))
    examples = datasets.load_examples(data_config(name="digits", max_examples=150))
    assert examples.ids == tuple(f"digits:{i}" for i in keep)
    assert [examples.label_names[c] for c in examples.labels] == [str(d) for d in data.target[keep]]
    np.testing.assert_array_equal(examples.inputs[..., 0], np.rint(data.images[keep] * (255 / 16)).astype(np.uint8))


def test_unknown_builtin_name_lists_the_datasets():
    with pytest.raises(ValueError, match="scope, uniprot, digits.*data.source"):
        datasets.load_examples(data_config(name="nosuch"))


def test_heldout_of_keeps_only_what_the_training_run_never_saw(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    trained = [f"digits:{i}" for i in range(0, 1797, 3)]  # every third image was a training example
    (run / "data_split.json").write_text(json.dumps({"train_ids": trained}))
    examples = datasets.load_examples(data_config(name="digits", heldout_of=str(run)))
    assert examples.ids == tuple(f"digits:{i}" for i in range(1797) if i % 3)
    assert examples.description["heldout_of"]["train_ids"] == len(trained)
    # The selection knobs then choose among the held-out examples only.
    few = datasets.load_examples(data_config(name="digits", heldout_of=str(run), max_examples=50))
    assert len(few) == 50 and set(few.ids) <= set(examples.ids)


def test_heldout_of_refuses_a_missing_record_and_a_dataset_the_run_did_not_train_on(tmp_path):
    with pytest.raises(datasets.DataSourceError, match="no data_split.json"):
        datasets.load_examples(data_config(name="digits", heldout_of=str(tmp_path)))
    (tmp_path / "data_split.json").write_text(json.dumps({"val_ids": []}))
    with pytest.raises(datasets.DataSourceError, match="no list 'train_ids'"):
        datasets.load_examples(data_config(name="digits", heldout_of=str(tmp_path)))
    (tmp_path / "data_split.json").write_text(json.dumps({"train_ids": ["mnist_t10k:0", "mnist_t10k:1"]}))
    with pytest.raises(datasets.DataSourceError, match="none of the 1797 ids.*'digits:0'.*2 training ids"):
        datasets.load_examples(data_config(name="digits", heldout_of=str(tmp_path)))
