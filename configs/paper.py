"""A family's config with the paper's measurement protocol (`base.paper_protocol`).

  --config=configs/paper.py:igpt,s --config.model.path=/ckpt/imagegpt-small
  --config=configs/paper.py:esm2,650M --config.model.path=/ckpt/esm2_t33_650M_UR50D
  --config=configs/paper.py:minilm

arg = "<family>[,<the family config's arg>]" with family igpt, esm2 or minilm.
"""

import importlib

import ml_collections

from configs import base

FAMILIES = ("igpt", "esm2", "minilm")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    family, _, family_arg = (arg or "").partition(",")
    if family not in FAMILIES:
        raise ValueError(f"arg must be '<family>[,<arg>]' with family one of {FAMILIES}; got {arg!r}")
    family_config = importlib.import_module(f"configs.{family}")
    config = family_config.get_config(family_arg or None)
    config.name = f"{config.name} (paper protocol)"
    return base.paper_protocol(config, decimated_twonn=family_config.PAPER_DECIMATED_TWONN)
