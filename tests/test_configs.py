"""The training configs built from configs/common.py hold exactly the values written out here.

Every expected value is a literal: a change to a shared block or to a family's override shows up as
a failure naming the key. The model blocks belong to the model families and are not pinned here.
"""

import pytest

from configs import base, common, demo, esm2, igpt, minilm, train_esm2_tiny, train_igpt_tiny
from tests.conftest import REPO_ROOT, shared_data_dir

ADAMW = {"end_lr_fraction": 0.1, "weight_decay": 0.01, "b1": 0.9, "eps": 1e-08, "grad_clip_norm": 1.0,
         "progress_bar": True, "model_parallel": 1, "fsdp": False}
MASKING = {"mask_prob": 0.15, "mask_token_prob": 0.8, "random_token_prob": 0.1}
CPU_LOGGING = {"batch_size": 32, "log_interval": 25, "eval_interval": 100}
GPU_LOGGING = {"batch_size": 64, "log_interval": 50, "eval_interval": 1000}
KEPT = {"max_to_keep": 3, "keep_steps": (), "async_save": True}

EXPECTED_TRAINING = {
    ("esm2", "cpu"): (
        {**ADAMW, **MASKING, **CPU_LOGGING, "steps": 1200, "eval_batch_size": 32, "learning_rate": 0.002,
         "warmup_steps": 100, "b2": 0.98},
        {**KEPT, "interval": 300}),
    ("esm2", "gpu"): (
        {**ADAMW, **MASKING, **GPU_LOGGING, "steps": 20000, "eval_batch_size": 64, "learning_rate": 0.0004,
         "warmup_steps": 1000, "b2": 0.98},
        {**KEPT, "interval": 1000}),
    ("igpt", "digits"): (
        {**ADAMW, **CPU_LOGGING, "steps": 1500, "eval_batch_size": 64, "learning_rate": 0.002, "warmup_steps": 100,
         "b2": 0.95},
        {**KEPT, "interval": 250}),
    ("igpt", "gpu"): (
        {**ADAMW, **GPU_LOGGING, "steps": 10000, "eval_batch_size": 64, "learning_rate": 0.001, "warmup_steps": 500,
         "b2": 0.95},
        {**KEPT, "interval": 1000}),
}
for dataset in ("mnist", "cifar10"):  # the training schedule does not depend on the images
    EXPECTED_TRAINING["igpt", dataset] = EXPECTED_TRAINING["igpt", "digits"]
    EXPECTED_TRAINING["igpt", f"gpu,{dataset}"] = EXPECTED_TRAINING["igpt", "gpu"]

IMAGE_DATA = {"max_train_examples": None, "split_seed": 0, "val_fraction": 0.2}
EXPECTED_IMAGE_DATA = {  # root relative to $IDJAX_SHARED_DATA
    "digits": {**IMAGE_DATA, "name": "digits", "root": None, "size": None, "split": None, "n_colors": 16,
               "max_eval_examples": None},
    "gpu": {**IMAGE_DATA, "name": "digits", "root": None, "size": None, "split": None, "n_colors": 16,
            "max_eval_examples": None},
    "mnist": {**IMAGE_DATA, "name": "mnist", "root": "images", "size": 14, "split": "test", "n_colors": 16,
              "max_eval_examples": 1000},
    "gpu,mnist": {**IMAGE_DATA, "name": "mnist", "root": "images", "size": 28, "split": "test", "n_colors": 16,
                  "max_eval_examples": None},
    "cifar10": {**IMAGE_DATA, "name": "cifar10", "root": "images/cifar10_convnetjs", "size": 16, "split": None,
                "n_colors": 64, "max_eval_examples": 1000},
    "gpu,cifar10": {**IMAGE_DATA, "name": "cifar10", "root": "images/cifar10_convnetjs", "size": 32, "split": None,
                    "n_colors": 512, "max_eval_examples": None},
}
EXPECTED_PROTEIN_DATA = {
    "cpu": {"fasta": "protein/UP000000625_83333.fasta", "max_residues": 128, "val_fraction": 0.05, "split_seed": 0,
            "max_sequences": None, "max_eval_examples": 160, "scope_fasta": None, "scope_holdout_families": 0.2},
    "gpu": {"fasta": "protein/UP000000625_83333.fasta", "max_residues": 510, "val_fraction": 0.05, "split_seed": 0,
            "max_sequences": None, "max_eval_examples": None, "scope_fasta": None, "scope_holdout_families": 0.2},
}
SCOPE = "protein/astral-scopedom-seqres-gd-sel-gs-bib-40-2.07.fa"


def _training_config(family: str, arg: str):
    return (train_esm2_tiny if family == "esm2" else train_igpt_tiny).get_config(arg)


def _shared(relative: str | None) -> str | None:
    return None if relative is None else str(shared_data_dir() / relative)


@pytest.mark.parametrize("family,arg", sorted(EXPECTED_TRAINING))
def test_training_and_checkpoint_blocks_keep_their_values(family, arg):
    config = _training_config(family, arg)
    train, checkpoint = EXPECTED_TRAINING[family, arg]
    assert config.experiment == "train" and config.seed == 0
    assert config.train.to_dict() == train
    assert config.checkpoint.to_dict() == checkpoint


@pytest.mark.parametrize("arg", sorted(EXPECTED_IMAGE_DATA))
def test_image_training_data_keep_their_paths_and_values(arg):
    expected = dict(EXPECTED_IMAGE_DATA[arg], root=_shared(EXPECTED_IMAGE_DATA[arg]["root"]))
    assert train_igpt_tiny.get_config(arg).data.to_dict() == expected


@pytest.mark.parametrize("arg", sorted(EXPECTED_PROTEIN_DATA))
def test_protein_training_data_keep_their_paths_and_values(arg):
    expected = dict(EXPECTED_PROTEIN_DATA[arg], fasta=_shared(EXPECTED_PROTEIN_DATA[arg]["fasta"]))
    assert train_esm2_tiny.get_config(arg).data.to_dict() == expected


def test_analysis_configs_read_the_shared_data():
    assert common.REPO == REPO_ROOT and common.SHARED_DATA == shared_data_dir()
    assert base.analysis_config().data.path == _shared(SCOPE)
    assert esm2.get_config("8M").data.path == _shared(SCOPE)
    assert minilm.get_config().data.path == _shared(SCOPE)
    assert igpt.get_config("s").data.root == _shared("images/cifar10_convnetjs")


def test_demo_trains_with_the_digits_training_config():
    assert demo.get_config().training.to_dict() == train_igpt_tiny.get_config("digits").to_dict()


def test_shared_blocks_are_fresh_for_every_caller():
    first, second = common.training(gpu=False, steps=1, learning_rate=1.0, warmup_steps=0, b2=0.9), \
        common.checkpoint(interval=1)
    first.steps, second.interval = 99, 99
    assert common.training(gpu=False, steps=1, learning_rate=1.0, warmup_steps=0, b2=0.9).steps == 1
    assert common.checkpoint(interval=1).interval == 1
