"""The command line's errors: every user mistake ends in <= 2 lines on stderr naming the flag/file and the fix,
and every typed config key rejects a bad value before any work starts."""

import os
import subprocess
import sys

import pytest

from configs import arrays, base, demo, esm2, igpt, minilm, synthetic, train_esm2_tiny, train_igpt_tiny
from experiments import config_schema
from tests.conftest import REPO_ROOT

BAD_CANDIDATES = ("nonsense", -5, 0, 1.5, True, None, (), 10**9, float("nan"))


def run_launch(*args, env=None, cwd=REPO_ROOT):
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **(env or {}))
    environment.pop("IDJAX_DEBUG", None)
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def shipped_configs():
    return [base.analysis_config(), demo.get_config(), esm2.get_config("8M"), esm2.get_config("tiny"),
            igpt.get_config("s"), igpt.get_config("tiny"), minilm.get_config(), synthetic.get_config(),
            train_esm2_tiny.get_config(), train_esm2_tiny.get_config("gpu"), train_igpt_tiny.get_config(),
            train_igpt_tiny.get_config("gpu,cifar10"), train_igpt_tiny.get_config("mnist"),
            arrays.get_config("layers/")]


@pytest.mark.parametrize("index", range(14))
def test_every_shipped_config_is_valid_and_fully_described(index):
    config = shipped_configs()[index]
    assert config_schema.problems(config) == []
    schema = config_schema.schema_for(config)
    # A new key without a schema entry fails here: add it to experiments/config_schema.py.
    assert set(config_schema.flatten(config)) <= set(schema)


@pytest.mark.parametrize("schema_name", ["ANALYSIS", "TRAINING", "SYNTHETIC"])
def test_every_typed_key_rejects_a_bad_value_naming_the_key(schema_name):
    schema = getattr(config_schema, schema_name)
    for key, check in schema.items():
        if check is config_schema.anything:
            continue
        rejected = [v for v in BAD_CANDIDATES if check(v) is not None]
        assert rejected, f"{key} accepts every bad candidate"
        for value in rejected:
            message = check(value)
            assert message.startswith("must be"), (key, value, message)
    analysis = base.analysis_config()
    for key, value in [("profile.k_max", 0), ("extract.batch_size", 0), ("profile.duplicates", "maybe"),
                       ("profile.id_estimator", "twonnn"), ("profile.twonn_fraction", 1.5),
                       ("probe.test_fraction", 1.0), ("profile.label_ks", ())]:
        config = base.analysis_config()
        config.update_from_flattened_dict({key: value})
        found = config_schema.problems(config)
        assert len(found) == 1 and found[0].startswith(f"config.{key}="), found
    assert config_schema.problems(analysis) == []


def test_cross_check_gride_rank_and_unknown_key_suggestion():
    config = base.analysis_config()
    config.profile.id_estimator = "gride"
    config.profile.gride_rank = 12
    assert "gride_rank=12" in config_schema.problems(config)[0]
    with config.unlocked():
        config.profile.k_mx = 16
    assert any("did you mean profile.k_max" in p for p in config_schema.problems(config))


def _assert_short(out, *needles):
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0
    assert len(lines) <= 2, out.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, out.stderr)


@pytest.mark.parametrize("args, needles", [
    (["--config.profile.k_mx=16"], ["--config.profile.k_mx", "did you mean profile.k_max"]),
    (["--config.profile.duplicates=maybe"], ["config.profile.duplicates='maybe'", "drop, error"]),
    (["--config.extract.batch_size=0"], ["config.extract.batch_size=0", ">= 1"]),
    (["--config.profile.id_estimator=twonnn"], ["id_estimator", "twonn, twonn_decimated, gride"]),
    (["--config.extract.batch_size=abc"], ["config.extract.batch_size='abc'", "integer >= 1 or 'auto'"]),
    (["--config.training=None", "--config.model.source=hf"], ["config.training"]),
    (["--bogus"], ["bogus"]),
    (["positional"], ["unexpected arguments", "positional"]),
])
def test_flag_and_override_errors_are_two_lines(tmp_path, args, needles):
    _assert_short(run_launch("--config=configs/demo.py", f"--workdir={tmp_path}", *args), *needles)


def test_path_errors_are_two_lines(tmp_path):
    _assert_short(run_launch("--config=configs/nope.py", f"--workdir={tmp_path}"),
                  "--config=configs/nope.py", "shipped configs")
    _assert_short(run_launch("--config=configs/esm2.py:tiny", f"--workdir={tmp_path}", "--config.model.source=hf",
                             "--config.data.path=" + str(tmp_path)),
                  "config.model.path is unset", "--config.model.path=")
    _assert_short(run_launch("--config=configs/esm2.py:tiny", f"--workdir={tmp_path}", "--config.model.source=hf",
                             f"--config.model.path={tmp_path}", f"--config.data.path={tmp_path}"),
                  "has no config.json")
    _assert_short(run_launch("--config=configs/esm2.py:tiny", f"--workdir={tmp_path}",
                             "--config.model.path=/nonexistent/ckpt", "--config.model.source=orbax",
                             f"--config.data.path={tmp_path}"), "/nonexistent/ckpt")
    _assert_short(run_launch("--config=configs/minilm.py", f"--workdir={tmp_path}",
                             env={"IDJAX_SHARED_DATA": str(tmp_path / "nodata")}), "IDJAX_SHARED_DATA",
                  str(tmp_path / "nodata"))
    _assert_short(run_launch("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.experiment=profile"),
                  "no finished representations", "extract")
    _assert_short(run_launch("--config=configs/demo.py"), "--workdir is required")
    (tmp_path / "a_file").write_text("")
    _assert_short(run_launch("--config=configs/demo.py", f"--workdir={tmp_path / 'a_file'}"),
                  f"--workdir={tmp_path / 'a_file'} cannot be used as a directory")
    _assert_short(run_launch("--config=configs/train_igpt_tiny.py:bad", f"--workdir={tmp_path}"),
                  "train_igpt_tiny.py:bad", "arg must combine")


def test_verbose_shows_the_traceback(tmp_path):
    out = run_launch("--config=configs/demo.py", f"--workdir={tmp_path}", "--config.extract.batch_size=0",
                     "--verbose")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_print_config_and_help(tmp_path):
    out = run_launch("--config=configs/demo.py", "--config.profile.k_max=16", "--print_config")
    assert out.returncode == 0 and "k_max: 16" in out.stdout
    out = run_launch("--help")
    assert out.returncode == 0
    for name in ("configs/esm2.py", "configs/igpt.py", "configs/demo.py", "--print_config", "650M"):
        assert name in out.stdout


def test_missing_checkpoint_files_and_empty_selection(tmp_path, shared_data):
    """Errors found while a job runs (after its log lines) still end in two lines naming the file and fix."""
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text((shared_data / "configs" / "esm2_t6_8M_UR50D" / "config.json").read_text())
    fasta = tmp_path / "s.fa"
    fasta.write_text(">d1a a.1.1.1 (A:) x\nMKTAYIAKQRQISF\n>d1b a.1.1.1 (B:) y\nMSLLTEVETPIRNEW\n"
                     ">d1c b.1.1.1 (C:) z\nMKKLLPTAAAGLLL\n")
    common = ["--config=configs/esm2.py:8M", f"--config.model.path={checkpoint}", f"--config.data.path={fasta}"]
    for extra, needles in ((["--config.data.min_class_size=1"], ["neither model.safetensors", str(checkpoint)]),
                           ([], ["data.min_class_size=20", "lower --config.data.min_class_size"])):
        out = run_launch(*common, f"--workdir={tmp_path / 'wd'}", *extra)
        last = out.stderr.strip().splitlines()[-2:]
        assert out.returncode != 0 and last[0].startswith("error: ") and "--verbose" in last[1], out.stderr
        for needle in needles:
            assert needle in last[0], (needle, last)
        assert "Traceback" not in out.stderr
