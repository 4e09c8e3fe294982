"""Every model family keeps the same protocol (models/registry.py), and the pipeline depends on nothing else."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest

from models import checkpoints, registry

REPO = pathlib.Path(__file__).resolve().parents[1]
PROTOCOL = ("Config", "Model", "SOURCES", "get_config", "init_params", "param_shapes", "load", "save", "restore",
            "make_encoder")
TRAINING = ("TRAINING_DATA", "LOSS_NAME", "training_config", "token_losses")
TINY = {"esm2": ("tiny", {}), "igpt": ("tiny", {"vocab_size": 17, "n_positions": 16}), "bert": ("tiny", {})}


@pytest.mark.parametrize("name", registry.names())
def test_each_family_has_the_protocol_and_round_trips(name, tmp_path):
    family = registry.family(name)
    missing = [member for member in PROTOCOL if not hasattr(family, member)]
    assert not missing, f"{name} lacks {missing}"
    size, overrides = TINY[name]
    config = family.get_config(size, **overrides)
    record = json.loads(json.dumps(registry.config_to_json(config)))
    assert record["family"] == name and registry.config_from_json(record) == config
    params = family.init_params(config, 0)
    shapes = family.param_shapes(config)
    assert jax.tree.map(lambda p: (p.shape, p.dtype), params) == jax.tree.map(lambda s: (s.shape, s.dtype), shapes)
    family.save(tmp_path / "orbax", config, {"params": params})  # the variables dict is unwrapped too
    restored_config, restored = family.load("orbax", tmp_path / "orbax")
    assert restored_config == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, restored)


def test_trainable_families_and_unknown_names():
    assert registry.trainable() == ("esm2", "igpt")
    for name in registry.trainable():
        assert all(hasattr(registry.family(name), member) for member in TRAINING)
    with pytest.raises(ValueError, match="unknown model family 'gpt5'.*esm2, igpt, bert.*model.encoder"):
        registry.family("gpt5")
    with pytest.raises(ValueError, match="'bert' has no training objective here; trainable: esm2, igpt"):
        registry.trainable_family("bert")
    with pytest.raises(ValueError, match="cannot load source 'fair_esm'"):
        registry.load("igpt", "fair_esm", "x.pt")
    with pytest.raises(ValueError, match="needs model.size"):
        registry.load("esm2", "random", None)


def test_model_config_files_of_earlier_versions_are_read():
    """Training workdirs store {"family", "config"}; iGPT's MLP width was written under HF's name n_inner."""
    old_igpt = {"family": "igpt", "config": {
        "vocab_size": 17, "n_positions": 196, "n_embd": 64, "n_layer": 8, "n_head": 4, "n_inner": None,
        "layer_norm_epsilon": 1e-05, "activation_function": "quick_gelu", "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "initializer_range": 0.02, "lm_head": True, "dtype": "float32"}}
    config = registry.config_from_json(old_igpt)
    assert config.ffn_dim == 256 and config.n_layer == 8
    old_esm2 = {"family": "esm2", "config": {
        "num_layers": 4, "embed_dim": 64, "num_heads": 4, "ffn_dim": 256, "vocab_size": 33, "pad_id": 1,
        "mask_id": 32, "cls_id": 0, "eos_id": 2, "token_dropout": True, "layer_norm_eps": 1e-05,
        "rope_theta": 10000.0, "rotary_inv_freq": None, "max_positions": 136, "dtype": "float32",
        "matmul_precision": None, "attention_impl": "einsum", "name": "esm2_tiny"}}
    assert registry.config_from_json(old_esm2).max_positions == 136
    with pytest.raises(ValueError, match="needs 'family' and 'config'"):
        registry.config_from_json({"config": {}})


def test_one_params_unwrap_rule():
    tree = {"layer_0": {"kernel": 1}}
    assert checkpoints.unwrap_params(tree) is tree
    assert checkpoints.unwrap_params({"params": tree}) is tree
    assert checkpoints.unwrap_params({"params": tree, "intermediates": {}}) is tree


def test_pipeline_has_no_family_branch():
    for path in ("experiments/extract.py", "experiments/train.py", "experiments/train_data.py"):
        text = (REPO / path).read_text()
        # No branch on the family and no import of a family module: only the registry.
        assert not re.search(r"family\s*==|from models import [^\n]*\b(esm2|igpt|bert)\b|models\.(esm2|igpt|bert)",
                             text), path
