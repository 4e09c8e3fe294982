"""Defaults shared by every analysis config: extraction, profile, selection and probes."""

import os
import pathlib

import ml_collections
from ml_collections.config_dict import placeholder

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
    config.model.family = "esm2"  # a family of models/registry.py: esm2 | igpt | bert
    # Your own model instead of a family: "package.module:callable" returning an encoder (README, "Your own
    # model"); when set, family, source, path, size and the family blocks below are not used.
    config.model.encoder = placeholder(str)
    # hf | fair_esm | orbax | minilm (the family's SOURCES) | random | trained | untrained (a training
    # workdir's model as initialised)
    config.model.source = "random"
    config.model.path = placeholder(str)  # the checkpoint (directory or file) the source reads
    config.model.size = placeholder(str)  # random init: the family's size key (esm2 "8M", igpt "s", bert "tiny")
    config.model.overrides = ml_collections.ConfigDict()  # random init: config fields, e.g. {"vocab_size": 17}
    config.model.seed = 0
    config.model.step = placeholder(int)  # source "trained": this checkpoint step (unset: the latest good one)
    # Each family's own knobs, read only by that family.
    config.model.esm2 = ml_collections.ConfigDict()
    config.model.esm2.dtype = "float32"  # inference dtype: float32 | bfloat16 | float16
    config.model.esm2.pooling = "mean"  # mean | cls
    config.model.esm2.long_policy = "crop"  # error | crop | windows (mean of windows, weighted by residues)
    config.model.esm2.max_residues = 1022  # residues per sequence or window
    config.model.esm2.unknown = "error"  # error | X
    # auto (the fastest on this machine, measured once per shape and cached) | einsum | heads_major |
    # heads_major_deferred | xla | cudnn: models/attention.py
    config.model.esm2.attention = "auto"
    config.model.igpt = ml_collections.ConfigDict()
    config.model.igpt.stream = "paper"  # paper (ln_1 stream) | residual
    # .npy / preprocessor_config.json | "fit" (k-means); unset: the checkpoint's own clusters (hf; refused
    # without), the saved palette (trained), k-means (random)
    config.model.igpt.palette = placeholder(str)
    config.model.bert = ml_collections.ConfigDict()
    config.model.bert.normalize = False  # L2-normalise pooled vectors

    config.data = ml_collections.ConfigDict()
    config.data.name = "scope"  # a built-in dataset (experiments/datasets.py LOADERS) or "arrays"
    # Your own data: "package.module:function", function(data_config) -> experiments.datasets.Examples;
    # when set it replaces data.name (the selection knobs below apply to it too).
    config.data.source = placeholder(str)
    config.data.path = ml_collections.FieldReference(str(SCOPE_FASTA), field_type=str)  # None: not set
    config.data.root = placeholder(str)  # images: the dataset's folder or file (digits: none)
    config.data.split = placeholder(str)  # images: train | test | all (default: the reader's)
    config.data.size = placeholder(int)  # images: resize to size x size
    config.data.rgb = False
    config.data.label = "superfamily"  # scope: class | fold | superfamily | family
    config.data.min_class_size = placeholder(int)  # keep classes with at least this many examples
    config.data.per_class = placeholder(int)  # at most this many examples per class (seeded choice)
    config.data.max_examples = placeholder(int)  # at most this many examples in all (seeded choice)
    config.data.seed = 0
    # A training workdir (or a checkpoint exported from one): keep only the examples its run never trained on
    # (ids not in its data_split.json "train_ids"), before the selection knobs above.
    config.data.heldout_of = placeholder(str)
    config.data.text = "description"  # scope_text: description | description+organism

    config.extract = ml_collections.ConfigDict()
    # An integer (examples per batch, over all devices), or "auto": experiments.extract.plan_extraction sizes it
    # from the device memory (and decides replicated vs FSDP params). object-typed so --config...=auto parses.
    config.extract.batch_size = ml_collections.FieldReference(32, field_type=object)
    config.extract.sharding = "auto"  # auto: families run on the mesh of all devices when > 1 | always | never
    config.extract.model_parallel = 0  # 0: the memory plan decides with "auto" (else replicated); N: FSDP over N
    config.extract.device_memory_bytes = 0  # 0: the device's memory_stats() bytes_limit, else host RAM per device
    config.extract.memory_headroom = 0.9  # the fraction of device memory the plan may fill

    config.profile = ml_collections.ConfigDict()
    config.profile.k_max = 64
    config.profile.sharded = "auto"  # auto: device ring (idjax.sharded) when > 1 device | always | never
    config.profile.processes = "auto"  # several processes: auto | layers (whole layers per process) | ring
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
    config.profile.gride_rank = placeholder(int)
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


def paper_protocol(config: ml_collections.ConfigDict, *, decimated_twonn: bool) -> ml_collections.ConfigDict:
    """The paper's protocol (Valeriani et al. 2023 and its public scripts) on top of a family config.

    Overlap with labels and between adjacent layers at k = 10 as the headline (label_ks keeps the
    other k); TwoNN fit on the 98% smallest log mu; for iGPT the ID is TwoNN on subsets of exactly N / 32
    points (the scripts average 4 such subsets; here all 32 disjoint ones), with no minimum subset size.
    """
    config.profile.overlap_k = 10
    config.profile.label_ks = tuple(sorted({*config.profile.label_ks, 10}))
    config.profile.twonn_fraction = 0.98
    config.probe.knn_k = 10
    if decimated_twonn:  # the paper's iGPT analysis
        config.profile.id_estimator = "twonn_decimated"
        config.profile.decimation_target_ratio = 32
        config.profile.decimation_min_subset = 0
    else:
        config.profile.id_estimator = "twonn"
    return config
