"""The researcher's own model (`model.encoder=package.module:callable`) through the whole pipeline.

The models live in a package written to tmp_path, outside the repository, and reach the pipeline only
through the flag, as a researcher's would: a small Flax network (launch.py in a subprocess, killed with
SIGKILL mid-extraction and resumed) and a Hugging Face torch GPT-2 (pooled states checked against the
torch model called directly). Every protocol violation is refused with a message naming it.
"""

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from configs import base
from experiments import datasets, extract, files, profile, store
from models import registry
from tests.conftest import REPO_ROOT

FLAX_MODEL = textwrap.dedent('''
    """A tiny dense network on 8x8 digits, written by a researcher (not an idjax family)."""
    import os
    import signal

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np


    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(16, name="embed")(x)
            states = [h]
            for i in range(3):
                h = jnp.tanh(nn.Dense(16, name=f"layer_{i}")(h)) + h
                states.append(h)
            return jnp.stack(states)


    class Encoder:
        num_layers = 3
        description = {"name": "dense residual net on digits", "width": 16}

        def __init__(self):
            self.net = Net()
            self.params = self.net.init(jax.random.key(0), jnp.zeros((1, 64)))
            self.apply = jax.jit(self.net.apply)

        def sort_key(self, image):
            return int(np.asarray(image).sum())  # batches of similar ink, as a length bucketing would

        def prepare_batch(self, images):
            return np.asarray(images, np.float32).reshape(len(images), -1) / 255.0

        def pooled_states(self, x):
            log = os.environ.get("OWN_MODEL_LOG")
            if log:
                with open(log, "a") as f:
                    f.write(f"{len(x)}\\n")
                calls = sum(1 for _ in open(log))
                if calls == int(os.environ.get("OWN_MODEL_KILL_AT", "0")):
                    os.kill(os.getpid(), signal.SIGKILL)
            return np.asarray(self.apply(self.params, x), np.float32)


    def make_encoder():
        return Encoder()
''')

CONFIG_FILE = textwrap.dedent('''
    from configs import base


    def get_config(arg=None):
        config = base.analysis_config()
        config.name = "own-flax"
        config.data.name = "digits"
        config.data.max_examples = 240
        config.extract.batch_size = 64
        config.profile.k_max = 16
        config.profile.gride_range_max = 16
        config.profile.gride_rank = 16
        config.profile.label_ks = (5, 10)
        config.profile.overlap_k = 10
        config.profile.decimation = False
        config.probe.steps = 50
        return config
''')


def _user_package(root: pathlib.Path, package_name: str, name: str, source: str) -> pathlib.Path:
    """Writes `package_name/name.py` under `root` (a package of its own per test: imports are cached)."""
    package = root / package_name
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / f"{name}.py").write_text(source)
    return root


def _launch(workdir: pathlib.Path, config_file: pathlib.Path, user_root: pathlib.Path, **env_extra: str):
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{user_root}", **env_extra)
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), f"--config={config_file}",
                           f"--workdir={workdir}", "--config.model.encoder=user_flax.flaxnet:make_encoder"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_flax_model_from_outside_runs_launch_and_resumes_after_sigkill(tmp_path):
    user_root = _user_package(tmp_path / "user", "user_flax", "flaxnet", FLAX_MODEL)
    config_file = tmp_path / "own_config.py"
    config_file.write_text(CONFIG_FILE)

    whole = _launch(tmp_path / "whole", config_file, user_root)
    assert whole.returncode == 0, whole.stderr[-3000:]
    results = files.read_json(tmp_path / "whole" / "results.json", fix="")
    assert results["model"]["callable"] == "user_flax.flaxnet.make_encoder"
    assert results["model"]["encoder"] == "user_flax.flaxnet:make_encoder"
    assert results["model"]["description"] == {"name": "dense residual net on digits", "width": 16}
    assert len(results["id"]) == 4 and len(results["probes"]["linear_probe_accuracy"]) == 4
    for figure in results["figures"]:
        assert pathlib.Path(figure).stat().st_size > 10_000

    # SIGKILL inside the third of four batches: two are stored, the rerun computes only the other two.
    log = tmp_path / "calls.log"
    killed = _launch(tmp_path / "killed", config_file, user_root, OWN_MODEL_LOG=str(log), OWN_MODEL_KILL_AT="3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    directory = store.store_dir(tmp_path / "killed")
    assert store.finished_batches(directory) == {0, 1} and not store.is_complete(directory)
    log.unlink()
    resumed = _launch(tmp_path / "killed", config_file, user_root, OWN_MODEL_LOG=str(log))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Stored batch 1 re-embedded once (the model must still give it), then batches 2 and 3 of 240 examples.
    assert log.read_text().split() == ["64", "64", "48"]

    again = files.read_json(tmp_path / "killed" / "results.json", fix="")
    for key in ("id", "id_err", "label_overlap", "adjacent_overlap", "selected_layer", "peak_layer", "probes"):
        assert again[key] == results[key], key
    a, b = store.load(store.store_dir(tmp_path / "whole")), store.load(directory)
    for layer_a, layer_b in zip(a.layers, b.layers, strict=True):
        np.testing.assert_array_equal(layer_a, layer_b)


HF_MODEL = textwrap.dedent('''
    """A Hugging Face torch GPT-2 on digit pixels, mean-pooled per layer."""
    import numpy as np
    import torch
    import transformers


    def build_model():
        torch.manual_seed(0)
        config = transformers.GPT2Config(vocab_size=16, n_positions=64, n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2Model(config).eval()


    class Encoder:
        def __init__(self):
            self.model = build_model()
            self.num_layers = self.model.config.n_layer
            self.description = {"hf_class": "GPT2Model", "n_embd": 32}

        def prepare_batch(self, images):
            return torch.as_tensor(np.asarray(images).reshape(len(images), -1) // 16, dtype=torch.long)

        def pooled_states(self, input_ids):
            with torch.no_grad():
                hidden = self.model(input_ids, output_hidden_states=True).hidden_states
            return torch.stack([h.mean(dim=1) for h in hidden]).numpy().astype(np.float32)


    def make_encoder():
        return Encoder()
''')


def _digits_config(n: int = 96):
    config = base.analysis_config()
    config.data.name = "digits"
    config.data.max_examples = n
    config.extract.batch_size = 32
    config.profile.k_max = 8
    config.profile.gride_range_max = 8
    config.profile.gride_rank = 8
    config.profile.label_ks = (5,)
    config.profile.overlap_k = 5
    config.profile.decimation = False
    config.probe.steps = 20
    return config


@pytest.mark.torch
def test_hugging_face_torch_model_plugs_in_and_matches_a_direct_call(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(str(_user_package(tmp_path / "user", "user_hf", "hfgpt", HF_MODEL)))
    config = _digits_config()
    config.model.encoder = "user_hf.hfgpt:make_encoder"
    extract.run(config, tmp_path / "run")
    results = profile.run(config, tmp_path / "run")
    assert results["model"]["description"] == {"hf_class": "GPT2Model", "n_embd": 32}
    assert len(results["id"]) == 3

    from experiments.image_datasets import load_digits

    hfgpt = importlib.import_module("user_hf.hfgpt")  # the package written above, already imported by the run

    digits = load_digits()
    keep = datasets.select_indices(len(digits.images), digits.labels, config.data)
    reps = store.load(store.store_dir(tmp_path / "run"))
    ids = torch.as_tensor(digits.images[keep[:10]].reshape(10, -1) // 16, dtype=torch.long)
    with torch.no_grad():
        hidden = hfgpt.build_model()(ids, output_hidden_states=True).hidden_states
    direct = np.stack([h.mean(dim=1).numpy() for h in hidden])
    np.testing.assert_allclose(np.stack([layer[:10] for layer in reps.layers]), direct, rtol=1e-5, atol=1e-6)


BROKEN = textwrap.dedent('''
    import numpy as np

    NOT_CALLABLE = 3


    class Good:
        num_layers = 2

        def __init__(self, shape=None, dtype=np.float32, fill=None, grow_at=None):
            self.shape, self.dtype, self.fill, self.grow_at, self.calls = shape, dtype, fill, grow_at, 0

        def prepare_batch(self, images):
            return np.asarray(images, np.float32).reshape(len(images), -1)

        def pooled_states(self, x):
            self.calls += 1
            layers = 3 + (self.calls >= self.grow_at if self.grow_at else 0)
            out = np.tile(x[None, :, :4], (layers, 1, 1)).astype(self.dtype)
            if self.shape is not None:
                out = out.reshape(self.shape)
            if self.fill is not None:
                out[1, 0, 2] = self.fill
            return out


    class NoPooled:
        num_layers = 2

        def prepare_batch(self, images):
            return images


    def good():
        return Good()

    def no_pooled():
        return NoPooled()

    def float64():
        return Good(dtype=np.float64)

    def nan():
        return Good(fill=np.nan)

    def flat():
        return Good(shape=(-1,))

    def grows():
        return Good(grow_at=2)

    def raises():
        raise RuntimeError("no GPU here")
''')


@pytest.mark.parametrize("spec, needles", [
    ("user_models.nowhere:make", ["cannot import module 'user_models.nowhere'", "PYTHONPATH"]),
    ("user_models.broken:missing", ["has no attribute 'missing'"]),
    ("user_models.broken:NOT_CALLABLE", ["not a callable"]),
    ("user_models.broken", ["must be 'package.module:callable'"]),
    ("user_models.broken:no_pooled", ["NoPooled without pooled_states"]),
    ("user_models.broken:raises", ["calling user_models.broken.raises() raised RuntimeError: no GPU here"]),
    ("user_models.broken:float64", ["batch 0 is float64, not float32", "astype(np.float32)"]),
    ("user_models.broken:nan", ["holds nan", "layer 1, example 0 of the batch, column 2", "finite"]),
    ("user_models.broken:flat", ["has shape (", "expected (num_layers + 1, 32, dim) = (3, 32, D)"]),
    ("user_models.broken:grows", ["batch 1 has 4 layers but num_layers = 2 promises 3",
                                  "the same for every batch"]),
])
def test_protocol_violations_are_named(tmp_path, monkeypatch, spec, needles):
    monkeypatch.syspath_prepend(str(_user_package(tmp_path / "user", "user_models", "broken", BROKEN)))
    config = _digits_config()
    config.model.encoder = spec
    with pytest.raises(registry.EncoderError) as err:
        extract.run(config, tmp_path / "run")
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
    assert not store.is_complete(store.store_dir(tmp_path / "run"))


def test_good_encoder_and_the_command_line_check(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_user_package(tmp_path / "user", "user_models", "broken", BROKEN)))
    config = _digits_config(n=64)
    config.model.encoder = "user_models.broken:good"
    manifest = extract.run(config, tmp_path / "run")
    assert manifest["n_layers"] == 3 and manifest["dim"] == 4
    meta = store.read_manifest(store.store_dir(tmp_path / "run"))["metadata"]
    assert meta["model"]["callable"] == "user_models.broken.good" and meta["model"]["description"] is None
    # launch.py refuses an unimportable encoder before any work, without a traceback.
    out = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "--config=configs/esm2.py:tiny",
                          f"--workdir={tmp_path / 'cli'}", "--config.model.encoder=user_models.nowhere:make"],
                         cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "cannot import module 'user_models.nowhere'" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "cli" / "representations").exists()
    assert json.dumps(registry.names()) == json.dumps(list(registry.FAMILIES))


UNSEEDED_MODEL = textwrap.dedent('''
    """A model whose weights are drawn afresh, unseeded, each time it is built."""
    import numpy as np


    class Encoder:
        num_layers = 2
        calls = 0

        def __init__(self):
            self.weights = np.random.default_rng().normal(size=(64, 8)).astype(np.float32)

        def prepare_batch(self, images):
            return np.asarray(images, np.float32).reshape(len(images), -1) / 255.0

        def pooled_states(self, x):
            Encoder.calls += 1
            if Encoder.calls == 3:
                raise KeyboardInterrupt("killed mid-extraction")
            h = x @ self.weights
            return np.stack([h, np.tanh(h), np.tanh(2 * h)]).astype(np.float32)


    def make_encoder():
        return Encoder()
''')


def test_a_model_that_changed_since_the_stored_batches_is_refused_on_resume(tmp_path):
    """The fingerprint holds the spec, not the model: an unseeded model would mix two networks in one store."""
    user_root = _user_package(tmp_path / "user", "user_unseeded", "net", UNSEEDED_MODEL)
    sys.path.insert(0, str(user_root))
    try:
        config = base.analysis_config()
        config.data.name, config.data.max_examples = "digits", 96
        config.model.encoder = "user_unseeded.net:make_encoder"
        config.extract.batch_size = 32
        with pytest.raises(KeyboardInterrupt):
            extract.run(config, tmp_path / "run")
        assert store.finished_batches(store.store_dir(tmp_path / "run")) == {0, 1}
        with pytest.raises(store.StoreError, match="other outputs for stored batch 1"):
            extract.run(config, tmp_path / "run")
    finally:
        sys.path.remove(str(user_root))
