"""Masked-LM pre-training of a small ESM-2 on the E. coli proteome.

`--config=configs/train_esm2_tiny.py` (CPU, a few minutes), `...:gpu` (8M-sized model, longer crops) or
`...:deep`: the 6-layer x 128 model whose profiles over training the README reports (E. coli proteome plus
the SCOPe domains with a fifth of the families held out whole, 10000 steps of 64 crops, log-spaced
checkpoints for `configs/over_training.py`).
Data paths come from configs/common.py ($IDJAX_SHARED_DATA, default ../shared/data next to the repository).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: "" / "cpu" (tiny, 2-core CPU), "gpu" (ESM-2 8M shape: 6 layers x 320, 20 heads) or "deep"."""
    size = (arg or "cpu").strip().lower()
    if size not in ("cpu", "gpu", "deep"):
        raise ValueError(f"arg must be 'cpu', 'gpu' or 'deep', got {arg!r}")
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
    config.model.ffn_dim = ml_collections.config_dict.placeholder(int)  # unset: 4 * embed_dim, as in every ESM-2
    config.model.dtype = "float32"
    config.model.esm2 = ml_collections.ConfigDict()
    config.model.esm2.token_dropout = True

    config.data = ml_collections.ConfigDict()
    config.data.fasta = str(common.ECOLI_FASTA)
    config.data.max_residues = 510 if gpu else 128  # crop length (training: random offset per draw)
    config.data.val_fraction = 0.05
    config.data.split_seed = 0
    config.data.max_sequences = ml_collections.config_dict.placeholder(int)  # only the first N records (unset: all)
    config.data.max_eval_examples = ml_collections.FieldReference(None if gpu else 160, field_type=int)
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
    if size == "deep":
        deepen(config)
    return config


# Held-out masked-LM loss after 10000 steps of 64 crops (the README's table): 6 x 64 2.653, 6 x 128 2.644,
# 10 x 128 2.653 (stopped at step 6500 of 10000).
DEEP_STEPS = 10_000
DEEP_KEEP_STEPS = (0, 30, 100, 300, 1000, 3000, DEEP_STEPS)


def deepen(config: ml_collections.ConfigDict) -> None:
    """The `deep` preset: 6 layers x 128, 4 heads, with the SCOPe family split, log-spaced checkpoints."""
    config.model.update(name="esm2_L6_D128", num_layers=6, embed_dim=128, num_heads=4)
    config.data.scope_fasta = str(common.SCOPE_FASTA)
    config.data.max_eval_examples = 1000
    config.train.update(steps=DEEP_STEPS, batch_size=64, eval_batch_size=32, learning_rate=1e-3, warmup_steps=500,
                        log_interval=100, eval_interval=500)
    config.checkpoint.update(interval=1000, keep_steps=DEEP_KEEP_STEPS)
