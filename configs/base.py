"""Defaults shared by every analysis config: extraction, profile, selection and probes."""

import os
import pathlib

import ml_collections

# The data paths are defined here, not imported, because idjax.profile loads this file by its path
# (outside the `configs` package, so a user's own `configs` is never shadowed); configs/common.py
# takes them from here.
REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("IDJAX_SHARED_DATA", REPO.parent / "shared" / "data"))
SCOPE_FASTA = SHARED_DATA / "protein" / "astral-scopedom-seqres-gd-sel-gs-bib-40-2.07.fa"
ECOLI_FASTA = SHARED_DATA / "protein" / "UP000000625_83333.fasta"


def analysis_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.experiment = "full"
    config.name = "run"
    config.seed = 0
    config.training = None  # a training ConfigDict (configs/train_*.py) to train the model first

    config.model = ml_collections.ConfigDict()
    config.model.family = "esm2"  # esm2 | igpt | bert
    config.model.source = "random"  # hf | fair_esm | orbax | trained | random | minilm
    config.model.path = ""
    config.model.size = "8M"
    config.model.overrides = ml_collections.ConfigDict()
    config.model.dtype = "float32"
    config.model.pooling = "mean"  # esm2: mean | cls
    config.model.stream = "paper"  # igpt: paper (ln_1 stream) | residual
    config.model.long_policy = "crop"  # esm2: error | crop | windows (mean of windows, weighted by residues)
    config.model.max_residues = 1022  # esm2: residues per sequence or window
    config.model.unknown = "error"  # esm2: error | X
    config.model.palette = ""  # igpt: .npy / preprocessor_config.json | "fit" (k-means) | empty: the checkpoint's
    # own clusters (hf; refused without), the saved palette (trained), k-means (random)
    config.model.normalize = False  # bert: L2-normalise pooled vectors
    config.model.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "scope"
    config.data.path = str(SCOPE_FASTA)
    config.data.root = ""
    config.data.split = ""
    config.data.size = 0
    config.data.rgb = False
    config.data.label = "superfamily"
    config.data.min_class_size = 0
    config.data.per_class = 0
    config.data.max_examples = 0
    config.data.seed = 0
    config.data.text = "description"

    config.extract = ml_collections.ConfigDict()
    config.extract.batch_size = 32

    config.profile = ml_collections.ConfigDict()
    config.profile.k_max = 64
    config.profile.sharded = "auto"  # auto: device ring (idjax.sharded) when > 1 device | always | never
    config.profile.verify_store = True  # check the store's files against their SHA-256 on load (one streamed pass)
    config.profile.twonn_fraction = 0.9
    config.profile.gride_range_max = 64
    config.profile.decimation = True
    config.profile.decimation_min_size = 20
    config.profile.decimation_target_ratio = 32  # "twonn_decimated": subsets of about N / 32 (the paper)
    config.profile.decimation_min_subset = 256  # ... but never fewer points than this (N / 32 of 2000 is 62)
    # The ID that drives layer selection: GRIDE(32, 64) found the planted layer most often on noisy
    # synthetic profiles (benchmarks/planted_profiles.py, table in the README). twonn | twonn_decimated |
    # gride | gride_plateau.
    config.profile.id_estimator = "gride"
    # n2 of GRIDE(n2 / 2, n2); unset: the largest computed rank up to 64 (GRIDE(32, 64) when k_max allows)
    config.profile.gride_rank = ml_collections.config_dict.placeholder(int)
    config.profile.label_ks = (1, 10, 30)
    config.profile.overlap_k = 30
    config.profile.duplicates = "drop"  # drop | error
    config.profile.selection_min_plateau = 3  # a final plateau needs this many layers (idjax/selection.py)
    config.profile.selection_min_drop = 0.1
    config.profile.selection_min_rise = 0.05
    config.profile.selection_z = 2.0

    config.probe = ml_collections.ConfigDict()
    config.probe.enabled = True
    config.probe.linear = True
    config.probe.steps = 300
    config.probe.test_fraction = 0.25
    config.probe.knn_k = 10
    config.probe.remote_homology = False
    config.probe.seed = 0
    return config


def paper_protocol(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's protocol (Valeriani et al. 2023 and its public scripts) on top of a family config.

    Overlap with labels and between adjacent layers at k = 10 as the headline (label_ks keeps the
    other k); TwoNN fit on the 98% smallest log mu; for iGPT the ID is TwoNN on subsets of exactly N / 32
    points (the scripts average 4 such subsets; here all 32 disjoint ones), with no minimum subset size.
    """
    config.profile.overlap_k = 10
    config.profile.label_ks = tuple(sorted({*config.profile.label_ks, 10}))
    config.profile.twonn_fraction = 0.98
    config.probe.knn_k = 10
    if config.model.family == "igpt":
        config.profile.id_estimator = "twonn_decimated"
        config.profile.decimation_target_ratio = 32
        config.profile.decimation_min_subset = 0
    else:
        config.profile.id_estimator = "twonn"
    return config
