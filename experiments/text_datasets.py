"""A real labelled text set available offline: SCOPe domain descriptions labelled by SCOP class.

Source: the headers of `protein/astral-scopedom-seqres-gd-sel-gs-bib-40-2.07.fa` in the shared data
(see its SOURCES.md), e.g.

  >d1dlwa_ a.1.1.1 (A:) Protozoan/bacterial hemoglobin {Ciliate (Paramecium caudatum) [TaxId: 5885]}
   sid     sccs    chain  description                     organism                    taxid

The label is the SCOP class, the first letter of the sccs (a all-alpha, b all-beta, c alpha/beta,
d alpha+beta, e multi-domain, f membrane, g small proteins).

Which text (decided here, on what the file holds):
- The text is the description, the SCOPe protein name (e.g. "Protozoan/bacterial hemoglobin").
  It is the curated English string that carries the structural information; the organism is
  nuisance for a class label and is available as `text="description+organism"`.
- 5,214 of the 14,323 records are named "automated matches" (SCOPe's placeholder for automatically
  classified domains). That string says nothing and occurs in every class, so those records are
  dropped by default.
- Identical texts are identical points in every layer (zero nearest-neighbour distance), which the
  estimators must not see silently. So each text is kept once; a text whose records span more than
  one class (331 descriptions, e.g. "Fumarate reductase" in a, c, d) has no single label and is dropped.
With the defaults this leaves 6,592 texts: a 1319, b 1347, c 1567, d 1643, e 142, f 151, g 423.

The sequences themselves are read by `experiments/protein_datasets.py`; this reader only parses headers.
"""

from __future__ import annotations

import dataclasses
import io
import os
import re
from collections.abc import Sequence

import numpy as np
from etils import epath

SCOPE_FASTA = "protein/astral-scopedom-seqres-gd-sel-gs-bib-40-2.07.fa"
SCOP_CLASSES = "abcdefg"
AUTOMATED = "automated matches"
TEXT_CHOICES = ("description", "description+organism")

# sid, sccs, (chain/region), description, {organism [TaxId: n]}. The description may itself hold
# parentheses and commas; the organism is always the final brace group.
_HEADER = re.compile(r"^(\S+) ([a-l]\.\d+\.\d+\.\d+) \(([^)]*)\) (.*?) \{(.*)\}\s*$")
_TAXID = re.compile(r"\s*\[TaxId: (\d+)\]\s*$")


class TextDatasetError(ValueError):
    """A text data file is missing or does not have the expected format."""


@dataclasses.dataclass(frozen=True)
class ScopRecord:
    sid: str
    sccs: str
    region: str
    description: str
    organism: str  # without the "[TaxId: n]" suffix
    taxid: int | None

    @property
    def scop_class(self) -> str:
        return self.sccs.split(".", 1)[0]


@dataclasses.dataclass(frozen=True)
class TextDataset:
    """Texts with integer labels; `label_names[labels[i]]` is the SCOP class letter of `texts[i]`."""

    texts: tuple[str, ...]
    labels: np.ndarray  # int32 (N,)
    label_names: tuple[str, ...]
    ids: tuple[str, ...]  # sid of the (first) record each text came from

    def __len__(self) -> int:
        return len(self.texts)


def scope_fasta_path(shared_data: str | os.PathLike) -> epath.Path:
    return epath.Path(shared_data) / SCOPE_FASTA


def parse_scope_header(header: str) -> ScopRecord:
    """Parses one ASTRAL header line (with or without the leading '>')."""
    match = _HEADER.match(header.removeprefix(">").rstrip("\r\n"))
    if match is None:
        raise TextDatasetError(f"not a SCOPe ASTRAL header: {header!r}")
    sid, sccs, region, description, organism = match.groups()
    tax = _TAXID.search(organism)
    return ScopRecord(
        sid=sid,
        sccs=sccs,
        region=region,
        description=description.strip(),
        organism=organism[: tax.start()].strip() if tax else organism.strip(),
        taxid=int(tax.group(1)) if tax else None,
    )


def read_scope_headers(path: str | os.PathLike) -> list[ScopRecord]:
    """Every header record of a SCOPe ASTRAL FASTA file (local or an `etils.epath` URI such as gs://), in file
    order (sequence lines skipped)."""
    path = epath.Path(path)
    if not path.is_file():
        raise TextDatasetError(f"SCOPe FASTA file not found: {path}")
    records = []
    with path.open("rb") as raw, io.TextIOWrapper(raw, encoding="utf-8") as f:  # universal newlines on every backend
        for lineno, line in enumerate(f, 1):
            if line.startswith(">"):
                try:
                    records.append(parse_scope_header(line))
                except TextDatasetError as err:
                    raise TextDatasetError(f"{path}:{lineno}: {err}") from None
    if not records:
        raise TextDatasetError(f"{path} holds no FASTA headers ('>' lines); is it the ASTRAL file?")
    return records


def record_text(record: ScopRecord, text: str = "description") -> str:
    """The string given to the text model for one record (see the module docstring)."""
    if text == "description":
        return record.description
    if text == "description+organism":
        return f"{record.description} ({record.organism})"
    raise ValueError(f"text must be one of {TEXT_CHOICES}, got {text!r}")


def scope_text_dataset(
    path: str | os.PathLike,
    *,
    text: str = "description",
    drop_automated: bool = True,
    unique: bool = True,
    classes: Sequence[str] = SCOP_CLASSES,
) -> TextDataset:
    """SCOPe header texts labelled by SCOP class.

    Args:
      path: the ASTRAL FASTA file.
      text: "description" or "description+organism".
      drop_automated: drop records whose description is the "automated matches" placeholder.
      unique: keep each text once (first record in file order); drop texts seen in > 1 class.
      classes: SCOP class letters to keep; label ids follow this order.
    """
    classes = tuple(classes)
    unknown = set(classes) - set(SCOP_CLASSES)
    if unknown:
        raise ValueError(f"unknown SCOP classes {sorted(unknown)}; expected letters of {SCOP_CLASSES!r}")
    records = [r for r in read_scope_headers(path) if r.scop_class in classes]
    if drop_automated:
        records = [r for r in records if r.description != AUTOMATED]
    pairs = [(record_text(r, text), r) for r in records]
    if unique:
        classes_of: dict[str, set[str]] = {}
        for t, r in pairs:
            classes_of.setdefault(t, set()).add(r.scop_class)
        seen: set[str] = set()
        kept = []
        for t, r in pairs:
            if len(classes_of[t]) == 1 and t not in seen:
                seen.add(t)
                kept.append((t, r))
        pairs = kept
    index = {c: i for i, c in enumerate(classes)}
    return TextDataset(
        texts=tuple(t for t, _ in pairs),
        labels=np.array([index[r.scop_class] for _, r in pairs], np.int32),
        label_names=classes,
        ids=tuple(r.sid for _, r in pairs),
    )


def balanced_subsample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` examples drawn without replacement from every label, sorted.

    Raises ValueError naming the classes that have fewer than `per_class` examples.
    """
    labels = np.asarray(labels)
    values, counts = np.unique(labels, return_counts=True)
    short = {int(v): int(c) for v, c in zip(values, counts, strict=True) if c < per_class}
    if short:
        raise ValueError(f"classes with fewer than per_class={per_class} examples (label: count): {short}")
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == v), size=per_class, replace=False) for v in values]
    return np.sort(np.concatenate(picks))


def subset(data: TextDataset, indices: np.ndarray) -> TextDataset:
    """The examples of `data` at `indices`, in that order."""
    idx = np.asarray(indices)
    return dataclasses.replace(
        data,
        texts=tuple(data.texts[i] for i in idx),
        labels=data.labels[idx],
        ids=tuple(data.ids[i] for i in idx),
    )
