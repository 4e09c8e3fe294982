"""WordPiece tokenization for BERT-family checkpoints through their own `tokenizer.json`.

The `tokenizers` library runs the checkpoint's full pipeline (BertNormalizer with lowercasing,
BertPreTokenizer, WordPiece, the [CLS] ... [SEP] template), so ids match the HF tokenizer of the
same directory. Two settings stored inside all-MiniLM-L6-v2's tokenizer.json are NOT used: its
fixed padding to 128 and its truncation at 128. sentence-transformers truncates at
`max_seq_length` = 256 from sentence_bert_config.json and pads to the longest sequence of a batch;
we do the same (padding here, in numpy, so the tokenizer object is never mutated after loading).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np
from etils import epath

from models.checkpoints import CheckpointError, PathLike
from models.protein_tokenizer import round_up


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A loaded tokenizer with truncation fixed at `max_length` (special tokens included)."""

    tokenizer: object  # tokenizers.Tokenizer
    max_length: int
    pad_id: int
    pad_type_id: int = 0


def checkpoint_max_length(path: PathLike) -> int:
    """Max tokens per text for a HF / sentence-transformers directory.

    sentence_bert_config.json's `max_seq_length` when present (256 for all-MiniLM-L6-v2), capped by
    config.json's `max_position_embeddings` (512), which is the hard limit of the position table.
    """
    path = epath.Path(path)
    limits = []
    st_file = path / "sentence_bert_config.json"
    if st_file.is_file():
        limits.append(int(json.loads(st_file.read_text())["max_seq_length"]))
    cfg_file = path / "config.json"
    if cfg_file.is_file():
        limits.append(int(json.loads(cfg_file.read_text()).get("max_position_embeddings", 512)))
    if not limits:
        raise CheckpointError(f"{path} has neither sentence_bert_config.json nor config.json to bound lengths")
    return min(limits)


def load_tokenizer(path: PathLike, max_length: int | None = None) -> TextTokenizer:
    """Loads `path/tokenizer.json` (or that file itself) with the `tokenizers` library.

    Args:
      path: checkpoint directory or tokenizer.json file.
      max_length: truncation length including [CLS]/[SEP]; default `checkpoint_max_length(dir)`.
    """
    from tokenizers import Tokenizer

    path = epath.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no tokenizer.json at {file}")
    try:
        tok = Tokenizer.from_str(file.read_bytes().decode())  # read through epath (local or gs://...), as UTF-8
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"cannot parse {file}: {err}") from err
    if max_length is None:
        max_length = checkpoint_max_length(file.parent)
    pad = tok.padding or {}
    pad_token = pad.get("pad_token", "[PAD]")
    pad_id = tok.token_to_id(pad_token)
    if pad_id is None:
        raise CheckpointError(f"{file}: pad token {pad_token!r} is not in the vocabulary")
    tok.no_padding()
    # Truncation counts the template's special tokens, so sequences come out at most max_length long.
    tok.enable_truncation(max_length=max_length)
    return TextTokenizer(tokenizer=tok, max_length=max_length, pad_id=pad_id,
                         pad_type_id=int(pad.get("pad_type_id", 0)))


def encode_batch(
    tok: TextTokenizer,
    texts: Sequence[str],
    *,
    pad_to_multiple_of: int | None = None,
    length: int | None = None,
) -> dict[str, np.ndarray]:
    """Tokenizes texts, truncated to `tok.max_length` and right-padded.

    Args:
      texts: B strings.
      pad_to_multiple_of: round the padded length up (fewer distinct shapes, fewer recompiles).
      length: pad to exactly this length (must be >= the longest encoding).

    Returns:
      {"input_ids", "attention_mask", "token_type_ids"}: int32 (B, T), T = longest encoding unless
      `length`/`pad_to_multiple_of` say otherwise.
    """
    if isinstance(texts, str):
        raise TypeError("encode_batch takes a sequence of strings, not one string")
    encodings = tok.tokenizer.encode_batch(list(texts))
    longest = max((len(encoding.ids) for encoding in encodings), default=0)
    width = longest if length is None else length
    if width < longest:
        raise ValueError(f"length={length} is shorter than the longest encoding ({longest} tokens)")
    if pad_to_multiple_of:
        width = round_up(width, pad_to_multiple_of)
    shape = (len(encodings), width)
    ids = np.full(shape, tok.pad_id, np.int32)
    mask = np.zeros(shape, np.int32)
    types = np.full(shape, tok.pad_type_id, np.int32)
    for row, encoding in enumerate(encodings):
        n = len(encoding.ids)
        ids[row, :n] = encoding.ids
        mask[row, :n] = 1
        types[row, :n] = encoding.type_ids
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
