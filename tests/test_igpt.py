"""iGPT port: parity with HF ImageGPT (random init), the original start-token handling, checkpoints."""

from __future__ import annotations

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import checkpoints, igpt

TINY_HF = dict(vocab_size=17, n_positions=64, n_embd=32, n_layer=3, n_head=4)


def _rng_pixels(config: igpt.IGPTConfig, batch: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.n_colors, (batch, config.n_positions))


def _randomized_params(config: igpt.IGPTConfig, seed: int = 0) -> dict:
    """Random params (numpy, from the shapes alone: no init compile) with non-trivial norm gains and
    biases (init sets them to 1 and 0, which would hide a missing gain or bias)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return (1.0 + 0.2 * rng.standard_normal(leaf.shape)).astype(np.float32)
        std = 0.1 if name == "bias" else 0.2  # large enough that attention is far from uniform
        return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, igpt.param_shapes(config))


def _apply(config: igpt.IGPTConfig, params: dict, tokens) -> dict:
    return jax.jit(igpt.IGPT(config).apply)({"params": params}, jnp.asarray(tokens))


# ---------------------------------------------------------------------------------------------------
# Parity with HF ImageGPT (torch)


def _hf_model(tmp_path, causal: bool = True, **overrides):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ImageGPTConfig(**{**TINY_HF, **overrides})
    cls = transformers.ImageGPTForCausalImageModeling if causal else transformers.ImageGPTModel
    model = cls(config).eval()
    with torch.no_grad():  # random norm gains and biases so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def _hf_forward(model, tokens: np.ndarray):
    """HF hidden states, logits (or None) and the paper's stream via hooks on every ln_1."""
    import torch

    base = model.transformer if hasattr(model, "transformer") else model
    captured = []
    hooks = [block.ln_1.register_forward_hook(lambda m, i, o: captured.append(o.numpy().copy()))
             for block in base.h]
    with torch.no_grad():
        out = model(torch.tensor(tokens, dtype=torch.long), output_hidden_states=True)
    for h in hooks:
        h.remove()
    hidden = [h.numpy() for h in out.hidden_states]
    logits = out.logits.numpy() if hasattr(out, "logits") else None
    return hidden, logits, captured + [hidden[-1]]


def _max_errors(ours, theirs) -> list[float]:
    return [float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(ours, theirs, strict=True)]


@pytest.mark.torch
@pytest.mark.parametrize(
    "overrides",
    [{}, {"n_inner": 48, "scale_attn_by_inverse_layer_idx": True}],
    ids=["default", "n_inner+inverse_layer_scaling"],
)
def test_parity_with_hf_causal_model(tmp_path, overrides):
    hf = _hf_model(tmp_path, **overrides)
    config, params = igpt.load_hf(tmp_path)
    assert config.lm_head and config.n_layer == 3 and config.start_token == 16
    tokens = igpt.add_start_token(_rng_pixels(config), config.start_token)
    hf_hidden, hf_logits, hf_reps = _hf_forward(hf, tokens)

    out = _apply(config, params, tokens)
    assert len(out["hidden_states"]) == len(out["representations"]) == config.n_layer + 1
    hidden_err = _max_errors(out["hidden_states"], hf_hidden)
    rep_err = _max_errors(out["representations"], hf_reps)
    logit_err = float(np.max(np.abs(np.asarray(out["logits"]) - hf_logits)))
    print(f"max abs error: hidden {max(hidden_err):.2e} reps {max(rep_err):.2e} logits {logit_err:.2e}")
    assert max(hidden_err) < 1e-5, hidden_err
    assert max(rep_err) < 1e-5, rep_err
    assert logit_err < 1e-5
    assert out["logits"].shape == (3, config.n_positions, 16)  # the start token is never predicted


@pytest.mark.torch
def test_bare_hf_model_and_legacy_buffers(tmp_path):
    """A bare ImageGPTModel (no `transformer.` prefix, no head) plus the mask buffers old checkpoints hold."""
    from safetensors.numpy import load_file, save_file

    hf = _hf_model(tmp_path, causal=False)
    file = tmp_path / "model.safetensors"
    state = load_file(file)
    assert not any(k.startswith("transformer.") for k in state)
    n = TINY_HF["n_positions"]
    for i in range(TINY_HF["n_layer"]):  # what transformers 4.x wrote for every layer
        state[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.uint8))[None, None]
        state[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(state, file)

    config, params = igpt.load_hf(tmp_path)
    assert not config.lm_head and "lm_head" not in params
    tokens = igpt.add_start_token(_rng_pixels(config), config.start_token)
    hf_hidden, _, hf_reps = _hf_forward(hf, tokens)
    out = _apply(config, params, tokens)
    assert "logits" not in out
    assert max(_max_errors(out["hidden_states"], hf_hidden)) < 1e-5
    assert max(_max_errors(out["representations"], hf_reps)) < 1e-5

    state["h.0.attn.extra"] = np.zeros(3, np.float32)  # anything else must fail loudly
    save_file(state, file)
    with pytest.raises(checkpoints.CheckpointError, match="h.0.attn.extra"):
        igpt.load_hf(tmp_path)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["imagegpt-small", "imagegpt-large"])
def test_real_config_shapes_match_hf(shared_data, name):
    """The published configs: every HF parameter maps onto a Flax leaf of the same shape (no real init)."""
    import torch
    import transformers

    hf_json = json.loads((shared_data / "configs/transcribed_from_hf_pages" / name / "config.json").read_text())
    config = igpt.config_from_hf(hf_json)
    assert (config.n_layer, config.n_embd, config.n_head) == igpt.SIZES[{"imagegpt-small": "s",
                                                                          "imagegpt-large": "l"}[name]]
    with torch.device("meta"):  # shapes only, no memory
        hf = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(**hf_json))
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    ours = igpt.param_shapes(config)
    rules = igpt.hf_conversion_rules(config, prefix="transformer.")
    flat = {tuple(p.key for p in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(ours)[0]}
    assert set(flat) == set(rules)
    assert {hf_key for hf_key, _ in rules.values()} == set(hf_shapes)
    for path, (hf_key, transform) in rules.items():
        expected = hf_shapes[hf_key][::-1] if transform is checkpoints.transpose else hf_shapes[hf_key]
        assert flat[path].shape == expected, (path, hf_key)
    assert sum(np.prod(v) for v in hf_shapes.values()) == sum(np.prod(leaf.shape) for leaf in flat.values())


def test_small_config_forward_shapes(shared_data):
    """imagegpt-small end to end through jax.eval_shape: L+1 = 25 states of [B, 1024, 512]."""
    hf_json = json.loads((shared_data / "configs/transcribed_from_hf_pages/imagegpt-small/config.json").read_text())
    config = igpt.config_from_hf(hf_json)
    assert config == igpt.get_config("s")  # the published size table agrees with the HF config
    model = igpt.IGPT(config)
    tokens = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    out = jax.eval_shape(lambda p, t: model.apply({"params": p}, t), igpt.param_shapes(config), tokens)
    assert len(out["hidden_states"]) == len(out["representations"]) == 25
    assert all(h.shape == (2, 1024, 512) and h.dtype == jnp.float32 for h in out["hidden_states"])
    assert out["logits"].shape == (2, 1024, 512)
    pooled = jax.eval_shape(lambda p, t: igpt._pooled(model, p, t, "paper"), igpt.param_shapes(config), tokens)
    assert pooled.shape == (25, 2, 512) and pooled.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------
# The original model's input handling (OpenAI image-gpt src/model.py), as an independent numpy oracle


def _original_forward(params: dict, config: igpt.IGPTConfig, pixels: np.ndarray):
    """OpenAI's graph: embed the pixels, drop the last, prepend `sos`, add positions 0..T-1.

    Returns (per-layer ln_1 inputs, final ln_f output, gen_logits, gen_loss) in float64.
    """
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)

    def norm(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.layer_norm_epsilon) * g

    def dense(x, layer):
        return x @ layer["kernel"] + layer.get("bias", 0.0)

    wte = p["wte"]["embedding"]
    sos = wte[config.start_token]  # HF stores OpenAI's separate `sos` vector as the last vocab row
    b, t = pixels.shape
    h = wte[pixels]
    h = np.concatenate([np.broadcast_to(sos, (b, 1, config.n_embd)), h[:, :-1]], axis=1)
    h = h + p["wpe"]["embedding"][:t]
    mask = np.tril(np.ones((t, t)))
    ln1 = []
    for i in range(config.n_layer):
        blk = p[f"h_{i}"]
        x = norm(h, blk["ln_1"]["scale"])
        ln1.append(x)
        q, k, v = np.split(dense(x, blk["attn"]["c_attn"]), 3, axis=-1)
        q, k, v = (a.reshape(b, t, config.n_head, -1).transpose(0, 2, 1, 3) for a in (q, k, v))
        w = q @ k.transpose(0, 1, 3, 2) / np.sqrt(config.head_dim)
        w = w * mask - 1e10 * (1 - mask)
        w = np.exp(w - w.max(-1, keepdims=True))
        a = (w / w.sum(-1, keepdims=True)) @ v
        h = h + dense(a.transpose(0, 2, 1, 3).reshape(b, t, -1), blk["attn"]["c_proj"])
        m = dense(norm(h, blk["ln_2"]["scale"]), blk["mlp"]["c_fc"])
        h = h + dense(m / (1 + np.exp(-1.702 * m)), blk["mlp"]["c_proj"])
    h = norm(h, p["ln_f"]["scale"])
    logits = h @ p["lm_head"]["kernel"]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    loss = -np.take_along_axis(logp, pixels[..., None], -1).mean()  # labels=X: position t predicts X[t]
    return ln1, h, logits, loss


def test_start_token_matches_original_model():
    config = igpt.get_config("tiny", vocab_size=17, n_positions=16)
    params = _randomized_params(config)
    pixels = _rng_pixels(config, batch=2, seed=1)
    tokens = igpt.add_start_token(pixels, config.start_token)
    np.testing.assert_array_equal(tokens[:, 0], 16)
    np.testing.assert_array_equal(tokens[:, 1:], pixels[:, :-1])
    assert tokens.dtype == np.int32 and tokens.shape == pixels.shape
    np.testing.assert_array_equal(igpt.add_start_token(jnp.asarray(pixels), 16), tokens)  # jax in, same out
    with pytest.raises(ValueError, match="pixel ids"):
        igpt.add_start_token(np.full((1, 4), 16), 16)  # the start token is not a pixel

    ln1, final, logits, loss = _original_forward(params, config, pixels)
    out = _apply(config, params, tokens)
    for ours, ref in zip(out["representations"], ln1 + [final], strict=True):
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(igpt.autoregressive_loss(out["logits"], jnp.asarray(pixels))), loss,
                               rtol=1e-5)


def test_autoregressive_head_trains():
    """A few Adam steps on one batch lower the next-pixel loss (the head and its gradients work)."""
    optax = pytest.importorskip("optax")
    config = igpt.get_config("tiny", vocab_size=9, n_positions=16)
    model = igpt.IGPT(config)
    params = igpt.init_params(config, 0)
    pixels = jnp.asarray(np.tile(np.arange(8), (4, 2)))  # a learnable ramp pattern
    tokens = igpt.add_start_token(pixels, config.start_token)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(
            lambda p: igpt.autoregressive_loss(model.apply({"params": p}, tokens)["logits"], pixels))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    losses = []
    for _ in range(30):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[0] == pytest.approx(np.log(8), rel=0.05)  # chance level at init
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------------
# Representations, checkpoints, configs


def test_pooled_hidden_states_streams():
    config = igpt.get_config("tiny", vocab_size=17, n_positions=16)
    model = igpt.IGPT(config)
    params = _randomized_params(config)
    tokens = igpt.add_start_token(_rng_pixels(config, batch=4), config.start_token)
    out = _apply(config, params, tokens)
    for stream, key in (("paper", "representations"), ("residual", "hidden_states")):
        pooled = igpt.pooled_hidden_states(model, params, tokens, stream=stream)
        assert pooled.shape == (config.n_layer + 1, 4, config.n_embd) and pooled.dtype == jnp.float32
        expected = np.stack([np.asarray(h).mean(axis=1) for h in out[key]])
        np.testing.assert_allclose(np.asarray(pooled), expected, atol=1e-6)
    paper = igpt.pooled_hidden_states(model, {"params": params}, tokens)  # full variables dict too
    residual = igpt.pooled_hidden_states(model, params, tokens, stream="residual")
    np.testing.assert_allclose(np.asarray(paper[-1]), np.asarray(residual[-1]), atol=1e-6)  # both end in ln_f
    assert not np.allclose(np.asarray(paper[0]), np.asarray(residual[0]))
    with pytest.raises(ValueError, match="stream"):
        igpt.pooled_hidden_states(model, params, tokens, stream="cls")


def test_orbax_roundtrip(tmp_path):
    config = igpt.get_config("tiny", vocab_size=17, n_positions=16)
    params = _randomized_params(config)
    igpt.save(tmp_path / "ckpt", config, params)
    config2, params2 = igpt.restore(tmp_path / "ckpt")
    assert config2 == config
    chex.assert_trees_all_equal(params, params2)
    tokens = igpt.add_start_token(_rng_pixels(config, batch=2), config.start_token)
    a = igpt.pooled_hidden_states(igpt.IGPT(config), params, tokens)
    b = igpt.pooled_hidden_states(igpt.IGPT(config2), params2, tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    checkpoints.save_orbax(tmp_path / "other", params, {"model": "esm2"})
    with pytest.raises(checkpoints.CheckpointError, match="not an iGPT"):
        igpt.restore(tmp_path / "other")


def test_config_validation():
    assert igpt.get_config("large") == igpt.IGPTConfig(n_layer=48, n_embd=1536, n_head=16)
    assert igpt.get_config("m").n_embd == 1024
    with pytest.raises(ValueError, match="unknown iGPT size"):
        igpt.get_config("xl")
    with pytest.raises(ValueError, match="divisible"):
        igpt.IGPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="activation"):
        igpt.config_from_hf({"activation_function": "swish"})
    with pytest.raises(ValueError, match="cross-attention"):
        igpt.config_from_hf({"add_cross_attention": True})
    config = igpt.config_from_hf({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4})
    assert (config.n_embd, config.n_layer, config.n_head) == (64, 2, 4)
    assert dataclasses.asdict(config)["vocab_size"] == 513
    model = igpt.IGPT(igpt.get_config("tiny", n_positions=8))
    with pytest.raises(ValueError, match="n_positions"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 9), jnp.int32))
