"""iGPT (OpenAI image-gpt; HF `ImageGPTModel`) in Flax linen.

Architecture (read from OpenAI `src/model.py` and HF `modeling_imagegpt.py`):
  - token + learned position embeddings, no embedding norm;
  - L pre-norm blocks: x += c_proj(attn(ln_1(x))); x += mlp(ln_2(x)), causal attention scaled by
    1/sqrt(head_dim), MLP c_fc -> quick-GELU x*sigmoid(1.702x) -> c_proj;
  - every norm is RMS-style without mean subtraction or bias: x * rsqrt(mean(x^2) + 1e-5) * g;
  - final norm `ln_f`; the autoregressive head `lm_head` (no bias) predicts the 512 colour clusters
    (vocab_size - 1: the start token is never predicted).

Start token. The original model embeds the 1024 pixels, drops the last one and prepends a learned
`sos` vector, then adds positions 0..1023. HF folded `sos` into the vocabulary as id vocab_size - 1
(512) and does NOT insert it itself, so feed `add_start_token(pixels)`: [512, p_0, ..., p_1022].
Position t then predicts pixel t (`autoregressive_loss`).

Outputs of `IGPT.__call__` (all L+1 long, [B, T, D]):
  - `hidden_states`: HF `ImageGPTModel(output_hidden_states=True)` meaning: the embeddings, the raw
    residual after each of the first L-1 blocks, and ln_f of the last block's output;
  - `representations`: the paper's stream: ln_1 of block i applied to its input residual
    (i = 0..L-1), and ln_f's output for the last.
Dropout is not implemented (inference and deterministic training only).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from models import checkpoints, palette
from models.pooling import masked_mean
from models.token_ids import check_token_ids

PathLike = str | os.PathLike

# (n_layer, n_embd, n_head). S/M/L from the OpenAI README ("s": (512, 8, 24), ...) and the HF configs;
# the small custom ones are for CPU tests and toy training.
SIZES: dict[str, tuple[int, int, int]] = {
    "s": (24, 512, 8),
    "m": (36, 1024, 8),
    "l": (48, 1536, 16),
    "tiny": (2, 32, 2),
    "mini": (4, 64, 4),
    "small-custom": (6, 128, 4),
}
_SIZE_ALIASES = {"small": "s", "medium": "m", "large": "l"}

# Activations HF's ImageGPT can be configured with (ACT2FN names); iGPT itself uses quick_gelu.
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}

# Non-parameter buffers that older transformers versions wrote into checkpoints (the causal-mask
# `attn.bias` and `attn.masked_bias`); `(^|\.)` keeps `attn.c_attn.bias` from matching.
HF_BUFFER_PATTERNS = (r"(^|\.)attn\.(masked_)?bias$",)


@dataclasses.dataclass(frozen=True)
class IGPTConfig:
    """Static iGPT hyper-parameters (hashable; `to_dict` / `from_dict` for JSON)."""

    vocab_size: int = 513  # colour clusters + 1 start token (the last id)
    n_positions: int = 1024
    n_embd: int = 512
    n_layer: int = 24
    n_head: int = 8
    ffn_dim: int | None = None  # MLP width (HF's n_inner); None -> 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "quick_gelu"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    initializer_range: float = 0.02
    lm_head: bool = True  # build the autoregressive head (False for a bare ImageGPTModel checkpoint)
    dtype: str = "float32"  # computation dtype; params stay float32

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.activation_function not in _ACTIVATIONS:
            raise ValueError(
                f"activation_function={self.activation_function!r} not supported; one of {sorted(_ACTIVATIONS)}"
            )
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size={self.vocab_size} must hold at least one colour and the start token")
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 4 * self.n_embd)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> IGPTConfig:
        """Reads `to_dict`'s output; "n_inner" (HF's name, written by older versions) is read as ffn_dim."""
        d = dict(d)
        if "n_inner" in d:
            d["ffn_dim"] = d.pop("n_inner")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown IGPTConfig fields: {unknown}")
        return cls(**d)

    @property
    def start_token(self) -> int:
        return self.vocab_size - 1

    @property
    def n_colors(self) -> int:
        return self.vocab_size - 1

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def get_config(size: str, **overrides: Any) -> IGPTConfig:
    """Config of a named size ("s"/"m"/"l" as published, or "tiny"/"mini"/"small-custom"), with overrides.

    E.g. `get_config("tiny", vocab_size=17, n_positions=64)` for 16 colours and 8x8 images.
    """
    key = _SIZE_ALIASES.get(size.lower(), size.lower())
    if key not in SIZES:
        raise ValueError(f"unknown iGPT size {size!r}; known: {sorted(SIZES) + sorted(_SIZE_ALIASES)}")
    n_layer, n_embd, n_head = SIZES[key]
    return IGPTConfig(**{"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, **overrides})


def config_from_hf(hf: Mapping[str, Any]) -> IGPTConfig:
    """IGPTConfig from a HF `config.json` dict (ImageGPTConfig fields; HF attribute-map aliases accepted).

    Every field is read with `checkpoints.config_field` (typed, bounded, naming the file and key).
    """
    field = functools.partial(checkpoints.config_field, hf)
    if field("model_type", str, "imagegpt") != "imagegpt":
        raise ValueError(f"not an ImageGPT config: model_type={hf.get('model_type')!r}")
    if field("add_cross_attention", bool, False):
        raise ValueError("ImageGPT with cross-attention is not supported")
    # `reorder_and_upcast_attn` only changes mixed-precision numerics; scores here are always
    # soft-maxed in float32, so it is accepted and ignored.
    return IGPTConfig(
        vocab_size=field("vocab_size", int, 513, positive=True),
        n_positions=field("n_positions", int, 1024, aliases=("max_position_embeddings",), positive=True),
        n_embd=field("n_embd", int, 512, aliases=("hidden_size",), positive=True),
        n_layer=field("n_layer", int, 24, aliases=("num_hidden_layers",), positive=True),
        n_head=field("n_head", int, 8, aliases=("num_attention_heads",), positive=True),
        ffn_dim=field("n_inner", int, None, positive=True),
        layer_norm_epsilon=field("layer_norm_epsilon", float, 1e-5, positive=True),
        activation_function=field("activation_function", str, "quick_gelu"),
        scale_attn_weights=field("scale_attn_weights", bool, True),
        scale_attn_by_inverse_layer_idx=field("scale_attn_by_inverse_layer_idx", bool, False),
        initializer_range=field("initializer_range", float, 0.02, nonnegative=True),
    )


# ---------------------------------------------------------------------------------------------------
# Modules


def _norm(config: IGPTConfig, name: str) -> nn.RMSNorm:
    # RMS without mean or bias, eps 1e-5 (Flax's default 1e-6 would be wrong); statistics in float32.
    return nn.RMSNorm(epsilon=config.layer_norm_epsilon, dtype=config.dtype, name=name)


def _dense(config: IGPTConfig, features: int, name: str, *, std: float | None = None, bias: bool = True):
    # GPT-2 style init (normal 0.02, zero bias) so models trained from scratch start like HF's.
    return nn.Dense(
        features,
        use_bias=bias,
        dtype=config.dtype,
        kernel_init=nn.initializers.normal(std if std is not None else config.initializer_range),
        name=name,
    )


class Attention(nn.Module):
    """Causal multi-head self-attention; `c_attn` packs q|k|v along its output columns like HF's Conv1D."""

    config: IGPTConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] (already ln_1-normed) -> [B, T, D]."""
        cfg = self.config
        b, t, d = x.shape
        qkv = _dense(cfg, 3 * d, "c_attn")(x)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        q, k, v = (a.reshape(b, t, cfg.n_head, cfg.head_dim) for a in (q, k, v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        scale = 1.0
        if cfg.scale_attn_weights:
            scale /= float(cfg.head_dim) ** 0.5
        if cfg.scale_attn_by_inverse_layer_idx:
            scale /= float(self.layer_idx + 1)
        scores = scores * scale
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        # HF fills with finfo.min (not -inf): identical after softmax, and never NaN.
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
        proj_std = cfg.initializer_range / (2 * cfg.n_layer) ** 0.5
        return _dense(cfg, d, "c_proj", std=proj_std)(out)


class MLP(nn.Module):
    config: IGPTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        cfg = self.config
        h = _ACTIVATIONS[cfg.activation_function](_dense(cfg, cfg.ffn_dim, "c_fc")(x))
        return _dense(cfg, cfg.n_embd, "c_proj", std=cfg.initializer_range / (2 * cfg.n_layer) ** 0.5)(h)


class Block(nn.Module):
    """Pre-norm block. Returns (new residual, ln_1(input residual)); the latter is the paper's stream."""

    config: IGPTConfig
    layer_idx: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, T, D] -> ([B, T, D], [B, T, D])."""
        normed = _norm(self.config, "ln_1")(x)
        x = x + Attention(self.config, self.layer_idx, name="attn")(normed)
        x = x + MLP(self.config, name="mlp")(_norm(self.config, "ln_2")(x))
        return x, normed


class IGPT(nn.Module):
    """iGPT: tokens int32 [B, T] (start token already prepended) -> dict of outputs.

    Returns:
      hidden_states: tuple of L+1 [B, T, D] (HF ImageGPTModel meaning, see module docstring);
      representations: tuple of L+1 [B, T, D] (the paper's ln_1 stream, ln_f last);
      logits: [B, T, vocab_size - 1] float32 next-pixel logits (only when config.lm_head).
    """

    config: IGPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> dict[str, Any]:
        cfg = self.config
        check_token_ids(tokens, cfg.vocab_size, name="tokens")
        t = tokens.shape[-1]
        if t > cfg.n_positions:
            raise ValueError(f"sequence length {t} exceeds n_positions={cfg.n_positions}")
        emb_init = nn.initializers.normal(cfg.initializer_range)
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=emb_init, name="wte")
        wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=emb_init, name="wpe")
        x = (wte(tokens) + wpe(jnp.arange(t))[None]).astype(cfg.dtype)
        hidden, reps = [x], []
        for i in range(cfg.n_layer):
            x, normed = Block(cfg, i, name=f"h_{i}")(x)
            hidden.append(x)
            reps.append(normed)
        final = _norm(cfg, "ln_f")(x)
        hidden[-1] = final  # HF's last hidden state is after ln_f
        reps.append(final)
        out: dict[str, Any] = {"hidden_states": tuple(hidden), "representations": tuple(reps)}
        if cfg.lm_head:
            logits = _dense(cfg, cfg.n_colors, "lm_head", bias=False)(final)
            out["logits"] = logits.astype(jnp.float32)
        return out


# ---------------------------------------------------------------------------------------------------
# Inputs, loss


def add_start_token(pixels: np.ndarray | jax.Array, start_token: int) -> np.ndarray | jax.Array:
    """Feeds pixels the way the original model sees them: [start, p_0, ..., p_{T-2}].

    Args:
      pixels: int [B, T] colour-cluster ids in raster order (T = H*W, e.g. 1024).
      start_token: `config.start_token` (vocab_size - 1; 512 for the published models).

    Returns:
      int32 [B, T]: the start token, then the pixels shifted right by one (the last pixel is dropped,
      as in OpenAI's `tf.concat([sos_tok, h[:, :-1, :]], axis=1)`). numpy in -> numpy out.
    """
    xp = np if isinstance(pixels, np.ndarray) else jnp
    check_token_ids(pixels, start_token, name="pixel ids", what="colour count (= start token)")
    pixels = xp.asarray(pixels, dtype=xp.int32)
    start = xp.full(pixels.shape[:-1] + (1,), start_token, dtype=xp.int32)
    return xp.concatenate([start, pixels[..., :-1]], axis=-1)


def autoregressive_loss(logits: jax.Array, pixels: jax.Array) -> jax.Array:
    """Mean next-pixel cross-entropy (nats per pixel).

    Args:
      logits: [B, T, n_colors] from `model.apply(params, add_start_token(pixels))`.
      pixels: int [B, T] targets: position t predicts pixel t (the start token stands before it).
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, pixels[..., None].astype(jnp.int32), axis=-1).mean()


# ---------------------------------------------------------------------------------------------------
# Params: init, HF conversion, Orbax


def init_params(config: IGPTConfig, seed: int = 0) -> dict:
    """Random float32 GPT-2-style params (the inner `params` dict), the model's own initializers."""
    return _init_fn(dataclasses.replace(config, dtype="float32"))(jax.random.key(seed))


@functools.lru_cache(maxsize=8)
def _init_fn(config: IGPTConfig):
    # jit: one compile beats op-by-op initialisation. numpy tokens, not jnp: this cached function may
    # first be built under a trace (e.g. eval_shape of a training state) and must not capture a tracer.
    tokens = np.zeros((1, min(8, config.n_positions)), np.int32)
    return jax.jit(lambda key: IGPT(config).init(key, tokens)["params"])


def param_shapes(config: IGPTConfig) -> dict:
    """Params tree of ShapeDtypeStructs, computed without allocating (works for the L size on a laptop)."""
    tokens = jax.ShapeDtypeStruct((1, min(8, config.n_positions)), jnp.int32)
    return jax.eval_shape(lambda t: IGPT(config).init(jax.random.key(0), t), tokens)["params"]


def hf_conversion_rules(config: IGPTConfig, prefix: str = "") -> dict[tuple[str, ...], tuple[str, Any]]:
    """Flax param path -> (HF key, transform). HF Conv1D weights are already [in, out]: no transpose."""
    identity, transpose = checkpoints.identity, checkpoints.transpose
    rules = {
        ("wte", "embedding"): (f"{prefix}wte.weight", identity),
        ("wpe", "embedding"): (f"{prefix}wpe.weight", identity),
        ("ln_f", "scale"): (f"{prefix}ln_f.weight", identity),
    }
    for i in range(config.n_layer):
        hf_block, flax_block = f"{prefix}h.{i}.", f"h_{i}"
        rules[(flax_block, "ln_1", "scale")] = (hf_block + "ln_1.weight", identity)
        rules[(flax_block, "ln_2", "scale")] = (hf_block + "ln_2.weight", identity)
        for module in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            name = hf_block + ".".join(module)
            rules[(flax_block, *module, "kernel")] = (name + ".weight", identity)
            rules[(flax_block, *module, "bias")] = (name + ".bias", identity)
    if config.lm_head:
        rules[("lm_head", "kernel")] = ("lm_head.weight", transpose)  # nn.Linear: [out, in]
    return rules


def load_hf(path: PathLike, *, dtype: Any = np.float32) -> tuple[IGPTConfig, dict]:
    """Loads a HF ImageGPT checkpoint directory (config.json + safetensors; no torch needed).

    Handles both `ImageGPTForCausalImageModeling` (keys `transformer.*` + `lm_head.weight`) and a bare
    `ImageGPTModel` (un-prefixed keys, no head: the returned config has lm_head=False). Mask buffers
    (`attn.bias`, `attn.masked_bias`) are skipped; any other extra or missing key is an error.

    Returns:
      (config, params tree without the 'params' wrapper).
    """
    config = config_from_hf(checkpoints.read_hf_config(path))
    state = checkpoints.load_hf_state_dict(path)
    prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
    config = dataclasses.replace(config, lm_head="lm_head.weight" in state)
    params = checkpoints.convert_state_dict(
        state,
        hf_conversion_rules(config, prefix),
        param_shapes(config),
        ignore=HF_BUFFER_PATTERNS,
        dtype=dtype,
    )
    return config, params


def save(path: PathLike, config: IGPTConfig, params: Mapping[str, Any]) -> None:
    """Orbax checkpoint of params with the config in its metadata."""
    checkpoints.save_orbax(
        path, checkpoints.unwrap_params(params), {"model": "igpt", "config": config.to_dict()}
    )


def restore(path: PathLike) -> tuple[IGPTConfig, dict]:
    """Inverse of `save`: (config, params tree as host numpy arrays)."""
    params, metadata = checkpoints.restore_orbax(path)
    if metadata.get("model") != "igpt" or "config" not in metadata:
        raise checkpoints.CheckpointError(f"{path} is not an iGPT checkpoint (metadata: {metadata})")
    return IGPTConfig.from_dict(metadata["config"]), params


# ---------------------------------------------------------------------------------------------------
# Representations for the geometry pipeline

Stream = Literal["paper", "residual"]


@functools.partial(jax.jit, static_argnames=("model", "stream"))
def _pooled(model: IGPT, params: Any, tokens: jax.Array, stream: str) -> jax.Array:
    out = model.apply({"params": params}, tokens)  # logits, if any, are dead code here
    states = out["representations"] if stream == "paper" else out["hidden_states"]
    mask = jnp.ones(tokens.shape, dtype=bool)
    # Pool each layer before stacking: [L+1, B, T, D] is never materialized.
    return jnp.stack([masked_mean(h, mask) for h in states])


def pooled_hidden_states(
    model: IGPT, params: Mapping[str, Any], tokens: jax.Array, *, stream: Stream = "paper"
) -> jax.Array:
    """Mean over positions of every layer's representation (jit-compiled per model/shape).

    Args:
      model: an `IGPT` module.
      params: its params tree (or {'params': tree}).
      tokens: int32 [B, T] model inputs, start token already in place (`add_start_token`).
      stream: "paper" (ln_1 of each block's input, ln_f last) or "residual" (HF hidden_states).

    Returns:
      float32 [L+1, B, D].
    """
    if stream not in ("paper", "residual"):
        raise ValueError(f"stream must be 'paper' or 'residual', got {stream!r}")
    check_token_ids(tokens, model.config.vocab_size, name="tokens")
    return _pooled(model, checkpoints.unwrap_params(params), jnp.asarray(tokens, jnp.int32), stream)


# ---------------------------------------------------------------------------------------------------
# The family protocol (models/registry.py)

Config = IGPTConfig
Model = IGPT
SOURCES = ("hf", "orbax")
FIT_PALETTE = "fit"


def load(source: str, path: PathLike) -> tuple[IGPTConfig, dict]:
    """(config, float32 params) from a HF ImageGPT directory ("hf") or `save` ("orbax")."""
    readers = {"hf": load_hf, "orbax": restore}
    if source not in readers:
        raise ValueError(f"unknown iGPT source {source!r}: one of {', '.join(readers)}")
    return readers[source](path)


def palette_source(source: str, path: PathLike | None, chosen: str | None) -> tuple[str, epath.Path | None]:
    """Where an iGPT's colour palette comes from: (kind, file), decided before any model is loaded.

    `chosen` (model.igpt.palette) a file (`preprocessor_config.json`, `.npy`) or a directory holding
    one: ("file", it). `chosen == "fit"`: ("fitted", None), k-means on the analysed images. Unset: a HF
    checkpoint (source "hf") uses its own clusters ("checkpoint") and is refused without them, since its
    colour ids mean the colours it was trained on, which a palette fitted here does not reproduce; a
    model trained here (sources "trained", "untrained") uses the palette saved with it ("trained"); an Orbax
    checkpoint uses the clusters saved beside it ("checkpoint"); one without them and a random init get a
    fitted one.
    """
    if chosen == FIT_PALETTE:
        return "fitted", None
    if chosen:
        chosen_path = epath.Path(chosen)
        if chosen_path.is_dir():
            return "file", palette.checkpoint_palette(chosen_path) or chosen_path
        return "file", chosen_path
    if source == "hf":
        found = palette.checkpoint_palette(path)
        if found is None:
            raise palette.PaletteError(
                f"the pretrained iGPT checkpoint {path} has no colour clusters (no {palette.PREPROCESSOR_CONFIG} "
                f"with 'clusters', no {palette.KMEANS_CENTERS}); its colour ids mean the colours it was trained "
                "on, so a palette fitted here would feed it other colours. Set model.igpt.palette to the "
                f"checkpoint's clusters file (its {palette.PREPROCESSOR_CONFIG} or OpenAI's {palette.KMEANS_CENTERS}), "
                f"or model.igpt.palette={FIT_PALETTE!r} to fit a k-means palette on the analysed images anyway"
            )
        return "checkpoint", found
    if source in ("trained", "untrained"):  # a model of a training workdir: the palette it trained with
        return "trained", epath.Path(path) / "palette.npy"
    if source == "orbax" and path is not None and (found := palette.checkpoint_palette(path)) is not None:
        return "checkpoint", found  # saved with its clusters (experiments/export.py writes them)
    return "fitted", None


def load_palette_for(kind: str, path: epath.Path | None, images: np.ndarray, n_colors: int, *, seed: int,
                     workdir: epath.Path) -> tuple[np.ndarray, dict]:
    """The palette `palette_source` named, loaded (or fitted on `images` and saved as workdir/palette.npy).

    Returns:
      (float32 [K, 3] palette in [-1, 1], the record for the results: {"kind", "path", "n_colors", "digest"}).
    """
    if kind == "fitted":
        colours = palette.fit_palette(images if images.shape[-1] == 3 else np.repeat(images, 3, -1), n_colors,
                                      seed=seed)
        path = palette.save_palette(epath.Path(workdir) / "palette.npy", colours)
    else:
        colours = palette.load_palette(path)
    return colours, {"kind": kind, "path": str(path), "n_colors": len(colours),
                     "digest": palette.palette_digest(colours)}


def check_settings(settings: Any) -> None:
    """Refuses, before any model is loaded, a pretrained checkpoint without its colour clusters."""
    palette_source(settings.source, settings.get("path"), settings.igpt.get("palette"))


def make_encoder(config: IGPTConfig, params: Any, settings: Any, examples: Any, *, workdir: PathLike,
                 batch_size: int):
    """Extraction encoder: uint8 images [B, H, W, C] -> palette ids -> pooled states of every layer.

    `settings.igpt`: stream ("paper" | "residual") and palette (see `palette_source`). A fitted palette
    is fitted on every analysed image (`examples.inputs`) and saved in `workdir`. Batches are padded to
    `batch_size` rows so the last, short one reuses the compiled shape.
    """
    from models.registry import FamilyEncoder, to_host

    own = settings.igpt
    kind, path = palette_source(settings.source, settings.get("path"), own.get("palette"))
    images = examples.inputs
    colours, palette_record = load_palette_for(kind, path, images, config.n_colors, seed=settings.get("seed", 0),
                                               workdir=workdir)
    if len(colours) != config.n_colors:
        raise ValueError(f"palette has {len(colours)} colours but the model expects {config.n_colors}")
    n_pixels = int(np.prod(images.shape[1:3]))
    if n_pixels > config.n_positions:
        raise ValueError(f"images give {n_pixels} pixels but the model has {config.n_positions} positions")
    model = IGPT(config)
    stream = own.get("stream", "paper")

    def prepare_batch(batch_images: np.ndarray) -> dict:
        batch_images = np.asarray(batch_images)
        if batch_images.shape[-1] == 1:
            batch_images = np.repeat(batch_images, 3, axis=-1)
        tokens = add_start_token(palette.quantize(batch_images, colours), config.start_token)
        filler = np.full((max(batch_size - len(tokens), 0),) + tokens.shape[1:], config.start_token, tokens.dtype)
        return {"tokens": np.concatenate([tokens, filler]), "rows": len(tokens)}

    def pooled_states(batch: dict) -> np.ndarray:
        return to_host(pooled_hidden_states(model, params, batch["tokens"], stream=stream))[:, : batch["rows"]]

    description = {"family": "igpt", "source": settings.source, "path": str(settings.get("path")), "stream": stream,
                   "config": config.to_dict(),
                   "palette": {key: value for key, value in palette_record.items() if key != "path"},
                   "locations": {"palette": palette_record["path"]}}
    return FamilyEncoder(config.n_layer, prepare_batch, pooled_states, description)


# Training: next-pixel prediction on quantized images.
TRAINING_DATA = "images"
LOSS_NAME = "next-pixel cross-entropy (nats)"


def training_config(model_settings: Any, data: Any) -> IGPTConfig:
    """The config of a model trained here: a training config's `model` block; colours and length from the data."""
    return IGPTConfig(
        vocab_size=data.info["n_colors"] + 1, n_positions=data.seq_len, n_embd=model_settings.embed_dim,
        n_layer=model_settings.num_layers, n_head=model_settings.num_heads, ffn_dim=model_settings.get("ffn_dim"),
        dtype=model_settings.get("dtype", "float32"),
    )


def token_losses(config: IGPTConfig, train_settings: Any) -> Callable:
    """(params, pixels [B, T], key) -> (next-pixel cross-entropy [B, T], weights: all ones)."""
    import optax

    del train_settings
    model = IGPT(config)

    def losses(params, pixels, key):
        del key
        logits = model.apply({"params": params}, add_start_token(pixels, config.start_token))["logits"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), pixels)
        return ce, jnp.ones_like(ce)

    return losses
