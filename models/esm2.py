"""ESM-2 in Flax linen, numerically equal to HF `EsmForMaskedLM` and fair-esm `ESM2` in float32.

Architecture (read from both references, HF `EsmModel` and fair-esm `ESM2`):
  tokens -> embed (no positional table) -> token dropout (also at inference: <mask> rows zeroed,
  every sequence scaled by 0.88 / (1 - n_mask / n_nonpad)) -> pad rows zeroed
  -> L pre-LN blocks: x += out(MHA(LN(x))) with rotary q/k; x += fc2(gelu_erf(fc1(LN(x))))
  -> final LayerNorm -> LM head (dense, gelu, LN, tied embedding, bias).
Hidden states follow HF's `hidden_states`: L + 1 arrays, [0] the embeddings after token dropout,
[i] the raw residual after block i, and [L] the final-LayerNorm output (not the raw block L output).

Each block is its own submodule named `layer_{i}`, so `capture_intermediates=True` records every
block output under that name.

Rotary frequencies are part of the config (`rotary_inv_freq`), not of the params: the published
checkpoints store fp16-rounded values that must be used as-is, they are not trainable, and keeping
them in the (hashable, JSON-serialisable) config makes them compile-time constants that travel with
the Orbax metadata.

Loaders: `load_hf` (safetensors, single or sharded; no torch), `load_fair_esm` (a fair-esm `.pt`,
torch imported inside), `save` / `restore` (Orbax + config in the metadata); `load(source, path)` is
the family protocol's entry (`models/registry.py`), as are `make_encoder` (extraction) and
`token_losses` (masked-LM training with ESM's 15% / 80-10-10 corruption, `mask_tokens`).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from experiments.files import local_path
from models import attention, checkpoints, protein_tokenizer
from models.checkpoints import CheckpointError, PathLike
from models.pooling import first_token, masked_mean
from models.protein_tokenizer import CLS_ID, EOS_ID, MASK_ID, PAD_ID
from models.token_ids import check_token_ids

log = logging.getLogger(__name__)

# Fraction of tokens replaced by <mask> during ESM pre-training (15% selected x 80% masked);
# hard-coded the same way in both references.
MASK_RATIO_TRAIN = 0.15 * 0.8

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ESM2Config:
    """Hyper-parameters of an ESM-2 model (hashable: used as a static jit key).

    Attributes:
      num_layers, embed_dim, num_heads: L, D, H. ffn_dim defaults to 4 * D (ESM-2 always uses that).
      vocab_size, pad_id, mask_id, cls_id, eos_id: the 33-token ESM alphabet.
      token_dropout: apply the mask-ratio rescaling of the embeddings (true for every ESM-2).
      layer_norm_eps: 1e-5 for ESM-2 (torch LayerNorm default; HF EsmConfig defaults to 1e-12!).
      rope_theta: base of the exact rotary formula, used only when `rotary_inv_freq` is None.
      rotary_inv_freq: the checkpoint's inverse frequencies (head_dim / 2 floats), or None for the
        exact float32 formula.
      max_positions: positions seen in training incl. <cls>/<eos> (informational; the tokenizer enforces).
      dtype: computation and activation dtype, "float32" or "bfloat16" (inference); pooled outputs
        are float32 either way.
      matmul_precision: passed to every matmul (e.g. "highest" for full fp32 on GPU/TPU, where the
        default may use TF32/bf16 passes); None = backend default (exact fp32 on CPU).
      attention_impl: "auto" (the fastest on this machine for the shape, measured once and cached:
        `models/attention.py`) or one of `attention.IMPLEMENTATIONS`, all equal in float32.
      name: a label (HF model name or size key).
    """

    num_layers: int
    embed_dim: int
    num_heads: int
    ffn_dim: int | None = None
    vocab_size: int = 33
    pad_id: int = PAD_ID
    mask_id: int = MASK_ID
    cls_id: int = CLS_ID
    eos_id: int = EOS_ID
    token_dropout: bool = True
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rotary_inv_freq: tuple[float, ...] | None = None
    max_positions: int = 1024
    dtype: str = "float32"
    matmul_precision: str | None = None
    attention_impl: str = "auto"
    name: str = "custom"

    def __post_init__(self):
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 4 * self.embed_dim)
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 2:
            raise ValueError(
                f"embed_dim {self.embed_dim} must split into {self.num_heads} heads of even size (rotary)"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.attention_impl not in attention.CHOICES:
            raise ValueError(f"attention_impl must be one of {', '.join(attention.CHOICES)}, "
                             f"got {self.attention_impl!r}")
        if self.rotary_inv_freq is not None:
            inv = tuple(float(v) for v in self.rotary_inv_freq)
            if len(inv) != self.head_dim // 2:
                raise ValueError(f"rotary_inv_freq has {len(inv)} values, expected head_dim/2 = {self.head_dim // 2}")
            object.__setattr__(self, "rotary_inv_freq", inv)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def jnp_dtype(self) -> Any:
        return _DTYPES[self.dtype]

    def replace(self, **changes: Any) -> ESM2Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (float32 inv_freq values are exact as Python floats)."""
        out = dataclasses.asdict(self)
        if out["rotary_inv_freq"] is not None:
            out["rotary_inv_freq"] = list(out["rotary_inv_freq"])
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ESM2Config:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown ESM2Config fields: {unknown}")
        d = dict(d)
        if d.get("rotary_inv_freq") is not None:
            d["rotary_inv_freq"] = tuple(d["rotary_inv_freq"])
        return cls(**d)


def _size(layers: int, dim: int, heads: int, name: str) -> ESM2Config:
    return ESM2Config(num_layers=layers, embed_dim=dim, num_heads=heads, name=name)


# The published ESM-2 models (layers / dim / heads; FFN 4 * dim). 15B as in fair-esm's pretrained.py.
SIZES: dict[str, ESM2Config] = {
    "8M": _size(6, 320, 20, "esm2_t6_8M_UR50D"),
    "35M": _size(12, 480, 20, "esm2_t12_35M_UR50D"),
    "150M": _size(30, 640, 20, "esm2_t30_150M_UR50D"),
    "650M": _size(33, 1280, 20, "esm2_t33_650M_UR50D"),
    "3B": _size(36, 2560, 40, "esm2_t36_3B_UR50D"),
    "15B": _size(48, 5120, 40, "esm2_t48_15B_UR50D"),
}
# Small shapes for tests and smoke runs (random init only).
CUSTOM: dict[str, ESM2Config] = {
    "tiny": _size(2, 64, 4, "tiny"),
    "small": _size(4, 128, 8, "small"),
}


def get_config(name: str, **overrides: Any) -> ESM2Config:
    """A config by size key ("650M"), HF/fair-esm name ("esm2_t33_650M_UR50D") or custom key ("tiny")."""
    table = {**SIZES, **CUSTOM, **{c.name: c for c in SIZES.values()}}
    key = name.split("/")[-1]
    if key not in table:
        raise KeyError(f"unknown ESM-2 config {name!r}; known: {sorted(table)}")
    return table[key].replace(**overrides)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ESM2Config:
    """ESM2Config from a HF `config.json` dict; rejects ESM variants this port does not implement.

    Every field is read with `checkpoints.config_field` (typed, bounded, naming the file and key).
    """
    field = functools.partial(checkpoints.config_field, hf)
    if field("model_type", str, None) != "esm":
        raise ValueError(f"not an ESM config (model_type={hf.get('model_type')!r})")
    checks = {
        "position_embedding_type": ("rotary", field("position_embedding_type", str, "absolute")),
        "emb_layer_norm_before": (False, field("emb_layer_norm_before", bool, False)),
        "is_folding_model": (False, field("is_folding_model", bool, False)),
        "is_decoder": (False, field("is_decoder", bool, False)),
        "hidden_act": ("gelu", field("hidden_act", str, "gelu")),
        "tie_word_embeddings": (True, field("tie_word_embeddings", bool, True)),
    }
    bad = {k: got for k, (want, got) in checks.items() if got != want}
    if bad:
        raise ValueError(f"unsupported ESM config (this is an ESM-2 port): {bad}")
    name = str(field("_name_or_path", str, "") or "custom").rstrip("/").split("/")[-1]
    rope = checkpoints.config_field(field("rope_parameters", dict, {}), "rope_theta", float, 10000.0, positive=True)
    max_positions = field("max_position_embeddings", int, 1026, positive=True) - 2
    if max_positions < 1:
        raise checkpoints.CheckpointError(
            f"{getattr(hf, 'source', 'config.json')}: max_position_embeddings must exceed 2 (two are reserved)")
    cfg = ESM2Config(
        num_layers=field("num_hidden_layers", int, positive=True),
        embed_dim=field("hidden_size", int, positive=True),
        num_heads=field("num_attention_heads", int, positive=True),
        ffn_dim=field("intermediate_size", int, positive=True),
        vocab_size=field("vocab_size", int, 33, positive=True),
        pad_id=field("pad_token_id", int, PAD_ID, nonnegative=True),
        mask_id=field("mask_token_id", int, MASK_ID, nonnegative=True),
        token_dropout=field("token_dropout", bool, True),
        # EsmConfig's own default is 1e-12, so a config.json without the field means 1e-12.
        layer_norm_eps=field("layer_norm_eps", float, 1e-12, positive=True),
        rope_theta=field("rope_theta", float, rope, positive=True),
        # HF counts 2 extra positions (ESM-1b learned-position offset); ESM-2 trained on 1024.
        max_positions=max_positions,
        name=name,
    )
    return cfg.replace(**overrides)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


def exact_inv_freq(head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """1 / theta^(2i/d) in float32, as both references compute it (float32 [head_dim/2])."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(np.float32)


def rotary_tables(config: ESM2Config, length: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin float32 [T, head_dim] for positions 0..T-1 (halves duplicated, non-interleaved)."""
    if config.rotary_inv_freq is not None:
        inv = np.asarray(config.rotary_inv_freq, dtype=np.float32)
    else:
        inv = exact_inv_freq(config.head_dim, config.rope_theta)
    freqs = jnp.arange(length, dtype=jnp.float32)[:, None] * jnp.asarray(inv)[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, H, hd] rotated in float32 (as HF does), returned in x.dtype."""
    xf = x.astype(jnp.float32)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)


def unmasked_fraction(tokens: jax.Array, config: ESM2Config) -> jax.Array:
    """1 - n_mask / n_nonpad per sequence (the token-dropout denominator): float32 [B]."""
    n_mask = (tokens == config.mask_id).sum(-1).astype(jnp.float32)
    # max(., 1) only matters for all-padding filler rows, which the references would turn into NaN.
    length = jnp.maximum((tokens != config.pad_id).sum(-1), 1).astype(jnp.float32)
    return 1.0 - n_mask / length


def _layer_norm(config: ESM2Config, name: str) -> nn.LayerNorm:
    # Two-pass variance like torch (flax's fast E[x^2]-E[x]^2 form costs accuracy on large activations).
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.jnp_dtype, use_fast_variance=False, name=name)


def _dense(config: ESM2Config, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=config.jnp_dtype, precision=config.matmul_precision, name=name)


class SelfAttention(nn.Module):
    """Multi-head self-attention with rotary q/k (fair-esm names: q_proj, k_proj, v_proj, out_proj)."""

    config: ESM2Config

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, cfg.num_heads, cfg.head_dim)
        q = split(_dense(cfg, cfg.embed_dim, "q_proj")(x))
        k = split(_dense(cfg, cfg.embed_dim, "k_proj")(x))
        v = split(_dense(cfg, cfg.embed_dim, "v_proj")(x))
        # ESM scales q *before* the rotation (not the logits after); with rotary the two differ.
        q = q * jnp.asarray(cfg.head_dim**-0.5, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention.attend(q, k, v, key_mask, implementation=cfg.attention_impl, precision=cfg.matmul_precision)
        out = out.reshape(b, t, cfg.embed_dim)
        return _dense(cfg, cfg.embed_dim, "out_proj")(out)


class ESM2Layer(nn.Module):
    """One pre-LN transformer block: [B, T, D] -> [B, T, D]."""

    config: ESM2Config

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        cfg = self.config
        h = _layer_norm(cfg, "self_attn_layer_norm")(x)
        x = x + SelfAttention(cfg, name="self_attn")(h, key_mask, cos, sin)
        h = _layer_norm(cfg, "final_layer_norm")(x)
        h = nn.gelu(_dense(cfg, cfg.ffn_dim, "fc1")(h), approximate=False)  # erf GELU, not tanh
        return x + _dense(cfg, cfg.embed_dim, "fc2")(h)


class LMHead(nn.Module):
    """dense -> gelu -> LayerNorm -> tied embedding projection + bias: [B, T, D] -> [B, T, V]."""

    config: ESM2Config

    @nn.compact
    def __call__(self, x: jax.Array, embedding: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.gelu(_dense(cfg, cfg.embed_dim, "dense")(x), approximate=False)
        x = _layer_norm(cfg, "layer_norm")(x)
        bias = self.param("bias", nn.initializers.zeros, (cfg.vocab_size,), jnp.float32)
        logits = jnp.einsum("btd,vd->btv", x, embedding.astype(x.dtype), precision=cfg.matmul_precision)
        return logits + bias.astype(logits.dtype)


class ESM2(nn.Module):
    """ESM-2 masked-LM: tokens int32 [B, T] -> dict(logits [B, T, V], hidden_states: L+1 x [B, T, D]).

    Padding is recognised by `config.pad_id`; no attention mask argument is needed.
    """

    config: ESM2Config

    @nn.compact
    def __call__(self, tokens: jax.Array) -> dict[str, Any]:
        cfg = self.config
        check_token_ids(tokens, cfg.vocab_size, name="tokens")
        dtype = cfg.jnp_dtype
        embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, name="embed_tokens")
        x = embed(tokens)
        if cfg.token_dropout:
            x = jnp.where((tokens == cfg.mask_id)[..., None], jnp.zeros((), x.dtype), x)
            # Same operation order as the references: (x * (1 - 0.12)) / (1 - observed ratio).
            denom = unmasked_fraction(tokens, cfg)[:, None, None]
            x = (x.astype(jnp.float32) * (1.0 - MASK_RATIO_TRAIN) / denom).astype(dtype)
        key_mask = tokens != cfg.pad_id
        x = jnp.where(key_mask[..., None], x, jnp.zeros((), x.dtype))
        cos, sin = rotary_tables(cfg, tokens.shape[1])

        hidden = [x]
        for i in range(cfg.num_layers):
            x = ESM2Layer(cfg, name=f"layer_{i}")(x, key_mask, cos, sin)
            hidden.append(x)
        # The final norm applies to the last state only (HF and fair-esm both report it normed).
        x = _layer_norm(cfg, "emb_layer_norm_after")(x)
        hidden[-1] = x
        logits = LMHead(cfg, name="lm_head")(x, embed.embedding)
        return {"logits": logits, "hidden_states": tuple(hidden)}


def init_params(config: ESM2Config, seed: int = 0) -> dict:
    """Random float32 params (the inner `params` dict), flax's default initializers."""
    return _init_fn(config.replace(dtype="float32"))(jax.random.key(seed))


@functools.lru_cache(maxsize=8)
def _init_fn(config: ESM2Config):
    # jit: op-by-op initialisation takes seconds even for a tiny model on CPU. numpy tokens, not jnp:
    # this cached function may first be built under a trace and must not capture a tracer.
    tokens = np.zeros((1, 8), np.int32)
    return jax.jit(lambda key: ESM2(config).init(key, tokens)["params"])


def param_shapes(config: ESM2Config) -> dict:
    """Params tree of float32 ShapeDtypeStructs without allocating (works for 15B)."""
    # Only the architecture matters; normalising the rest lets one trace serve every variant.
    return _param_shapes(config.replace(rotary_inv_freq=None, dtype="float32", name="", attention_impl="einsum",
                                        matmul_precision=None))


@functools.lru_cache(maxsize=32)
def _param_shapes(config: ESM2Config) -> dict:
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    model = ESM2(config)
    return jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)["params"]


def cast_params(params: Any, dtype: str | Any) -> Any:
    """Casts every floating leaf (e.g. to "bfloat16" for inference: half the memory)."""
    dtype = _DTYPES.get(dtype, dtype)
    return jax.tree_util.tree_map(
        lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
    )


def residue_mask(tokens: jax.Array, config: ESM2Config) -> jax.Array:
    """bool [B, T]: true at residue positions (<mask> included), false at <cls>, <eos>, padding."""
    return (tokens != config.cls_id) & (tokens != config.eos_id) & (tokens != config.pad_id)


@functools.lru_cache(maxsize=64)
def _pooled_fn(config: ESM2Config, pooling: str):
    model = ESM2(config)

    def run(params, tokens):
        hidden = model.apply({"params": params}, tokens)["hidden_states"]
        if pooling == "mean":
            mask = residue_mask(tokens, config)
            # Pool each state separately: never materialise a [L+1, B, T, D] stack.
            return jnp.stack([masked_mean(h, mask) for h in hidden])
        return jnp.stack([first_token(h) for h in hidden])

    return jax.jit(run)


def pooled_hidden_states(
    model: ESM2, params: Mapping[str, Any], tokens: jax.Array | np.ndarray, *, pooling: str = "mean"
) -> jax.Array:
    """One vector per example and per hidden state, jit-compiled (cached per config and pooling).

    Args:
      model: an ESM2 module (only its config is used).
      params: its params (inner dict, or {"params": ...}); bf16 params with a bf16 config work.
      tokens: int32 [B, T], `<cls> seq <eos>` right-padded.
      pooling: "mean" over residue positions (excluding <cls>, <eos>, padding) or "cls" (position 0).

    Returns:
      float32 [L + 1, B, D], in HF `hidden_states` order.
    """
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    check_token_ids(tokens, model.config.vocab_size, name="tokens")
    return _pooled_fn(model.config, pooling)(checkpoints.unwrap_params(params), jnp.asarray(tokens, jnp.int32))


# --------------------------------------------------------------------------------------------------
# Checkpoint conversion
# --------------------------------------------------------------------------------------------------

# Our param path (below `layer_{i}`) -> (HF suffix, fair-esm suffix). Linear weights get transposed.
_LAYER_KEYS: dict[tuple[str, ...], tuple[str, str]] = {
    ("self_attn", "q_proj"): ("attention.self.query", "self_attn.q_proj"),
    ("self_attn", "k_proj"): ("attention.self.key", "self_attn.k_proj"),
    ("self_attn", "v_proj"): ("attention.self.value", "self_attn.v_proj"),
    ("self_attn", "out_proj"): ("attention.output.dense", "self_attn.out_proj"),
    ("self_attn_layer_norm",): ("attention.LayerNorm", "self_attn_layer_norm"),
    ("fc1",): ("intermediate.dense", "fc1"),
    ("fc2",): ("output.dense", "fc2"),
    ("final_layer_norm",): ("LayerNorm", "final_layer_norm"),
}
_TOP_KEYS: dict[tuple[str, ...], tuple[str, str]] = {
    ("emb_layer_norm_after",): ("esm.encoder.emb_layer_norm_after", "emb_layer_norm_after"),
    ("lm_head", "dense"): ("lm_head.dense", "lm_head.dense"),
    ("lm_head", "layer_norm"): ("lm_head.layer_norm", "lm_head.layer_norm"),
}
_LAYER_PREFIX = {"hf": "esm.encoder.layer.{i}.", "fair": "layers.{i}."}
_EMBED_KEY = {"hf": "esm.embeddings.word_embeddings.weight", "fair": "embed_tokens.weight"}
_TIED_HEAD_KEY = {"hf": "lm_head.decoder.weight", "fair": "lm_head.weight"}
_INV_FREQ_RE = {
    "hf": re.compile(r"^esm\.(encoder\.layer\.(\d+|\*)\.attention\.self\.)?rotary_embeddings\.inv_freq$"),
    "fair": re.compile(r"^layers\.(\d+)\.self_attn\.rot_emb\.inv_freq$"),
}
# Buffers and heads that are not ESM2 parameters: HF position_ids, the contact-prediction regression.
_IGNORED = {
    # The published HF files also carry an unused [1026, D] `position_embeddings` table (an ESM-1b
    # leftover; HF itself drops it on load): 7,840,794 - 328,320 - 121 = our 7,512,353 params for 8M.
    "hf": [r"^esm\.embeddings\.position_ids$", r"^esm\.embeddings\.position_embeddings\.weight$",
           r"^esm\.contact_head\.", r"rotary_embeddings\.inv_freq$"],
    "fair": [r"^contact_head\.", r"rot_emb\.inv_freq$"],
}


def _module_rules(flax_path: tuple[str, ...], src: str, kind: str) -> dict:
    """Rules for one Dense ("kernel"/"bias") or LayerNorm ("scale"/"bias") submodule."""
    if kind == "dense":
        return {flax_path + ("kernel",): (src + ".weight", checkpoints.transpose),
                flax_path + ("bias",): (src + ".bias", checkpoints.identity)}
    return {flax_path + ("scale",): (src + ".weight", checkpoints.identity),
            flax_path + ("bias",): (src + ".bias", checkpoints.identity)}


def conversion_rules(config: ESM2Config, source: Literal["hf", "fair"]) -> dict:
    """{our param path: (checkpoint key, transform)} for a HF or fair-esm state dict."""
    col = 0 if source == "hf" else 1
    rules: dict = {("embed_tokens", "embedding"): (_EMBED_KEY[source], checkpoints.identity),
                   ("lm_head", "bias"): ("lm_head.bias", checkpoints.identity)}
    for path, names in _TOP_KEYS.items():
        kind = "norm" if "norm" in path[-1] else "dense"
        rules.update(_module_rules(path, names[col], kind))
    for i in range(config.num_layers):
        prefix = _LAYER_PREFIX[source].format(i=i)
        for path, names in _LAYER_KEYS.items():
            kind = "norm" if "norm" in path[-1] else "dense"
            rules.update(_module_rules((f"layer_{i}", *path), prefix + names[col], kind))
    return rules


def _normalise_hf_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers 5.x `save_pretrained` writes `*.LayerNorm.gamma/beta`; older files `.weight/.bias`."""
    out = {}
    for key, value in state.items():
        new = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        new = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", new)
        if new in out:
            raise CheckpointError(f"checkpoint holds both {key} and its alias {new}")
        out[new] = value
    return out


def _read_inv_freq(state: Mapping[str, np.ndarray], source: str, config: ESM2Config, where: str):
    """The checkpoint's rotary inv_freq as a tuple of floats, or None (exact formula, logged)."""
    found = {k: np.asarray(v, dtype=np.float32) for k, v in state.items() if _INV_FREQ_RE[source].match(k)}
    if not found:
        log.info("%s stores no rotary inv_freq; using the exact float32 formula (theta=%g)", where, config.rope_theta)
        return None
    first_key = sorted(found)[0]
    ref = found[first_key]
    if ref.shape != (config.head_dim // 2,):
        raise CheckpointError(
            f"mis-shaped keys: {first_key}: checkpoint {ref.shape} vs model ({config.head_dim // 2},)"
        )
    differing = sorted(k for k, v in found.items() if v.shape != ref.shape or not np.array_equal(v, ref))
    if differing:
        # Real checkpoints repeat one value per layer; per-layer frequencies would need a per-layer config.
        raise CheckpointError(f"rotary inv_freq differs between layers: {first_key} vs {differing}")
    exact = exact_inv_freq(config.head_dim, config.rope_theta)
    log.info("%s: rotary inv_freq from %s (max |diff| to the exact formula %.3g)",
             where, first_key, float(np.abs(ref - exact).max()))
    return tuple(float(v) for v in ref)


def convert_state_dict(
    state: Mapping[str, np.ndarray],
    config: ESM2Config,
    *,
    source: Literal["hf", "fair"],
    dtype: str = "float32",
    where: str = "checkpoint",
) -> tuple[ESM2Config, dict]:
    """Converts a HF or (prefix-stripped) fair-esm state dict to (config with inv_freq, params).

    Raises:
      CheckpointError naming every missing, unexpected or mis-shaped key, or an untied LM head.
    """
    if source == "hf":
        state = _normalise_hf_keys(state)
    config = config.replace(rotary_inv_freq=_read_inv_freq(state, source, config, where), dtype=dtype)
    tied = _TIED_HEAD_KEY[source]
    ignore = list(_IGNORED[source])
    if tied in state:
        emb = state.get(_EMBED_KEY[source])
        if emb is not None and not np.array_equal(np.asarray(state[tied]), np.asarray(emb)):
            raise CheckpointError(f"{where}: {tied} differs from {_EMBED_KEY[source]}; ESM-2 ties them")
        ignore.append("^" + re.escape(tied) + "$")
    np_dtype = np.dtype(jnp.dtype(_DTYPES[dtype]))
    params = checkpoints.convert_state_dict(
        state, conversion_rules(config, source), param_shapes(config), ignore=ignore, dtype=np_dtype
    )
    return config, params


def to_hf_state_dict(config: ESM2Config, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse conversion: Flax params -> HF `EsmForMaskedLM` keys (float32 numpy, `.weight/.bias`).

    The rotary frequencies go under the transformers-5 `layer.*` key when the config has them.
    """
    flat = {
        tuple(getattr(k, "key", str(k)) for k in path): np.asarray(leaf, dtype=np.float32)
        for path, leaf in jax.tree_util.tree_flatten_with_path(checkpoints.unwrap_params(params))[0]
    }
    state = {}
    for flax_path, (key, transform) in conversion_rules(config, "hf").items():
        state[key] = transform(flat[flax_path])  # both transforms are their own inverse
    if config.rotary_inv_freq is not None:
        key = "esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq"
        state[key] = np.asarray(config.rotary_inv_freq, dtype=np.float32)
    return state


def load_hf(path: PathLike, *, dtype: str = "float32", **config_overrides: Any) -> tuple[ESM2Config, dict]:
    """Loads a HF ESM-2 directory (config.json + model.safetensors or sharded index), no torch.

    Returns:
      (config, params): params in `dtype`, already on the default device (so that jitted calls do not
      copy them from the host every time); the config carries the checkpoint's rotary inv_freq
      (fp16-rounded in the published checkpoints) and `dtype`.
    """
    hf_config = checkpoints.read_hf_config(path)
    if not hf_config.get("_name_or_path"):  # original HF uploads have none; the folder name is the best label
        config_overrides.setdefault("name", epath.Path(path).name)
    config = config_from_hf(hf_config, **config_overrides)
    state = checkpoints.load_hf_state_dict(path)
    config, params = convert_state_dict(state, config, source="hf", dtype=dtype, where=str(path))
    return config, jax.device_put(params)


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _torch_load(path: epath.Path, allow_pickle: bool):
    import argparse

    import torch

    def source():  # a local file by name (torch may map it); a remote one read whole, a fresh stream per attempt
        local = local_path(path)
        return local if local is not None else io.BytesIO(path.read_bytes())

    try:
        # argparse.Namespace is what fairseq-era files use for their config; allow just that.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(source(), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} needs full unpickling ({str(err).splitlines()[0]}); if you trust the file, "
                "call load_fair_esm(..., allow_pickle=True)"
            ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:  # ValueError: a truncated in-memory copy
        raise CheckpointError(
            f"cannot read {path} ({path.stat().length} bytes): {err}; truncated or corrupt?"
        ) from err
    try:
        return torch.load(source(), map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:  # e.g. an omegaconf config object without omegaconf installed
        raise CheckpointError(f"unpickling {path} needs the module {err.name!r}; install it to load this file") from err
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def load_fair_esm(
    path: PathLike, *, dtype: str = "float32", allow_pickle: bool = False
) -> tuple[ESM2Config, dict]:
    """Loads a fair-esm ESM-2 `.pt` (`{"cfg": {"model": ...}, "model": state_dict}`) via torch.

    torch is imported here only (the optional `torch` extra). Keys may carry fair-esm's
    `encoder.sentence_encoder.` / `encoder.` prefixes, as in the released files. Without a cfg the
    shape is inferred from the tensors and the heads from the sizes table.

    Args:
      allow_pickle: permit arbitrary unpickling (the released files store an omegaconf config);
        only for files you trust. Without it, only tensors and argparse.Namespace are unpickled.
    """
    import torch

    path = epath.Path(path)
    if not path.is_file():
        raise CheckpointError(f"fair-esm checkpoint not found: {path}")
    data = _torch_load(path, allow_pickle)
    raw_state = data.get("model", data) if isinstance(data, Mapping) else None
    if not isinstance(raw_state, Mapping):
        raise CheckpointError(f"{path} holds no state dict (got {type(data).__name__})")
    prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
    state = {}
    for key, value in raw_state.items():
        if isinstance(value, torch.Tensor):
            state[prefix.sub("", key)] = value.detach().to(torch.float32).numpy()
    if "embed_tokens.weight" not in state:
        raise CheckpointError(f"{path}: missing checkpoint keys: ['embed_tokens.weight']")

    cfg = _cfg_get(data.get("cfg") if isinstance(data, Mapping) else None, "model")
    n_layers = _cfg_get(cfg, "encoder_layers") or 1 + max(
        (int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))), default=-1
    )
    dim = _cfg_get(cfg, "encoder_embed_dim") or state["embed_tokens.weight"].shape[1]
    heads = _cfg_get(cfg, "encoder_attention_heads")
    if heads is None:
        match = [c for c in SIZES.values() if (c.num_layers, c.embed_dim) == (n_layers, dim)]
        if not match:
            raise CheckpointError(f"{path} has no cfg and ({n_layers} layers, dim {dim}) is not a known size")
        heads = match[0].num_heads
    config = ESM2Config(
        num_layers=int(n_layers), embed_dim=int(dim), num_heads=int(heads),
        vocab_size=int(state["embed_tokens.weight"].shape[0]),
        token_dropout=bool(_cfg_get(cfg, "token_dropout", True)),
        name=path.stem,
    )
    config, params = convert_state_dict(state, config, source="fair", dtype=dtype, where=str(path))
    return config, jax.device_put(params)


def save(path: PathLike, config: ESM2Config, params: Any) -> None:
    """Saves converted params with Orbax; the config (incl. inv_freq) goes in the metadata."""
    checkpoints.save_orbax(path, checkpoints.unwrap_params(params), {"model": "esm2", "config": config.to_dict()})


def restore(path: PathLike) -> tuple[ESM2Config, dict]:
    """Inverse of `save`: (config, params on the default device)."""
    params, metadata = checkpoints.restore_orbax(path)
    if metadata.get("model") != "esm2" or "config" not in metadata:
        raise CheckpointError(f"{path} is not an ESM-2 conversion (metadata: {sorted(metadata)})")
    return ESM2Config.from_dict(metadata["config"]), jax.device_put(params)


# --------------------------------------------------------------------------------------------------
# The family protocol (models/registry.py)
# --------------------------------------------------------------------------------------------------

Config = ESM2Config
Model = ESM2
SOURCES = ("hf", "fair_esm", "orbax")


def load(source: str, path: PathLike) -> tuple[ESM2Config, dict]:
    """(config, float32 params) from a HF directory ("hf"), a fair-esm `.pt` ("fair_esm") or `save` ("orbax")."""
    readers = {"hf": load_hf, "fair_esm": load_fair_esm, "orbax": restore}
    if source not in readers:
        raise ValueError(f"unknown ESM-2 source {source!r}: one of {', '.join(readers)}")
    return readers[source](path)


def make_encoder(config: ESM2Config, params: Any, settings: Any, examples: Any, *, workdir: Any = None,
                 batch_size: int | None = None):
    """Extraction encoder: protein sequences -> mean (or <cls>) pooled states of every layer.

    `settings.esm2`: pooling ("mean" | "cls"), long_policy / max_residues (sequences longer than the
    model's window: "error", "crop", or "windows", averaged weighted by residues), unknown ("error" |
    "X"), dtype (inference dtype, one cast for every source) and attention (`attention.CHOICES`).
    `examples`: every sequence analysed (`.inputs`, with their `.ids` for error messages), tokenized once up
    front so a bad one is named first.
    """
    from models.registry import FamilyEncoder, to_host

    del workdir, batch_size  # batches are padded to a multiple of 8 rows and 16 positions
    own = settings.esm2
    dtype = own.get("dtype", "float32")
    config = config.replace(attention_impl=own.get("attention", "auto"))
    if dtype != "float32":
        params = cast_params(params, dtype)
        config = config.replace(dtype=dtype)
    model = ESM2(config)
    long_policy, max_residues, unknown = own.get("long_policy", "crop"), own.get("max_residues", 1022), \
        own.get("unknown", "error")
    pooling = own.get("pooling", "mean")

    def tokenize(sequence: str, seq_id: str = "?") -> protein_tokenizer.TokenizedSequence:
        return protein_tokenizer.tokenize(sequence, seq_id=seq_id, unknown=unknown, long_policy=long_policy,
                                          max_residues=max_residues)

    tokenized = [tokenize(seq, seq_id) for seq_id, seq in zip(examples.ids, examples.inputs, strict=True)]
    token_lengths = {seq: max(len(p) for p in t.pieces) for seq, t in zip(examples.inputs, tokenized, strict=True)}

    def prepare_batch(sequences: Sequence[str]) -> dict:
        pieces = [(row, p) for row, seq in enumerate(sequences) for p in tokenize(seq).pieces]
        width = protein_tokenizer.round_up(max(len(p) for _, p in pieces), 16)
        tokens = np.full((protein_tokenizer.round_up(len(pieces), 8), width), PAD_ID, np.int32)
        for r, (_, p) in enumerate(pieces):
            tokens[r, : len(p)] = p
        return {"tokens": tokens, "owner": np.array([row for row, _ in pieces]),
                "residues": np.array([len(p) - 2 for _, p in pieces], np.float64), "rows": len(sequences)}

    def pooled_states(batch: dict) -> np.ndarray:
        owner, weights = batch["owner"], batch["residues"]
        pooled = to_host(pooled_hidden_states(model, params, batch["tokens"], pooling=pooling))[:, : len(owner)]
        # Windows of one long sequence: average weighted by residues per window.
        out = np.zeros((pooled.shape[0], batch["rows"], pooled.shape[2]), np.float64)
        np.add.at(out, (slice(None), owner), pooled * weights[None, :, None])
        out /= np.bincount(owner, weights=weights)[None, :, None]
        return out.astype(np.float32)

    cropped = sum(t.policy_applied != "none" for t in tokenized)
    description = {"family": "esm2", "source": settings.source, "path": str(settings.get("path")),
                   "config": config.to_dict(), "pooling": pooling, "long_policy": long_policy,
                   "n_long_sequences": int(cropped), "dtype": dtype}
    return FamilyEncoder(config.num_layers, prepare_batch, pooled_states, description,
                         sort_key=token_lengths.__getitem__)


# Training: masked LM. The 20 standard amino acids are ids 4..23 (LAGVSERTIDPKQNFYMHWC): the pool for
# the 10% "random" replacements (X, B, U, Z, O are rare/ambiguous and not worth teaching as corruptions).
TRAINING_DATA = "proteins"
LOSS_NAME = "masked-token cross-entropy (nats)"
STANDARD_AA_IDS = (protein_tokenizer.TOKEN_TO_ID["L"], protein_tokenizer.TOKEN_TO_ID["C"] + 1)
SPECIAL_IDS = (CLS_ID, PAD_ID, EOS_ID)


def training_config(model_settings: Any, data: Any) -> ESM2Config:
    """The config of a model trained here: a training config's `model` block; positions from the data."""
    return ESM2Config(
        num_layers=model_settings.num_layers, embed_dim=model_settings.embed_dim, num_heads=model_settings.num_heads,
        ffn_dim=model_settings.get("ffn_dim"), token_dropout=model_settings.esm2.get("token_dropout", True),
        max_positions=data.seq_len, dtype=model_settings.get("dtype", "float32"),
        name=model_settings.get("name", "custom"),
    )


def mask_tokens(
    key: jax.Array,
    tokens: jax.Array,
    *,
    mask_prob: float = 0.15,
    mask_token_prob: float = 0.8,
    random_token_prob: float = 0.1,
    mask_id: int = MASK_ID,
    special_ids: Sequence[int] = SPECIAL_IDS,
    random_range: tuple[int, int] = STANDARD_AA_IDS,
) -> tuple[jax.Array, jax.Array]:
    """ESM's masked-LM corruption.

    Each token that is not special (<cls>, <pad>, <eos>) is selected independently with probability
    `mask_prob`; a selected token becomes <mask> with probability 0.8, a uniformly random standard
    amino acid with 0.1 (which may equal the original, as in BERT/ESM), and stays unchanged with 0.1.
    The loss is computed on the selected positions only.

    Args:
      key: a jax PRNG key.
      tokens: int32 [B, T].

    Returns:
      (inputs int32 [B, T], selected bool [B, T]); the targets are `tokens`.
    """
    k_sel, k_how, k_rand = jax.random.split(key, 3)
    eligible = ~jnp.isin(tokens, jnp.asarray(special_ids, tokens.dtype))
    selected = eligible & (jax.random.uniform(k_sel, tokens.shape) < mask_prob)
    u = jax.random.uniform(k_how, tokens.shape)
    to_mask = selected & (u < mask_token_prob)
    to_random = selected & (u >= mask_token_prob) & (u < mask_token_prob + random_token_prob)
    random_tokens = jax.random.randint(k_rand, tokens.shape, random_range[0], random_range[1], tokens.dtype)
    inputs = jnp.where(to_mask, jnp.asarray(mask_id, tokens.dtype), jnp.where(to_random, random_tokens, tokens))
    return inputs, selected


def token_losses(config: ESM2Config, train_settings: Any) -> Callable:
    """(params, tokens [B, T], key) -> (cross-entropy [B, T], weights [B, T]): 1 on the masked positions."""
    import optax

    model = ESM2(config)
    masking = dict(mask_prob=train_settings.mask_prob, mask_token_prob=train_settings.mask_token_prob,
                   random_token_prob=train_settings.random_token_prob)

    def losses(params, tokens, key):
        inputs, selected = mask_tokens(key, tokens, **masking)
        logits = model.apply({"params": params}, inputs)["logits"].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens), selected.astype(jnp.float32)

    return losses
