"""iGPT S/M/L (HF ImageGPT checkpoints) on labelled images; the paper's image setting.

  --config=configs/igpt.py:s --config.model.path=/ckpt/imagegpt-small
  --config=configs/igpt.py:trained --config.model.path=workdirs/igpt_tiny_digits
  --config=configs/igpt.py:tiny   (random init on digits; smoke test)

Data: CIFAR-10 (ConvNetJS batches, 32x32) for the published models, digits for tiny/trained ones.
A HF checkpoint is read through its own colour clusters (`clusters` in its preprocessor_config.json,
or `kmeans_centers.npy`); one without them is refused unless `--config.model.igpt.palette` names the
clusters file or is "fit" (a k-means palette on the images, whose ids are not the model's colours).
ID: the default (GRIDE(32, 64)); `configs/paper.py:igpt,s` uses the paper's TwoNN on
N/32-point subsets.
"""

import ml_collections

from configs import base, common

# configs/paper.py: the paper measured iGPT with TwoNN on N/32-point subsets.
PAPER_DECIMATED_TWONN = True


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = (arg or "s").lower()
    config = base.analysis_config()
    config.name = f"igpt-{arg}"
    config.model.family = "igpt"
    if arg in ("s", "m", "l"):
        config.model.source = "hf"
        config.model.size = arg
        config.data.name = "cifar10"
        config.data.root = str(common.CIFAR10_ROOT)
        config.data.split = "test"
        config.extract.batch_size = 8
    elif arg in ("trained", "tiny"):
        config.model.source = "trained" if arg == "trained" else "random"
        if arg == "trained":
            config.model.path = str(common.REPO / "workdirs" / "igpt_tiny_digits")
        config.model.size = "mini"
        config.model.overrides = {"vocab_size": 17, "n_positions": 64}
        config.data.name = "digits"
        config.extract.batch_size = 128
    else:
        raise ValueError(f"arg must be s, m, l, trained or tiny; got {arg!r}")
    return config
