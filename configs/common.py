"""What the config files share: where the data live, and the training and checkpoint blocks.

Paths: the shared real datasets are read from $IDJAX_SHARED_DATA (default: ../shared/data next to the
repository); the names below are the files and folders its SOURCES.md lists.

Blocks: `training` and `checkpoint` return fresh ConfigDicts with every key the trainer reads
(experiments/train.py); a family config (configs/train_*.py) calls them with its own sizes and then
overrides or adds what only it uses (ESM-2's masking rates, iGPT's evaluation batch).
"""

import ml_collections

from configs.base import ECOLI_FASTA, REPO, SCOPE_FASTA, SHARED_DATA  # defined there: base.py is loaded by path

__all__ = ["CIFAR10_ROOT", "ECOLI_FASTA", "MNIST_ROOT", "REPO", "SCOPE_FASTA", "SHARED_DATA", "checkpoint", "training"]
MNIST_ROOT = SHARED_DATA / "images"  # the MNIST test set's IDX files
CIFAR10_ROOT = SHARED_DATA / "images" / "cifar10_convnetjs"  # the ConvNetJS CIFAR-10 PNG batches


def training(*, gpu: bool, steps: int, learning_rate: float, warmup_steps: int, b2: float) -> ml_collections.ConfigDict:
    """optax AdamW with linear warmup and cosine decay to a tenth of the peak, global-norm clipping at 1,
    logging every 25 steps and a held-out evaluation every 100 (CPU sizes) or 50 / 1000 (`gpu`)."""
    train = ml_collections.ConfigDict()
    train.steps = steps
    train.batch_size = 64 if gpu else 32
    train.eval_batch_size = train.batch_size
    train.learning_rate = learning_rate
    train.warmup_steps = warmup_steps
    train.end_lr_fraction = 0.1
    train.weight_decay = 0.01
    train.b1 = 0.9
    train.b2 = b2
    train.eps = 1e-8
    train.grad_clip_norm = 1.0
    train.log_interval = 50 if gpu else 25
    train.eval_interval = 1000 if gpu else 100
    train.progress_bar = True
    # Devices (experiments/train.py): the batch is split over the "data" mesh axis (devices / model_parallel);
    # model_parallel > 1 (or fsdp, which needs it) shards params and optimizer state over the "model" axis.
    train.model_parallel = 1
    train.fsdp = False
    return train


def checkpoint(*, interval: int) -> ml_collections.ConfigDict:
    """Orbax checkpoints every `interval` steps, the last 3 kept, written asynchronously."""
    block = ml_collections.ConfigDict()
    block.interval = interval
    block.max_to_keep = 3
    block.keep_steps = ()  # also checkpoint these steps and never delete them (0: the initialisation)
    block.async_save = True
    return block
