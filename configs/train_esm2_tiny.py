"""Masked-LM pre-training of a small ESM-2 on the E. coli proteome.

`--config=configs/train_esm2_tiny.py` (CPU, a few minutes) or `...:gpu` (8M-sized model, longer crops).
Data paths come from configs/common.py ($IDJAX_SHARED_DATA, default ../shared/data next to the repository).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "" / "cpu" (tiny, 2-core CPU) or "gpu" (ESM-2 8M shape: 6 layers x 320, 20 heads)."""
    size = (arg or "cpu").strip().lower()
    if size not in ("cpu", "gpu"):
        raise ValueError(f"arg must be 'cpu' or 'gpu', got {arg!r}")
    gpu = size == "gpu"

    config = ml_collections.ConfigDict()
    config.experiment = "train"
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.family = "esm2"
    config.model.name = "esm2_gpu_8m_shape" if gpu else "esm2_tiny"
    config.model.num_layers = 6 if gpu else 4
    config.model.embed_dim = 320 if gpu else 64
    config.model.num_heads = 20 if gpu else 4
    config.model.ffn_dim = None  # None -> 4 * embed_dim, as in every ESM-2
    config.model.dtype = "float32"
    config.model.esm2 = ml_collections.ConfigDict()
    config.model.esm2.token_dropout = True

    config.data = ml_collections.ConfigDict()
    config.data.fasta = str(common.ECOLI_FASTA)
    config.data.max_residues = 510 if gpu else 128  # crop length (training: random offset per draw)
    config.data.val_fraction = 0.05
    config.data.split_seed = 0
    config.data.max_sequences = None  # use only the first N FASTA records (None: all)
    config.data.max_eval_examples = None if gpu else 160
    # SCOPe domains in the corpus too (None: the proteome only), with this fraction of the SCOPe
    # families held out whole (experiments/train.py `load_protein_data`).
    config.data.scope_fasta = ml_collections.config_dict.placeholder(str)
    config.data.scope_holdout_families = 0.2

    config.train = common.training(gpu=gpu, steps=20_000 if gpu else 1200, learning_rate=4e-4 if gpu else 2e-3,
                                   warmup_steps=1000 if gpu else 100, b2=0.98)
    config.train.mask_prob = 0.15
    config.train.mask_token_prob = 0.8
    config.train.random_token_prob = 0.1
    config.checkpoint = common.checkpoint(interval=1000 if gpu else 300)
    return config
