"""Training: held-out loss decreases on real data, exact resumption after a kill, ESM masking statistics."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import train_esm2_tiny, train_igpt_tiny
from experiments import train
from models import protein_tokenizer as ptok

REPO = pathlib.Path(__file__).resolve().parents[1]


# One config per family, shared by the loss test and the resume test so the compiled steps are reused.
STEPS, CKPT_EVERY, KILL_AT = 80, 40, 60


def _esm_config(shared_data: pathlib.Path):
    c = train_esm2_tiny.get_config()
    c.data.fasta = str(shared_data / "protein" / "UP000000625_83333.fasta")
    c.model.num_layers, c.model.embed_dim, c.model.num_heads = 2, 32, 2
    c.data.max_residues = 30
    c.data.max_eval_examples = 64
    c.train.steps, c.train.batch_size, c.train.eval_batch_size = STEPS, 16, 32
    c.train.learning_rate, c.train.warmup_steps = 3e-3, 10
    c.train.log_interval, c.train.eval_interval = 10, CKPT_EVERY
    c.train.progress_bar = False
    c.checkpoint.interval = CKPT_EVERY
    c.checkpoint.async_save = False  # the kill below must come after the step-40 save is committed
    return c


def _igpt_config():
    c = train_igpt_tiny.get_config()  # sklearn digits: bundled with scikit-learn, always available
    c.model.num_layers, c.model.embed_dim, c.model.num_heads = 2, 32, 2
    c.data.max_eval_examples = 128
    c.train.steps, c.train.batch_size, c.train.eval_batch_size = STEPS, 16, 64
    c.train.learning_rate, c.train.warmup_steps = 3e-3, 10
    c.train.log_interval, c.train.eval_interval = 10, CKPT_EVERY
    c.train.progress_bar = False
    c.checkpoint.interval = CKPT_EVERY
    c.checkpoint.keep_steps = (0, 10)  # kept beyond max_to_keep = 3 (step 0: the untrained control)
    return c


def _evals(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train.read_metrics(workdir) if r["kind"] == "eval"}


def _checkpoint_state(workdir: pathlib.Path, step: int) -> dict:
    with ocp.CheckpointManager((workdir / "checkpoints").absolute(), item_names=("state", "data")) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def _assert_trees_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _require_deterministic_backend() -> None:
    # XLA:CPU is deterministic; on GPU the embedding gradients' scatter-adds use atomics unless asked not to.
    if jax.default_backend() != "cpu" and "--xla_gpu_deterministic_ops=true" not in os.environ.get("XLA_FLAGS", ""):
        pytest.skip("bit-identical resume on an accelerator needs XLA_FLAGS=--xla_gpu_deterministic_ops=true")


def _same_log(a: pathlib.Path, b: pathlib.Path) -> None:
    strip = lambda recs: [(r["kind"], r["step"], r["loss"], r.get("grad_norm")) for r in recs]
    assert strip(train.read_metrics(a)) == strip(train.read_metrics(b))


def test_esm2_loss_decreases_and_resumes_bit_identically_after_sigkill(shared_data, tmp_path):
    """Masked-LM on the E. coli proteome: held-out loss falls; a run SIGKILLed (in a child process) at
    step 60, after the checkpoint at step 40, resumes to the same step-80 state bit for bit (params,
    optimizer, RNG) and logs the same losses (so the masking RNG and data position were restored)."""
    _require_deterministic_backend()
    config = _esm_config(shared_data)
    full, killed = tmp_path / "full", tmp_path / "killed"
    result = train.run(config, full)
    evals = _evals(full)
    assert result["final_step"] == STEPS and set(evals) == {0, CKPT_EVERY, STEPS}
    # From a random init (above ln 33) to below ln 20, the uniform guess over the standard amino acids.
    assert evals[STEPS] < evals[0] - 0.5
    assert evals[STEPS] < math.log(20)
    assert result["data"]["duplicates_removed"] > 0  # exact duplicates never straddle the split
    split = json.loads((full / "data_split.json").read_text())
    assert not set(split["train_ids"]) & set(split["val_ids"])
    assert all(r["tokens_per_s"] > 0 for r in train.read_metrics(full) if r["kind"] == "train")

    child = textwrap.dedent(f"""
        import os, signal, pathlib, ml_collections
        from experiments import train
        config = ml_collections.ConfigDict({config.to_dict()!r})
        def kill(step):
            if step == {KILL_AT}:
                os.kill(os.getpid(), signal.SIGKILL)
        train.train(config, pathlib.Path({str(killed)!r}), on_step=kill)
    """)
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": jax.default_backend()}, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit()] == [CKPT_EVERY]
    assert max(r["step"] for r in train.read_metrics(killed)) == KILL_AT  # dropped on resume

    resumed = train.run(config, killed)
    assert resumed["resumed_from"] == CKPT_EVERY and resumed["final_step"] == STEPS
    _assert_trees_identical(_checkpoint_state(full, STEPS), _checkpoint_state(killed, STEPS))
    _same_log(full, killed)


def test_igpt_loss_decreases_and_resumes_bit_identically_after_crash(tmp_path):
    """Pixels of sklearn digits: held-out loss falls; a run that dies by an exception at step 60 (fresh
    state objects, same process) resumes from step 40 to the same step-80 state bit for bit."""
    _require_deterministic_backend()
    config = _igpt_config()
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    result = train.run(config, full)
    evals = _evals(full)
    assert evals[STEPS] < evals[0] - 0.5
    assert evals[STEPS] < math.log(16)  # better than a uniform guess over the 16-colour palette
    assert (full / "palette.npy").is_file()
    model, params, loaded_config = train.load_trained(full)
    assert type(model).__name__ == "IGPT" and loaded_config.model.family == "igpt"
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    assert result["num_params"] == sum(x.size for x in jax.tree.leaves(params))
    _assert_trees_identical(params, _checkpoint_state(full, STEPS)["params"])

    def crash(step):
        if step == KILL_AT:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(config, crashed, on_step=crash)
    assert train.run(config, crashed)["resumed_from"] == CKPT_EVERY
    _assert_trees_identical(_checkpoint_state(full, STEPS), _checkpoint_state(crashed, STEPS))
    _same_log(full, crashed)
    for workdir in (full, crashed):
        assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [0, 10, 40, 80]
    _, initial, _ = train.load_trained(full, step=0)
    _assert_trees_identical(initial, train.init_params(train.model_config(config, train.load_data(config, full)[0]),
                                                       config.seed))


def test_batch_iterator_position_is_the_whole_state(shared_data):
    """A fresh iterator built from a saved position yields exactly the batches the old one would."""
    c = _esm_config(shared_data)
    data, _ = train.load_protein_data(c.data)
    it = train.BatchIterator(data, 64, seed=3, max_residues=30)
    for _ in range(it.steps_per_epoch - 2):  # stop just before an epoch boundary
        next(it)
    clone = train.BatchIterator.from_state(data, json.loads(json.dumps(it.state())), max_residues=30)
    for _ in range(5):  # across the boundary into a new permutation
        np.testing.assert_array_equal(next(it), next(clone))
    assert it.state() == clone.state() and it.state()["epoch"] == 1
    pos = train.BatchIterator.position_after(it.steps_per_epoch + 3, it.steps_per_epoch)
    assert pos == {"epoch": 1, "index": 3} == {k: it.state()[k] for k in pos}


def test_masking_statistics():
    """15% of residues selected, then 80% <mask> / 10% random amino acid / 10% unchanged; <cls>, <eos>
    and <pad> never touched."""
    rng = np.random.default_rng(0)
    b, t = 512, 256
    lengths = rng.integers(10, t - 2, size=b)
    tokens = np.full((b, t), ptok.PAD_ID, np.int32)
    for i, n in enumerate(lengths):
        tokens[i, 0], tokens[i, 1 : n + 1], tokens[i, n + 1] = ptok.CLS_ID, rng.integers(4, 24, size=n), ptok.EOS_ID
    inputs, selected = jax.jit(train.mask_tokens)(jax.random.key(0), jnp.asarray(tokens))
    inputs, selected = np.asarray(inputs), np.asarray(selected)

    special = np.isin(tokens, [ptok.CLS_ID, ptok.EOS_ID, ptok.PAD_ID])
    assert not selected[special].any()
    np.testing.assert_array_equal(inputs[special], tokens[special])
    np.testing.assert_array_equal(inputs[~selected], tokens[~selected])

    n_eligible, n_sel = (~special).sum(), selected.sum()
    assert abs(n_sel / n_eligible - 0.15) < 0.004, n_sel / n_eligible  # ~7 sigma at n ~ 70k
    sel_in, sel_orig = inputs[selected], tokens[selected]
    masked = sel_in == ptok.MASK_ID
    unchanged = sel_in == sel_orig
    replaced = ~masked & ~unchanged
    assert abs(masked.mean() - 0.8) < 0.01
    # 10% kept + 10% random that happened to draw the original (1 in 20) -> 0.105; 0.095 replaced.
    assert abs(unchanged.mean() - 0.105) < 0.008
    assert abs(replaced.mean() - 0.095) < 0.008
    assert ((sel_in[replaced] >= 4) & (sel_in[replaced] < 24)).all()  # the 20 standard amino acids


def test_resume_refuses_another_model_and_warns_on_changed_training(tmp_path, caplog):
    config = train_igpt_tiny.get_config()
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    with caplog.at_level("WARNING"):
        train._check_resume_config(tmp_path, config)  # same config: silent
    assert not caplog.records
    longer = train_igpt_tiny.get_config()
    longer.train.steps = config.train.steps * 2
    with caplog.at_level("WARNING"):
        train._check_resume_config(tmp_path, longer)
    assert f"steps {config.train.steps} -> {2 * config.train.steps}" in caplog.text
    other = train_igpt_tiny.get_config()
    other.seed = config.seed + 1
    with pytest.raises(ValueError, match="different config.seed"):
        train._check_resume_config(tmp_path, other)


def test_schedule_warmup_and_cosine():
    training = _igpt_config().train
    training.warmup_steps, training.learning_rate, training.end_lr_fraction = 10, 1e-3, 0.1
    sched = train.make_schedule(training)
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(100)) == pytest.approx(1e-4)
    assert float(sched(5)) == pytest.approx(5e-4)
