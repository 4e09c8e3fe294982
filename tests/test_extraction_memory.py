"""The extraction memory planner (`extract.plan_extraction`, `extract.example_bytes`): worked by hand on the
published ESM-2 15B, and checked against XLA's own accounting of the compiled extraction of every family.

The independent reference is `compiled.memory_analysis()` of each family's real pooled-extraction function
(`benchmarks/extraction_bench.py`'s `planner_vs_xla`): XLA's argument, temporary and output bytes after its
buffer assignment. The planner must bound them from above, and not by more than `XLA_BOUND_FACTOR`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from benchmarks.extraction_bench import planner_vs_xla, row_environment
from experiments import extract
from tests.extract_worker import config_for

GB = 10**9
# The planner's bytes for a batch (params + activations) over XLA's (arguments + temporaries + outputs). Measured
# 1.2-2.6 with the heads_major attention; looser where T^2 H dominates (the planner keeps room for the three
# float32 score copies of XLA's dot_product_attention, which heads_major does without), tightest with xla.
XLA_BOUND_FACTOR = 4.0

ESM2_15B = {"param_count": 15_135_000_000, "width": 5120, "num_layers": 48, "num_heads": 40, "seq_len": 1024}


def _example_bytes_by_hand(seq_len: int, width: int, num_layers: int, dtype_bytes: int, heads: int) -> int:
    block = dtype_bytes * seq_len * (4 * width + 2 * 4 * width)  # the live [T, D] and [T, 4D] tensors of one block
    scores = 4 * 3 * heads * seq_len * seq_len  # float32 T x T per head, three copies
    return block + scores + 4 * (num_layers + 1) * width + 8 * seq_len  # + pooled output, token ids


def test_esm2_15b_on_80gb_devices_needs_fsdp_in_float32_not_in_bfloat16():
    usable = 0.9 * 0.75 * 80 * GB  # JAX preallocates 75% of an 80 GB GPU; the plan fills 90% of that: 54 GB
    m = ESM2_15B
    dims = {"seq_len": 1024, "width": 5120, "num_layers": 48, "num_heads": 40, "devices": 8}
    fp32_params = 4 * m["param_count"]  # 60.5 GB > 54 GB: replicated does not fit
    plan = extract.plan_extraction(device_memory_bytes=int(0.75 * 80 * GB), param_bytes=fp32_params, **dims)
    # Over 2 devices: 30.27 GB of params + one layer gathered (1.26 GB) leaves 22.47 GB; one 1024-residue
    # example: 4 * 1024 * 61440 (block) + 12 * 40 * 1024^2 (scores) + 4 * 49 * 5120 + 8 * 1024 = 0.756 GB -> 29.
    per_example = _example_bytes_by_hand(1024, 5120, 48, 4, 40)
    assert per_example == 755_986_432 == plan.example_bytes
    assert (plan.model_parallel, plan.fsdp) == (2, True)
    assert plan.batch_per_device == int((usable - fp32_params / 2 - fp32_params / 48) // per_example) == 29
    bf16 = extract.plan_extraction(device_memory_bytes=int(0.75 * 80 * GB), param_bytes=2 * m["param_count"],
                                   dtype_bytes=2, **dims)
    # Replicated: 54 - 30.27 = 23.73 GB over 0.630 GB per example (the scores stay float32) -> 37, no FSDP.
    assert (bf16.model_parallel, bf16.fsdp) == (1, False)
    assert bf16.batch_per_device == int((usable - 2 * m["param_count"]) // _example_bytes_by_hand(
        1024, 5120, 48, 2, 40)) == 37


def test_plan_that_cannot_fit_names_what_would():
    with pytest.raises(MemoryError) as err:  # 15B float32 on one 24 GB device
        extract.plan_extraction(device_memory_bytes=24 * GB, param_bytes=4 * ESM2_15B["param_count"], seq_len=1024,
                                width=5120, num_layers=48, num_heads=40, devices=1)
    message = str(err.value)
    for needle in ("does not fit", "shorter sequences", "bfloat16", "more devices",
                   "--config.extract.model_parallel=4"):  # 21.6 GB usable: 60.5/3 + 1.26 + 0.76 = 22.2 too much,
        assert needle in message, message  # 60.5/4 + 1.26 + 0.76 = 17.2 fits
    # A fixed model_parallel is used as given; a count that does not divide the devices is refused.
    plan = extract.plan_extraction(device_memory_bytes=80 * GB, param_bytes=8 * GB, seq_len=100, width=64,
                                   num_layers=4, devices=8, model_parallel=4)
    assert (plan.model_parallel, plan.param_bytes_per_device) == (4, 2 * GB + 2 * GB)
    assert plan.batch_per_device == 256  # capped
    with pytest.raises(ValueError, match="must divide the 8 devices"):
        extract.plan_extraction(device_memory_bytes=80 * GB, param_bytes=GB, seq_len=100, width=64, num_layers=4,
                                devices=8, model_parallel=3)
    with pytest.raises(ValueError, match="seq_len=0"):
        extract.plan_extraction(device_memory_bytes=GB, param_bytes=GB, seq_len=0, width=64, num_layers=4, devices=1)


def test_model_dims_of_every_family():
    from models import bert, esm2, igpt

    assert extract.model_dims(esm2.get_config("8M")) == {"width": 320, "num_layers": 6, "num_heads": 20,
                                                         "ffn_dim": 1280}
    assert extract.model_dims(igpt.get_config("s")) == {"width": 512, "num_layers": 24, "num_heads": 8,
                                                        "ffn_dim": 2048}
    assert extract.model_dims(bert.get_config("minilm")) == {"width": 384, "num_layers": 6, "num_heads": 12,
                                                             "ffn_dim": 1536}


@pytest.mark.slow  # initialises the model twice: ~5-15 s on a shared 2-core machine
def test_auto_batch_size_takes_the_plan():
    """extract.batch_size="auto" on one device: the plan's batch per device is the encoder's batch size."""
    config = config_for("esm2", "auto", "never", 0, n=12)
    budget = 1_300_000
    config.extract.device_memory_bytes = budget
    examples = extract.load_examples(config.data)
    encoder = extract.build_encoder(config.model, examples, "auto", None, config.extract)
    # Tiny ESM-2: 2 layers, width 64, 4 heads, float32; the longest protein + <cls> and <eos> tokens, padded to
    # a multiple of 16 as the encoder does.
    longest = -(-(max(len(s) for s in examples.inputs) + 2) // 16) * 16
    params = extract._load_family(config.model)[2]
    param_bytes = 4 * sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(params))
    want = int((0.9 * budget - param_bytes) // _example_bytes_by_hand(longest, 64, 2, 4, 4))
    assert 1 < want < 12
    assert [len(b) for b in encoder.plan][:-1] == [want] * (12 // want - (12 % want == 0))
    settings = config_for("esm2", 6, "never", 0).model
    settings.encoder = "tests.extract_worker:proteins"
    with pytest.raises(ValueError, match="integer extract.batch_size"):
        extract.build_encoder(settings, examples, "auto", None, config.extract)


# Small shapes of each family, compiled in 1-5 s each; ESM-2 under every attention implementation the "auto"
# choice can take on a CPU (the slow-marked ones, to keep the default suite short).
XLA_CASES = [pytest.param(*case, id="-".join(map(str, case)).rstrip("-"), marks=[pytest.mark.slow] * slow)
             for *case, slow in [("esm2", "tiny", 8, 64, "heads_major", False), ("igpt", "mini", 4, 256, "", False),
                                 ("bert", "tiny", 8, 128, "", False), ("esm2", "tiny", 8, 64, "einsum", True),
                                 ("esm2", "tiny", 8, 64, "heads_major_deferred", True),
                                 ("esm2", "small", 4, 256, "xla", True), ("igpt", "tiny", 8, 64, "", True)]]


@pytest.mark.parametrize("family,size,batch,seq_len,attention", XLA_CASES)
def test_planner_bounds_xla_compiled_memory(family, size, batch, seq_len, attention):
    r = planner_vs_xla(family, size, batch, seq_len, attention or "heads_major")
    planner = r["planner_params"] + r["planner_activations"]
    xla = r["xla_arguments"] + r["xla_temp"] + r["xla_output"]
    assert xla <= planner <= XLA_BOUND_FACTOR * xla, (r, planner / xla)
    assert r["xla_temp"] + r["xla_output"] <= r["planner_activations"], r  # the activations alone, too


def test_benchmark_rows_see_fake_cpus_the_first_gpus_or_the_tpu_host():
    cpu = row_environment("cpu", 4, {"XLA_FLAGS": "--xla_cpu_foo=1"})
    assert cpu["JAX_PLATFORMS"] == "cpu"
    assert cpu["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"
    gpu = row_environment("gpu", 4, {})
    assert gpu["CUDA_VISIBLE_DEVICES"] == "0,1,2,3" and "XLA_FLAGS" not in gpu
    assert row_environment("tpu", 8, {})["JAX_PLATFORMS"] == "tpu"
    with pytest.raises(ValueError, match="expected cpu, gpu or tpu"):
        row_environment("rocm", 1, {})
