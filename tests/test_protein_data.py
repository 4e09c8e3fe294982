"""Protein FASTA readers (facts from $IDJAX_SHARED_DATA/SOURCES.md) and the ESM tokenizer / batcher."""

import collections
import gzip

import numpy as np
import pytest

from experiments import protein_datasets as pd
from models import protein_tokenizer as tk

# --------------------------------------------------------------------------------------------------
# Readers on the shared files
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scope(shared_data):
    return pd.read_scope_astral(shared_data / pd.SCOPE_ASTRAL_40_207)


@pytest.fixture(scope="module")
def ecoli(shared_data):
    return pd.read_uniprot_fasta(shared_data / pd.ECOLI_PROTEOME)


def test_scope_facts(scope):
    assert len(scope) == 14_323
    assert len(set(scope.ids)) == 14_323
    names = scope.label_names["class"]
    counts = collections.Counter(names[c] for c in scope.labels["class"])
    assert counts == {"a": 2540, "b": 2895, "c": 4160, "d": 3462, "e": 279, "f": 272, "g": 715}
    assert {k: len(v) for k, v in scope.label_names.items()} == {
        "class": 7, "fold": 1232, "superfamily": 2024, "family": 4583
    }
    lengths = scope.lengths()
    assert (lengths.min(), lengths.max()) == (20, 1664)
    assert lengths.mean() == pytest.approx(182.3, abs=0.05)
    # First record, read by eye from the file.
    assert scope.ids[0] == "d1dlwa_"
    assert scope.label_names["family"][scope.labels["family"][0]] == "a.1.1.1"
    assert scope.label_names["superfamily"][scope.labels["superfamily"][0]] == "a.1.1"
    assert scope.sequences[0].startswith("SLFEQLGGQAAVQAVTAQFYANIQADATVATFFNGIDMPNQ")
    assert scope.descriptions[0].startswith("(A:) Protozoan/bacterial hemoglobin")
    # Upper-cased: lowercase x (unknown) and uppercase X (junction) both become X.
    assert all(s == s.upper() for s in scope.sequences)
    assert sum("X" in s for s in scope.sequences) > 331


def test_scope_labels_are_nested(scope):
    fam_names = scope.label_names["family"]
    sf_names = scope.label_names["superfamily"]
    for f, s in zip(scope.labels["family"][:500], scope.labels["superfamily"][:500], strict=True):
        assert fam_names[f].startswith(sf_names[s] + ".")


def test_ecoli_facts(ecoli):
    assert len(ecoli) == 4_391
    assert len(set(ecoli.ids)) == 4_391
    assert ecoli.ids[0] == "A0A385XJ53"
    assert ecoli.descriptions[0].startswith("INSA9_ECOLI Insertion element IS1 9 protein InsA")
    assert np.bincount(ecoli.labels["db"]).tolist() == [4389, 2]  # ("sp", "tr")
    lengths = ecoli.lengths()
    assert lengths.sum() == 1_354_179
    assert (lengths.min(), lengths.max()) == (8, 2358)
    assert (lengths > tk.MAX_RESIDUES).sum() == 54


def test_datasets_tokenize_cleanly(scope, ecoli):
    # Every shared sequence is valid ESM input (no unknown letters); long ones need a policy.
    for ds in (scope, ecoli):
        toks = tk.tokenize_many(ds.pairs(), long_policy="crop")
        assert len(toks) == len(ds)
        assert all(t.n_mapped_to_x == 0 for t in toks)
    assert sum(t.policy_applied == "crop" for t in tk.tokenize_many(ecoli.pairs(), long_policy="crop")) == 54


def test_subset_keeps_codes(scope):
    sub = scope.subset([5, 0])
    assert sub.ids == (scope.ids[5], scope.ids[0])
    assert sub.labels["fold"].tolist() == [scope.labels["fold"][5], scope.labels["fold"][0]]
    assert sub.label_names is not scope.label_names and sub.label_names == scope.label_names


# --------------------------------------------------------------------------------------------------
# Reader errors
# --------------------------------------------------------------------------------------------------


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.fa"
    with pytest.raises(pd.FastaError, match="nope.fa"):
        pd.read_scope_astral(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "no FASTA records"),
        ("ACDE\n>x a.1.1.1\nAC\n", r":1: sequence text before"),
        (">d1 a.1.1.1 desc\n\n>d2 a.1.1.1\nAC\n", r":1: record 'd1 a.1.1.1 desc' has no sequence"),
        (">d1 a.1.1.1\nAC1D\n", r":2: unexpected characters"),
        (">\nAC\n", r":1: empty FASTA header"),
        (">d1 notansccs x\nAC\n", r":1: not a SCOPe ASTRAL header"),
        (">d1 a.1.1.1\nAC\n>d1 a.1.1.2\nAG\n", "duplicate identifier 'd1'"),
    ],
)
def test_malformed_scope(tmp_path, text, match):
    path = tmp_path / "bad.fa"
    path.write_text(text)
    with pytest.raises(pd.FastaError, match=match) as err:
        pd.read_scope_astral(path)
    assert "bad.fa" in str(err.value)


def test_malformed_uniprot_header(tmp_path):
    path = tmp_path / "u.fasta"
    path.write_text(">sp|P1|A_B ok\nMK\n>gi12345 not uniprot\nMK\n")
    with pytest.raises(pd.FastaError, match=r"u.fasta:3: not a UniProt header"):
        pd.read_uniprot_fasta(path)


def test_gzip_and_crlf(tmp_path):
    path = tmp_path / "s.fa.gz"
    with gzip.open(path, "wt", newline="") as f:
        f.write(">d1abca_ b.2.3.4 (A:) thing\r\nacdx\r\nXY\r\n")
    ds = pd.read_scope_astral(path)
    assert ds.sequences == ("ACDXXY",) and ds.ids == ("d1abca_",)
    assert ds.label_names["fold"] == ("b.2",)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "t.fa.gz"
    path.write_bytes(gzip.compress(b">d1 a.1.1.1\n" + b"ACDE\n" * 2000)[:60])
    with pytest.raises(pd.FastaError, match="t.fa.gz"):
        pd.read_scope_astral(path)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def test_alphabet_matches_hf_vocab(shared_data):
    vocab = (shared_data / "configs/esm2_t6_8M_UR50D/vocab.txt").read_text().split()
    assert tuple(vocab) == tk.ALPHABET
    assert len(tk.ALPHABET) == 33 and tk.MASK_ID == 32 and tk.X_ID == 24


def test_tokenize_basic_and_lowercase():
    t = tk.tokenize("mKlA", seq_id="s1")
    (piece,) = t.pieces
    assert piece.dtype == np.int32
    assert piece.tolist() == [0, 20, 15, 4, 5, 2]
    assert t.policy_applied == "none" and t.spans == ((0, 4),) and t.n_residues == 4
    assert tk.decode(piece) == "<cls>MKLA<eos>"


def test_inline_mask_and_whitespace():
    t = tk.tokenize("AC<mask>D E\nF")
    assert t.pieces[0].tolist() == [0, 5, 23, 32, 13, 9, 18, 2]


@pytest.mark.parametrize("bad, char, pos", [("ACJD", "'J'", 3), ("AC*", "'*'", 3), ("A-C", "'-'", 2),
                                            ("AC<foo>", "'<foo>'", 3)])
def test_unknown_residue_rejected(bad, char, pos):
    with pytest.raises(tk.UnknownResidueError) as err:
        tk.tokenize(bad, seq_id="P12345")
    msg = str(err.value)
    assert "'P12345'" in msg and char in msg and f"position {pos}" in msg


def test_unknown_mapped_to_x():
    t = tk.tokenize("ACJ*D", unknown="X")
    assert t.pieces[0].tolist() == [0, 5, 23, 24, 24, 13, 2]
    assert t.n_mapped_to_x == 2


def test_empty_sequence_rejected():
    with pytest.raises(ValueError, match="'e1' is empty"):
        tk.tokenize("", seq_id="e1")


def test_long_policies():
    seq = "A" * 1000 + "C" * 100  # 1100 residues
    with pytest.raises(tk.SequenceTooLongError, match=r"'long1' has 1100 residues"):
        tk.tokenize(seq, seq_id="long1")
    crop = tk.tokenize(seq, long_policy="crop")
    assert crop.policy_applied == "crop" and crop.spans == ((0, 1022),) and crop.n_residues == 1100
    assert len(crop.pieces[0]) == 1024
    win = tk.tokenize(seq, long_policy="windows")
    assert win.policy_applied == "windows"
    assert win.spans == ((0, 1022), (78, 1100))  # stride 511: 0, then the last window ends at n
    assert all(len(p) == 1024 and p[0] == tk.CLS_ID and p[-1] == tk.EOS_ID for p in win.pieces)
    assert win.pieces[1][-2] == tk.TOKEN_TO_ID["C"]
    win3 = tk.tokenize("A" * 25, long_policy="windows", max_residues=10, window_stride=5)
    assert win3.spans == ((0, 10), (5, 15), (10, 20), (15, 25))
    # Every residue covered.
    covered = np.zeros(25, bool)
    for s, e in win3.spans:
        covered[s:e] = True
    assert covered.all()


def test_length_bucketed_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=23)
    seqs = [tk.tokenize("A" * int(n), seq_id=f"s{i}") for i, n in enumerate(lengths)]
    batches = tk.length_bucketed_batches(seqs, batch_size=5, pad_to_multiple=8)
    assert sum(len(b.source) for b in batches) == 23
    assert sorted(int(i) for b in batches for i in b.source) == list(range(23))
    prev = 0
    for b in batches:
        assert b.tokens.dtype == np.int32 and b.tokens.shape[1] % 8 == 0 and len(b.source) <= 5
        assert b.tokens.shape[1] >= b.lengths.max() > b.tokens.shape[1] - 8
        assert b.lengths.min() >= prev  # ascending
        prev = b.lengths.max()
        for row, (src, n) in enumerate(zip(b.source, b.lengths, strict=True)):
            np.testing.assert_array_equal(b.tokens[row, :n], seqs[src].pieces[0])
            assert (b.tokens[row, n:] == tk.PAD_ID).all()


def test_batches_fixed_size_and_token_budget():
    seqs = [tk.tokenize("A" * n, seq_id=str(n)) for n in (3, 5, 100, 7)]
    fixed = tk.length_bucketed_batches(seqs, batch_size=3, fixed_batch_size=True)
    assert [b.tokens.shape[0] for b in fixed] == [3, 3]
    assert fixed[1].valid.tolist() == [True, False, False]
    assert (fixed[1].tokens[1:] == tk.PAD_ID).all()
    budget = tk.length_bucketed_batches(seqs, batch_size=10, max_tokens=64)
    assert all(b.tokens.size <= 64 or len(b.source) == 1 for b in budget)
    assert [len(b.source) for b in budget] == [3, 1]
    windows = tk.length_bucketed_batches([tk.tokenize("A" * 30, long_policy="windows", max_residues=20)],
                                         batch_size=4)
    assert windows[0].piece.tolist() == [0, 1]
