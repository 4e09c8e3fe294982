"""Autoregressive pixel pre-training of a small iGPT on quantized images.

`--config=configs/train_igpt_tiny.py` (sklearn digits, 8x8, 16 colours; CPU, a few minutes),
`...:mnist` (MNIST test set resized to 14x14 with a seeded held-out split), `...:cifar10`
(ConvNetJS CIFAR-10 subset, 16x16, its own train/test batches), and `gpu` for larger settings,
combinable with a dataset: `...:gpu,cifar10` (32x32, 512 colours, 8 layers x 256), and `deep`: the
8-block x 64 model whose profiles over training the README reports (`...:mnist,deep`: 8000 steps of
64 images, log-spaced checkpoints for `configs/over_training.py`).
Data paths come from configs/common.py ($IDJAX_SHARED_DATA, default ../shared/data next to the repository).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: comma-separated, any of "cpu" (default) | "gpu" | "deep" and "digits" (default) | "mnist" | "cifar10"."""
    tokens = {token.strip().lower() for token in (arg or "").split(",") if token.strip()}
    unknown = tokens - {"cpu", "gpu", "deep", "digits", "mnist", "cifar10"}
    if unknown or len(tokens & {"cpu", "gpu", "deep"}) > 1 or len(tokens & {"digits", "mnist", "cifar10"}) > 1:
        raise ValueError(f"arg must combine one of cpu|gpu|deep with one of digits|mnist|cifar10, got {arg!r}")
    gpu = "gpu" in tokens
    dataset = next(iter(tokens & {"digits", "mnist", "cifar10"}), "digits")

    config = ml_collections.ConfigDict()
    config.experiment = "train"
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.family = "igpt"
    config.model.num_layers = 8 if gpu else 4
    config.model.embed_dim = 256 if gpu else 64
    config.model.num_heads = 8 if gpu else 4
    config.model.ffn_dim = ml_collections.config_dict.placeholder(int)  # unset: 4 * embed_dim
    config.model.dtype = "float32"

    config.data = ml_collections.ConfigDict()
    config.data.name = dataset
    config.data.root = {
        "digits": None,  # ships with scikit-learn
        "mnist": str(common.MNIST_ROOT),
        "cifar10": str(common.CIFAR10_ROOT),
    }[dataset]
    config.data.split = "test" if dataset == "mnist" else None  # only the MNIST test set is offline
    # Side length after resizing (None keeps it): sequence length = size^2.
    config.data.size = {"digits": None, "mnist": 28 if gpu else 14, "cifar10": 32 if gpu else 16}[dataset]
    config.data.n_colors = {"digits": 16, "mnist": 16, "cifar10": 512 if gpu else 64}[dataset]
    config.data.val_fraction = 0.2  # digits / MNIST: seeded held-out split (CIFAR uses its test batch)
    config.data.split_seed = 0
    # Typed "unset" (not a bare None) so --config.data.max_train_examples=400 overrides from the command line.
    config.data.max_train_examples = ml_collections.config_dict.placeholder(int)
    config.data.max_eval_examples = ml_collections.FieldReference(None if gpu or dataset == "digits" else 1000,
                                                                  field_type=int)

    config.train = common.training(gpu=gpu, steps=10_000 if gpu else 1500, learning_rate=1e-3 if gpu else 2e-3,
                                   warmup_steps=500 if gpu else 100, b2=0.95)
    config.train.eval_batch_size = 64
    config.checkpoint = common.checkpoint(interval=1000 if gpu else 250)
    if "deep" in tokens:
        deepen(config)
    return config


# Held-out loss of 8-block models on MNIST 14x14 after 8000 steps of 64 (the README's table): width 64
# 0.476, width 128 0.674 (its best, 0.474 at step 3500, then it overfits the 8000 images), 12 x 128 0.756.
DEEP_STEPS = 8000
DEEP_KEEP_STEPS = (0, 30, 100, 300, 1000, 3000, DEEP_STEPS)


def deepen(config: ml_collections.ConfigDict) -> None:
    """The `deep` preset: 8 blocks x 64, 4 heads, batches of 64, log-spaced checkpoints kept for the
    profiles over training."""
    config.model.update(num_layers=8, embed_dim=64, num_heads=4)
    config.train.update(steps=DEEP_STEPS, batch_size=64, eval_batch_size=64, learning_rate=1e-3, warmup_steps=300,
                        log_interval=100, eval_interval=250)
    config.checkpoint.update(interval=1000, keep_steps=DEEP_KEEP_STEPS)
