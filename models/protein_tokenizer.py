"""ESM alphabet, tokenization and length-bucketed batching for protein sequences.

ESM-2 (fair-esm "ESM-1b" alphabet, identical to HF `vocab.txt`) has 33 tokens; an input is
`<cls> residues <eos>`, right-padded with `<pad>`. The published models saw at most 1024 positions,
i.e. 1022 residues; what happens to longer sequences is an explicit policy recorded in the result.
Pure numpy: nothing here touches jax, so it can run in data-loading threads.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np

ALPHABET: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    *"LAGVSERTIDPKQNFYMHWCXBUZO",
    ".", "-", "<null_1>", "<mask>",
)
TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(ALPHABET)}
CLS_ID, PAD_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
X_ID = TOKEN_TO_ID["X"]
MASK_ID = TOKEN_TO_ID["<mask>"]
# 1024 positions in training = <cls> + 1022 residues + <eos> (HF's max_position_embeddings 1026
# counts two more, a leftover of the ESM-1b learned positions; do not use it as the residue limit).
MAX_RESIDUES = 1022

# Only amino-acid letters are residues. '.' and '-' are alignment symbols and the <...> specials other
# than <mask>/<unk> mean nothing inside a sequence, so they are treated as unknown.
RESIDUE_LETTERS = "LAGVSERTIDPKQNFYMHWCXBUZO"
_INLINE_SPECIALS = ("<mask>", "<unk>")
_PIECE_RE = re.compile(r"<[^<>]*>|.", re.DOTALL)

UnknownPolicy = Literal["error", "X"]
LongPolicy = Literal["error", "crop", "windows"]


class UnknownResidueError(ValueError):
    """A sequence holds a character that is not an ESM residue letter."""


class SequenceTooLongError(ValueError):
    """A sequence exceeds the residue limit under `long_policy='error'`."""


@dataclasses.dataclass(frozen=True)
class TokenizedSequence:
    """One sequence as one or more model inputs.

    Attributes:
      seq_id: the caller's identifier.
      pieces: int32 arrays `<cls> residues <eos>`, one per model input (several only for "windows").
      spans: for each piece, the [start, end) residue range of the original sequence it covers.
      n_residues: length of the original sequence.
      policy_applied: "none" (fits), "crop" (only the first `max_residues` residues kept) or
        "windows" (overlapping windows; residues in overlaps appear in more than one piece).
      n_mapped_to_x: how many unknown characters were replaced by X (unknown="X").
    """

    seq_id: str
    pieces: tuple[np.ndarray, ...]
    spans: tuple[tuple[int, int], ...]
    n_residues: int
    policy_applied: Literal["none", "crop", "windows"]
    n_mapped_to_x: int = 0


def residue_ids(sequence: str, *, seq_id: str = "?", unknown: UnknownPolicy = "error") -> tuple[np.ndarray, int]:
    """Residue token ids (no specials) of one sequence, upper-casing it first.

    Inline `<mask>` and `<unk>` are accepted (one position each). Whitespace is ignored.

    Returns:
      (int32 [n_residues], number of characters mapped to X).

    Raises:
      UnknownResidueError naming `seq_id`, the character and its 1-based position, if unknown="error".
    """
    if unknown not in ("error", "X"):
        raise ValueError(f"unknown must be 'error' or 'X', got {unknown!r}")
    ids: list[int] = []
    mapped = 0
    for match in _PIECE_RE.finditer("".join(sequence.split())):
        piece = match.group()
        if piece in _INLINE_SPECIALS:
            ids.append(TOKEN_TO_ID[piece])
            continue
        up = piece.upper()
        if len(up) == 1 and up in RESIDUE_LETTERS:
            ids.append(TOKEN_TO_ID[up])
            continue
        if unknown == "X":
            ids.append(X_ID)
            mapped += 1
            continue
        raise UnknownResidueError(
            f"sequence {seq_id!r}: unknown residue {piece!r} at position {len(ids) + 1}; allowed are "
            f"{RESIDUE_LETTERS} (any case), <mask> and <unk>. Pass unknown='X' to map it to X."
        )
    return np.asarray(ids, dtype=np.int32), mapped


def _wrap(ids: np.ndarray) -> np.ndarray:
    return np.concatenate([[CLS_ID], ids, [EOS_ID]]).astype(np.int32)


def window_spans(n: int, size: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) windows of `size` covering 0..n with step `stride`; the last one ends at n."""
    if n <= size:
        return [(0, n)]
    starts = list(range(0, n - size, stride)) + [n - size]
    return [(s, s + size) for s in starts]


def tokenize(
    sequence: str,
    *,
    seq_id: str = "?",
    unknown: UnknownPolicy = "error",
    long_policy: LongPolicy = "error",
    max_residues: int = MAX_RESIDUES,
    window_stride: int | None = None,
) -> TokenizedSequence:
    """Tokenizes one protein sequence as `<cls> seq <eos>`.

    Args:
      sequence: amino-acid letters (lowercase accepted).
      seq_id: used in error messages and carried in the result.
      unknown: "error" rejects any non-residue character; "X" maps it to X.
      long_policy: for more than `max_residues` residues: "error" raises, "crop" keeps the first
        `max_residues` (as fair-esm's `truncation_seq_length`), "windows" splits into overlapping windows.
      max_residues: residue limit per piece (1022 for the published ESM-2 models).
      window_stride: step between windows (default max_residues // 2).

    Returns:
      A TokenizedSequence whose `policy_applied` and `spans` state exactly what was done.
    """
    if isinstance(max_residues, bool) or not isinstance(max_residues, int) or max_residues < 1:
        raise ValueError(f"max_residues must be a positive integer (1022 for the published ESM-2 models); "
                         f"got {max_residues!r}")
    ids, mapped = residue_ids(sequence, seq_id=seq_id, unknown=unknown)
    n = len(ids)
    if n == 0:
        raise ValueError(f"sequence {seq_id!r} is empty")
    if n <= max_residues:
        return TokenizedSequence(seq_id, (_wrap(ids),), ((0, n),), n, "none", mapped)
    if long_policy == "error":
        raise SequenceTooLongError(
            f"sequence {seq_id!r} has {n} residues, more than {max_residues}; "
            "choose long_policy='crop' or 'windows'"
        )
    if long_policy == "crop":
        return TokenizedSequence(seq_id, (_wrap(ids[:max_residues]),), ((0, max_residues),), n, "crop", mapped)
    if long_policy == "windows":
        stride = window_stride or max_residues // 2
        if not 0 < stride <= max_residues:
            raise ValueError(f"window_stride must be in (0, {max_residues}], got {stride}")
        spans = window_spans(n, max_residues, stride)
        pieces = tuple(_wrap(ids[s:e]) for s, e in spans)
        return TokenizedSequence(seq_id, pieces, tuple(spans), n, "windows", mapped)
    raise ValueError(f"long_policy must be 'error', 'crop' or 'windows', got {long_policy!r}")


def tokenize_many(
    sequences: Iterable[tuple[str, str]], **kwargs
) -> list[TokenizedSequence]:
    """`tokenize` over (seq_id, sequence) pairs; keyword arguments as for `tokenize`."""
    return [tokenize(seq, seq_id=sid, **kwargs) for sid, seq in sequences]


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """A padded batch of pieces.

    Attributes:
      tokens: int32 [B, T], right-padded with PAD_ID; T is a multiple of `pad_to_multiple`.
      source: int [B] index into the list given to `length_bucketed_batches` (-1 for filler rows).
      piece: int [B] which piece (window) of that sequence the row holds (-1 for filler rows).
      lengths: int [B] tokens per row including <cls>/<eos> (0 for filler rows).
    """

    tokens: np.ndarray
    source: np.ndarray
    piece: np.ndarray
    lengths: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """bool [B]: rows that hold a real piece (filler rows exist only with fixed_batch_size)."""
        return self.source >= 0


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= n (padded batch shapes: rows and widths)."""
    return -(-n // multiple) * multiple


def length_bucketed_batches(
    seqs: Sequence[TokenizedSequence],
    *,
    batch_size: int,
    max_tokens: int | None = None,
    pad_to_multiple: int = 8,
    fixed_batch_size: bool = False,
) -> list[TokenBatch]:
    """Sorts all pieces by length and packs them into right-padded batches.

    Sorting keeps padding small; rounding T up to `pad_to_multiple` bounds the number of distinct
    shapes, hence jit recompiles. With `max_tokens`, a batch also stops growing once B * T would
    exceed it (long sequences get small batches). With `fixed_batch_size`, short batches are filled
    with all-padding rows (source = -1) so that B never changes either.

    Returns:
      Batches in ascending length order; `source`/`piece` map each row back to its input.
    """
    if batch_size < 1 or pad_to_multiple < 1:
        raise ValueError("batch_size and pad_to_multiple must be >= 1")
    if fixed_batch_size and max_tokens is not None:
        raise ValueError("fixed_batch_size pads every batch to batch_size rows; it cannot honour max_tokens")
    rows = [(len(p), i, j) for i, s in enumerate(seqs) for j, p in enumerate(s.pieces)]
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    groups: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    for row in rows:
        width = round_up(row[0], pad_to_multiple)  # ascending order: the new row is the widest
        too_many = len(current) >= batch_size
        too_big = max_tokens is not None and current and (len(current) + 1) * width > max_tokens
        if current and (too_many or too_big):
            groups.append(current)
            current = []
        current.append(row)
    if current:
        groups.append(current)

    batches = []
    for group in groups:
        width = round_up(group[-1][0], pad_to_multiple)
        n_rows = batch_size if fixed_batch_size else len(group)
        tokens = np.full((n_rows, width), PAD_ID, dtype=np.int32)
        source = np.full(n_rows, -1, dtype=np.int64)
        piece = np.full(n_rows, -1, dtype=np.int64)
        lengths = np.zeros(n_rows, dtype=np.int64)
        for r, (length, i, j) in enumerate(group):
            tokens[r, :length] = seqs[i].pieces[j]
            source[r], piece[r], lengths[r] = i, j, length
        batches.append(TokenBatch(tokens, source, piece, lengths))
    return batches


def decode(tokens: Sequence[int] | np.ndarray) -> str:
    """Token ids back to a string (specials kept in <...> form, padding dropped)."""
    return "".join(ALPHABET[int(t)] for t in np.asarray(tokens).ravel() if int(t) != PAD_ID)
