"""models/attention.py: every implementation computes the same attention, and "auto" keeps the fastest.

The reference is a float64 numpy softmax attention written out here, not any of the implementations.
"""

from __future__ import annotations

import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import attention, esm2


def numpy_attention(q, k, v, key_mask):
    """float64 softmax(q k^T over unmasked keys) v, per batch row and head: [B, T, H, hd]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", weights / weights.sum(-1, keepdims=True), v)


def random_inputs(b=3, t=24, h=4, hd=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(b, t, h, hd)).astype(np.float32) for _ in range(3))
    lengths = np.resize([t, t // 2, 5], b)
    key_mask = np.arange(t)[None, :] < lengths[:, None]
    return q, k, v, key_mask


@pytest.mark.parametrize("impl", ["einsum", "heads_major", "heads_major_deferred", "xla"])
def test_every_implementation_equals_a_float64_reference(impl):
    q, k, v, key_mask = random_inputs()
    attend = jax.jit(functools.partial(attention.attend, implementation=impl))
    got = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(key_mask)))
    np.testing.assert_allclose(got, numpy_attention(q, k, v, key_mask), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["einsum", "heads_major", "heads_major_deferred"])
def test_all_padding_rows_stay_finite(impl):
    q, k, v, key_mask = random_inputs()
    key_mask[2] = False  # a filler row of a padded batch
    got = jax.jit(functools.partial(attention.attend, implementation=impl))(q, k, v, key_mask)
    assert np.isfinite(np.asarray(got)).all()


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="attention_impl must be one of auto, einsum, .* got 'flash'"):
        esm2.get_config("tiny", attention_impl="flash")
    q, k, v, key_mask = random_inputs()
    with pytest.raises(ValueError, match="got 'flash'"):
        attention.attend(q, k, v, key_mask, implementation="flash")


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IDJAX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(attention, "_chosen", {})
    return tmp_path / attention.CACHE_FILE


SHAPE = (16, 128, 20, 24)  # above MIN_PROBED_WORK


def test_auto_keeps_the_fastest_measured_and_reuses_the_cache(fresh_cache, monkeypatch):
    times = {"einsum": 3.0, "heads_major": 2.0, "heads_major_deferred": 1.0, "xla": 4.0}
    calls = []

    def measure(shape, dtype, names):
        calls.append((tuple(shape), tuple(names)))
        return {name: times[name] for name in names}

    assert attention.choose(SHAPE, jnp.float32, measure=measure) == "heads_major_deferred"
    assert calls == [(SHAPE, ("einsum", "heads_major", "heads_major_deferred", "xla"))]
    entry = json.loads(fresh_cache.read_text())[attention.choice_key(SHAPE, jnp.float32)]
    assert entry["choice"] == "heads_major_deferred" and entry["ms"]["xla"] == 4000.0

    def must_not_measure(*args):
        raise AssertionError("measured again although the cache has the answer")

    # Same bucket (B * H and T rounded up to powers of two): no new measurement, in this process or the next.
    assert attention.choose((16, 100, 20, 24), jnp.float32, measure=must_not_measure) == "heads_major_deferred"
    monkeypatch.setattr(attention, "_chosen", {})
    assert attention.choose(SHAPE, jnp.float32, measure=must_not_measure) == "heads_major_deferred"
    # Another dtype or another head size is another key.
    times["heads_major_deferred"] = 9.0
    assert attention.choose(SHAPE, jnp.bfloat16, measure=measure) == "heads_major"
    assert attention.choose((16, 128, 20, 32), jnp.float32, measure=measure) == "heads_major"
    assert len(calls) == 3 and len(json.loads(fresh_cache.read_text())) == 3


def test_a_damaged_cache_is_measured_again_with_a_warning(fresh_cache, caplog):
    fresh_cache.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="models.attention"):
        choice = attention.choose(SHAPE, jnp.float32, measure=lambda s, d, names: {n: 1.0 for n in names[::-1]})
    assert choice == "xla"  # min keeps the first of equal times: the reversed order puts xla first
    assert "ignoring the attention-choice cache" in caplog.text and str(fresh_cache) in caplog.text
    assert json.loads(fresh_cache.read_text())[attention.choice_key(SHAPE, jnp.float32)]["choice"] == "xla"


def test_small_work_is_not_measured(fresh_cache):
    def must_not_measure(*args):
        raise AssertionError("measured a tiny shape")

    assert attention.choose((2, 16, 4, 16), jnp.float32, measure=must_not_measure) == "heads_major"
    assert not fresh_cache.exists()


def test_the_real_probe_times_every_cpu_candidate(fresh_cache):
    seconds = attention.time_candidates((2, 64, 4, 8), jnp.float32, ("einsum", "heads_major", "xla", "cudnn"),
                                        repeats=1)
    assert set(seconds) == {"einsum", "heads_major", "xla"}  # cudnn cannot run on a CPU: left out
    assert all(0 < s < 10 for s in seconds.values())


def test_the_key_names_the_processor_and_bucket():
    key = attention.choice_key((3, 100, 20, 24), jnp.float32)
    assert key.endswith("|float32|bh64|t128|hd24") and attention.processor_name() in key


def test_auto_measures_inside_a_jit_trace_and_computes_the_same(fresh_cache):
    """The choice is made while the model is being traced: the probe must run there and change nothing."""
    q, k, v, key_mask = random_inputs(b=8, t=64, h=16, hd=16)  # 8.4M multiply-adds: measured
    got = jax.jit(functools.partial(attention.attend, implementation="auto"))(q, k, v, key_mask)
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v, key_mask), atol=2e-6, rtol=1e-5)
    (entry,) = json.loads(fresh_cache.read_text()).values()
    assert entry["shape"] == [8, 64, 16, 16] and entry["choice"] == min(entry["ms"], key=entry["ms"].get)


@pytest.mark.slow
def test_every_process_of_a_job_takes_process_0s_choice_made_while_tracing(tmp_path):
    """Two processes whose own measurements disagree: both compile process 0's choice, only process 0 measures,
    and the choice is exchanged during the jit trace (where a JAX collective cannot run)."""
    import sys

    from tests import processes

    port = processes.free_port()
    commands = [[sys.executable, str(processes.REPO / "tests" / "attention_worker.py"), "--port", str(port),
                 "--process-id", str(i), "--cache-dir", str(tmp_path / f"cache{i}"),
                 "--out", str(tmp_path / f"out{i}.json")] for i in range(2)]
    codes, logs = processes.run_job(commands, 1, tmp_path, 240)
    assert codes == [0, 0], f"2-process attention choice failed or hung ({codes}):\n{logs}"
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [r["choice"] for r in results] == ["einsum", "einsum"]
    assert results[0]["measured"] == [[8, 64, 16, 16]] and results[1]["measured"] == []
    assert results[0]["sum"] == pytest.approx(results[1]["sum"], rel=1e-6)
