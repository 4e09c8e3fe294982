"""Protein sequence datasets from FASTA files (see $IDJAX_SHARED_DATA/SOURCES.md), local or at any
`etils.epath` URI (gs://...), plain or gzipped.

  - SCOPe/ASTRAL (`read_scope_astral`): headers `>d1dlwa_ a.1.1.1 (A:) description`; the sccs
    `class.fold.superfamily.family` gives four nested labels. Sequences are lowercase in the file and
    are upper-cased here; both the uppercase `X` (junction of a discontinuous domain) and the
    lowercase `x` (unknown residue) become ESM's `X`.
  - UniProt (`read_uniprot_fasta`): headers `>sp|P12345|NAME_ORG description`; no labels.

Every reader returns a `ProteinDataset` (ids, upper-case sequences, integer-coded labels per level).
Errors name the file, and for malformed content the line number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import os
import re
from collections.abc import Iterator, Sequence

import numpy as np
from etils import epath

PathLike = str | os.PathLike

SCOPE_ASTRAL_40_207 = "protein/astral-scopedom-seqres-gd-sel-gs-bib-40-2.07.fa"
ECOLI_PROTEOME = "protein/UP000000625_83333.fasta"
SCOPE_LEVELS = ("class", "fold", "superfamily", "family")

_SCCS_RE = re.compile(r"^[a-l]\.\d+\.\d+\.\d+$")
_SEQ_LINE_RE = re.compile(r"[A-Za-z*.\-]+")
_UNIPROT_RE = re.compile(r"^(sp|tr)\|([^|\s]+)\|(\S+)(?:\s+(.*))?$")


class FastaError(ValueError):
    """A FASTA file is missing or malformed; the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class FastaRecord:
    header: str  # without the leading '>'
    sequence: str  # as in the file, line breaks removed
    line: int  # 1-based line number of the header


@contextlib.contextmanager
def _open_text(path: epath.Path) -> Iterator[io.TextIOWrapper]:
    # Bytes through epath (its text mode is UTF-8 only), decoded here: ASCII, universal newlines.
    with path.open("rb") as raw:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
        with io.TextIOWrapper(stream, encoding="ascii", newline=None) as text:
            yield text


def read_fasta(path: PathLike) -> list[FastaRecord]:
    """Reads every record of a (optionally .gz) FASTA file.

    Raises:
      FastaError if the file is missing, empty, not ASCII, has text before the first header, or has a
      record with an empty header or no sequence.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise FastaError(f"FASTA file not found: {path}")
    records: list[FastaRecord] = []
    header: str | None = None
    header_line = 0
    chunks: list[str] = []

    def close() -> None:
        if header is not None:
            if not chunks:
                raise FastaError(f"{path}:{header_line}: record {header!r} has no sequence")
            records.append(FastaRecord(header, "".join(chunks), header_line))

    try:
        with _open_text(path) as f:
            for n, raw in enumerate(f, start=1):
                line = raw.strip()
                if not line:
                    continue
                if line.startswith(">"):
                    close()
                    header, header_line, chunks = line[1:].strip(), n, []
                    if not header:
                        raise FastaError(f"{path}:{n}: empty FASTA header")
                elif header is None:
                    raise FastaError(f"{path}:{n}: sequence text before the first '>' header; not FASTA?")
                else:
                    # Letters, plus '*' (stop), '.' and '-' (alignments); the tokenizer decides what is valid.
                    if not _SEQ_LINE_RE.fullmatch(line):
                        raise FastaError(f"{path}:{n}: unexpected characters in sequence line {line[:40]!r}")
                    chunks.append(line)
            close()
    except UnicodeDecodeError as err:
        raise FastaError(f"{path}: not an ASCII text FASTA file ({err})") from err
    except (OSError, EOFError) as err:  # e.g. a truncated .gz
        raise FastaError(f"{path}: cannot read ({err})") from err
    if not records:
        raise FastaError(f"{path}: no FASTA records")
    return records


@dataclasses.dataclass(frozen=True, eq=False)
class ProteinDataset:
    """Sequences with optional integer-coded labels.

    Attributes:
      ids: one identifier per record (SCOPe sid, UniProt accession).
      sequences: upper-case residue strings.
      labels: level -> int64 [N] codes into `label_names[level]` (empty for unlabelled data).
      label_names: level -> the sorted distinct label strings.
      descriptions: the rest of each header.
    """

    name: str
    ids: tuple[str, ...]
    sequences: tuple[str, ...]
    labels: dict[str, np.ndarray]
    label_names: dict[str, tuple[str, ...]]
    descriptions: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)

    def pairs(self) -> Iterator[tuple[str, str]]:
        """(id, sequence) pairs, the input of `models.protein_tokenizer.tokenize_many`."""
        return zip(self.ids, self.sequences, strict=True)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self))

    def subset(self, indices: Sequence[int] | np.ndarray) -> ProteinDataset:
        """Rows `indices` (label codes and names unchanged, so codes stay comparable)."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = lambda xs: tuple(xs[i] for i in idx)
        return ProteinDataset(
            self.name, pick(self.ids), pick(self.sequences),
            {k: v[idx] for k, v in self.labels.items()}, dict(self.label_names), pick(self.descriptions),
        )


def _encode(values: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    names = tuple(sorted(set(values)))
    code = {n: i for i, n in enumerate(names)}
    return np.fromiter((code[v] for v in values), dtype=np.int64, count=len(values)), names


def _check_unique(ids: Sequence[str], path: epath.Path) -> None:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise FastaError(f"{path}: duplicate identifier {i!r}")
        seen.add(i)


def scope_labels(sccs: str) -> dict[str, str]:
    """'a.1.1.2' -> {class: 'a', fold: 'a.1', superfamily: 'a.1.1', family: 'a.1.1.2'}."""
    parts = sccs.split(".")
    return {level: ".".join(parts[: i + 1]) for i, level in enumerate(SCOPE_LEVELS)}


def read_scope_astral(path: PathLike) -> ProteinDataset:
    """SCOPe ASTRAL FASTA -> ProteinDataset with labels class / fold / superfamily / family."""
    path = epath.Path(path)
    ids, seqs, descs, per_level = [], [], [], {level: [] for level in SCOPE_LEVELS}
    for rec in read_fasta(path):
        fields = rec.header.split(None, 2)
        if len(fields) < 2 or not _SCCS_RE.match(fields[1]):
            raise FastaError(
                f"{path}:{rec.line}: not a SCOPe ASTRAL header (want '>sid class.fold.superfamily.family ...'): "
                f"{rec.header[:80]!r}"
            )
        ids.append(fields[0])
        seqs.append(rec.sequence.upper())
        descs.append(fields[2] if len(fields) > 2 else "")
        for level, value in scope_labels(fields[1]).items():
            per_level[level].append(value)
    _check_unique(ids, path)
    labels, names = {}, {}
    for level in SCOPE_LEVELS:
        labels[level], names[level] = _encode(per_level[level])
    return ProteinDataset(path.name, tuple(ids), tuple(seqs), labels, names, tuple(descs))


def read_uniprot_fasta(path: PathLike) -> ProteinDataset:
    """UniProt FASTA (`>sp|ACC|NAME desc`) -> ProteinDataset keyed by accession, no labels.

    The database (sp/tr) is kept as a label level "db" since it is free and sometimes useful.
    """
    path = epath.Path(path)
    ids, seqs, descs, dbs = [], [], [], []
    for rec in read_fasta(path):
        m = _UNIPROT_RE.match(rec.header)
        if not m:
            raise FastaError(f"{path}:{rec.line}: not a UniProt header (want '>sp|ACC|NAME ...'): {rec.header[:80]!r}")
        dbs.append(m.group(1))
        ids.append(m.group(2))
        descs.append(f"{m.group(3)} {m.group(4) or ''}".strip())
        seqs.append(rec.sequence.upper())
    _check_unique(ids, path)
    db_codes, db_names = _encode(dbs)
    return ProteinDataset(path.name, tuple(ids), tuple(seqs), {"db": db_codes}, {"db": db_names}, tuple(descs))
