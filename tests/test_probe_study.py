"""The probe study as a launch.py experiment: three stores (trained, untrained, features), probes from them."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import base, probe_study, train_esm2_tiny, train_igpt_tiny
from experiments import files, store, train, train_data
from experiments import probe_study as study
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def _train(config, workdir):
    config.train.progress_bar = False
    config.checkpoint.keep_steps = (0,)  # the initialisation, for checking the untrained store against it
    config.checkpoint.async_save = False
    train.run(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def igpt_workdir(tmp_path_factory):
    c = train_igpt_tiny.get_config()
    c.model.num_layers, c.model.embed_dim, c.model.num_heads = 2, 32, 2
    c.data.max_train_examples, c.data.max_eval_examples = 300, 100
    c.train.steps, c.train.batch_size, c.train.eval_batch_size, c.train.warmup_steps = 20, 16, 50, 5
    c.train.log_interval, c.train.eval_interval, c.checkpoint.interval = 10, 20, 20
    return _train(c, tmp_path_factory.mktemp("igpt_train"))


def _pooled_igpt(workdir, step, images):
    from models import igpt, palette

    model, params, _ = train.load_trained(workdir, step=step)
    tokens = igpt.add_start_token(palette.quantize(images, palette.load_palette(workdir / "palette.npy")),
                                  model.config.start_token)
    return np.asarray(igpt.pooled_hidden_states(model, params, tokens))


def test_igpt_study_through_launch(igpt_workdir, tmp_path):
    out = tmp_path / "study"
    args = [sys.executable, str(REPO_ROOT / "launch.py"), f"--config=configs/probe_study.py:{igpt_workdir}",
            f"--workdir={out}", "--config.probe.steps=40"]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    run = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    result = files.read_json(out / "probe_study.json", fix="rerun", require_checksum=True)
    assert (result["family"], result["n_train"], result["n_test"], result["k"]) == ("igpt", 300, 100, 10)
    for name in ("trained", "untrained"):
        assert {len(v) for v in result[name].values()} == {3}  # embeddings + 2 blocks
    assert {len(v) for v in result["pixels"].values()} == {1}
    for figure in result["figures"]:
        assert os.path.getsize(figure) > 10_000

    # The stores hold what the models compute on the training run's own split: held-out images after the
    # training ones; the untrained store is the step-0 checkpoint (the initialisation training started from).
    train_split, held_out = train_data.load_image_splits(train.load_config(igpt_workdir).data)
    reps = {name: store.load(store.store_dir(out / name)) for name in ("trained", "untrained", "features")}
    rows = slice(300, 305)
    for name, step in (("trained", None), ("untrained", 0)):
        direct = _pooled_igpt(igpt_workdir, step, held_out.images[:5])
        np.testing.assert_allclose(np.stack([layer[rows] for layer in reps[name].layers]), direct, rtol=1e-5,
                                   atol=1e-6)
    # The pixel baseline: each pixel's nearest palette colour, its red channel as 8-bit grey.
    colours = np.load(igpt_workdir / "palette.npy")
    pixels = held_out.images[:5].reshape(5, -1, 3).astype(np.float64) / 127.5 - 1
    nearest = np.argmin(((pixels[:, :, None, :] - colours[None, None]) ** 2).sum(-1), axis=-1)
    np.testing.assert_array_equal(reps["features"].layers[0][rows], np.rint(127.5 * (colours[nearest, 0] + 1)))
    assert list(reps["trained"].labels[:300]) == list(np.unique(train_split.labels, return_inverse=True)[1])

    # A rerun finds every store complete and gives the same numbers.
    again = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipping extraction" in again.stderr
    second = files.read_json(out / "probe_study.json", fix="rerun", require_checksum=True)
    assert all(second[k] == result[k] for k in ("trained", "untrained", "pixels", "stores"))


def _small_scope(shared_data, path):
    """Domains of classes a and b from the real ASTRAL file: 4 superfamilies of >= 2 families, 12 domains
    each at most, plus a few singles; (sid, sequence, sccs) of each."""
    text = (shared_data / "protein" / "astral-scopedom-seqres-gd-sel-gs-bib-40-2.07.fa").read_text()
    records = []
    for block in text.split(">")[1:]:
        header, *lines = block.splitlines()
        sid, sccs = header.split()[:2]
        records.append((sid, "".join(lines), sccs, header))
    by_superfamily = collections.defaultdict(list)
    for r in records:
        by_superfamily[".".join(r[2].split(".")[:3])].append(r)
    chosen = []
    for cls in "ab":
        picked = 0
        for superfamily, members in sorted(by_superfamily.items()):
            families = {".".join(m[2].split(".")) for m in members[:12]}
            if superfamily.startswith(cls + ".") and len(families) >= 2 and picked < 2:
                chosen += members[:12]
                picked += 1
    chosen += [r for r in records if r[2].startswith("c.")][:8]
    path.write_text("".join(f">{h}\n{s}\n" for _, s, _, h in chosen))
    return chosen


def test_esm2_study_on_scope(shared_data, tmp_path):
    c = train_esm2_tiny.get_config()
    c.data.fasta = str(shared_data / "protein" / "UP000000625_83333.fasta")
    c.model.num_layers, c.model.embed_dim, c.model.num_heads = 2, 32, 2
    c.data.max_residues, c.data.max_sequences, c.data.max_eval_examples = 30, 200, 32
    c.train.steps, c.train.batch_size, c.train.eval_batch_size, c.train.warmup_steps = 10, 16, 32, 2
    c.train.log_interval, c.train.eval_interval, c.checkpoint.interval = 5, 10, 10
    workdir = _train(c, tmp_path / "train")
    chosen = _small_scope(shared_data, tmp_path / "small.fa")

    config = probe_study.get_config(str(workdir))
    assert config.model.family == "esm2"
    config.data.path = str(tmp_path / "small.fa")
    config.study.min_superfamily_members = 5
    config.study.classes = "abc"
    config.probe.steps = 30
    config.probe.knn_k = 3
    result = study.run(config, tmp_path / "study")

    classes = [sccs[0] for _, _, sccs, _ in chosen]
    assert result["n_class_domains"] == sum(c in "abc" for c in classes)
    assert result["class_counts"] == [classes.count(c) for c in "abc"]
    superfamily = [".".join(s.split(".")[:3]) for _, _, s, _ in chosen]
    family = [".".join(s.split(".")[:4]) for _, _, s, _ in chosen]
    remote = [sf for sf in superfamily if superfamily.count(sf) >= 5
              and len({f for f, s in zip(family, superfamily, strict=True) if s == sf}) >= 2]
    assert result["n_remote_domains"] == len(remote) and result["max_residues"] == 30
    for name in ("trained", "untrained"):
        assert len(result[name]["class"]["linear_probe"]) == 3
        assert len(result[name]["superfamily_remote"]["knn_accuracy_family_excluded"]) == 3
    assert len(result["aa_composition"]["class"]["linear_probe"]) == 1

    # Amino-acid composition, counted here letter by letter.
    features = store.load(store.store_dir(tmp_path / "study" / "features")).layers[0]
    for row, (_, sequence, _, _) in enumerate(chosen[:5]):
        counts = collections.Counter(ch for ch in sequence.upper() if ch in "ACDEFGHIKLMNPQRSTVWY")
        expected = [counts[ch] / max(sum(counts.values()), 1) for ch in "ACDEFGHIKLMNPQRSTVWY"]
        np.testing.assert_allclose(features[row], expected, rtol=1e-6)
    # The untrained store is the step-0 checkpoint's network (sequences cropped to the 30 residues it trained on).
    from models import esm2, protein_tokenizer

    model, params, _ = train.load_trained(workdir, step=0)
    reps = store.load(store.store_dir(tmp_path / "study" / "untrained"))
    tokens = protein_tokenizer.tokenize(chosen[0][1], unknown="X", long_policy="crop", max_residues=30).pieces[0]
    direct = np.asarray(esm2.pooled_hidden_states(model, params, np.asarray([tokens], np.int32)))[:, 0]
    np.testing.assert_allclose(np.stack([layer[0] for layer in reps.layers]), direct, rtol=1e-4, atol=1e-5)
    json.dumps(result)  # JSON-able as written

    config.model.family = "igpt"
    with pytest.raises(ValueError, match="holds an esm2 model"):
        study.run(config, tmp_path / "study2")


def test_study_config_is_described_by_the_schema():
    from experiments import config_schema

    config = probe_study.get_config("/nonexistent")
    assert config_schema.problems(config) == []
    assert set(config_schema.flatten(config)) <= set(config_schema.schema_for(config))
    config.study.classes = "xyz"
    assert "study.classes" in " ".join(config_schema.problems(config))
    assert base.analysis_config().get("study") is None


def test_export_writes_checkpoints_the_orbax_source_reads_and_the_heldout_split(igpt_workdir, tmp_path):
    """`experiments.export`: every kept step as the family's Orbax checkpoint with its palette, the run's records
    beside them; `data.heldout_of` on the export keeps exactly the images the run did not train on."""
    from experiments import datasets, export
    from models import igpt, palette, registry

    out = tmp_path / "export"
    assert export.export(igpt_workdir, out) == [0, 20]  # keep_steps (0,) plus the final checkpoint
    assert export.exported_steps(out) == [0, 20]
    for step in (0, 20):
        config, params = registry.load("igpt", "orbax", str(export.step_dir(out, step)))
        model, trained, _ = train.load_trained(igpt_workdir, step=step)
        assert config == model.config
        for (path, a), b in zip(jax_leaves(params), jax_leaves(trained, values_only=True), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)
        kind, found = igpt.palette_source("orbax", str(export.step_dir(out, step)), None)
        assert kind == "checkpoint"
        np.testing.assert_array_equal(palette.load_palette(found), np.load(igpt_workdir / "palette.npy"))
    for name in ("config.json", "model_config.json", "data_split.json", "metrics.jsonl"):
        assert (out / name).read_bytes() == (igpt_workdir / name).read_bytes()

    data = train.load_config(igpt_workdir).data
    train_split, _ = train_data.load_image_splits(data)
    config = base.analysis_config()
    config.data.update(name="digits", heldout_of=str(out))
    held = datasets.load_examples(config.data)
    assert len(held) == 1797 - 300 and not set(held.ids) & set(train_split.ids)
    with pytest.raises(FileNotFoundError, match="none of the kept steps"):
        export.export(_without_checkpoints(igpt_workdir, tmp_path), tmp_path / "other")


def jax_leaves(tree, values_only=False):
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [value for _, value in leaves] if values_only else [(jax.tree_util.keystr(p), v) for p, v in leaves]


def _without_checkpoints(workdir, tmp_path):
    import shutil

    copy = tmp_path / "no_checkpoints"
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "checkpoints").mkdir()
    return copy
