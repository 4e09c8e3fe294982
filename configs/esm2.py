"""ESM-2 on SCOPe domains labelled by superfamily (the paper's protein setting).

  --config=configs/esm2.py:650M --config.model.path=/ckpt/esm2_t33_650M_UR50D   (HF dir, safetensors)
  --config=configs/esm2.py:650M --config.model.source=fair_esm --config.model.path=esm2_t33_650M_UR50D.pt
  --config=configs/esm2.py:trained --config.model.path=workdirs/esm2_tiny_ecoli  (a model trained here)
  --config=configs/esm2.py:tiny   (random init; smoke test)

arg = a size key (8M, 35M, 150M, 650M, 3B, 15B), "trained", or "tiny". Superfamilies with at least
`data.min_class_size` members are kept; with `probe.remote_homology` the kNN probe never lets a
domain of the query's own family vote (the paper's remote-homology setting).
`--sweep` runs get_sweep(arg): every checkpoint directory listed in $IDJAX_ESM2_CHECKPOINTS
(colon-separated) or, by default, the trained tiny model at several k_max.
"""

import os

import ml_collections

from configs import base, common

SIZES = ("8M", "35M", "150M", "650M", "3B", "15B")


# configs/paper.py: the paper measured ESM-2 with TwoNN on all points.
PAPER_DECIMATED_TWONN = False


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = arg or "8M"
    config = base.analysis_config()
    config.name = f"esm2-{arg}"
    config.model.family = "esm2"
    if arg in SIZES:
        config.model.source = "hf"
        config.model.size = arg
    elif arg == "trained":
        config.model.source = "trained"
        config.model.path = str(common.REPO / "workdirs" / "esm2_tiny_ecoli")
    elif arg == "tiny":
        config.model.source = "random"
        config.model.size = "tiny"
    else:
        raise ValueError(f"arg must be one of {SIZES}, 'trained' or 'tiny'; got {arg!r}")
    config.data.name = "scope"
    config.data.path = str(common.SCOPE_FASTA)
    config.data.label = "superfamily"
    config.data.min_class_size = 20
    config.data.per_class = 40
    config.extract.batch_size = 16
    config.probe.remote_homology = True
    return config


def get_sweep(arg: str | None = None) -> list[dict]:
    paths = [p for p in os.environ.get("IDJAX_ESM2_CHECKPOINTS", "").split(":") if p]
    if paths:
        return [{"name": os.path.basename(p.rstrip("/")), "overrides": {"model.source": "hf", "model.path": p}}
                for p in paths]
    return [{"name": f"k{k}", "overrides": {"profile.k_max": k, "profile.gride_range_max": k, "profile.gride_rank": k}}
            for k in (16, 32, 64)]
