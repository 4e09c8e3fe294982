"""The command line: launch.py with a config file, overrides, and --sweep overlaying the runs."""

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT

SWEEP_CONFIG = textwrap.dedent('''
    from configs import base


    def get_config(arg=None):
        config = base.analysis_config()
        config.model.family = "igpt"
        config.model.source = "random"
        config.model.size = "tiny"
        config.model.overrides = {"vocab_size": 17, "n_positions": 64}
        config.data.name = "digits"
        config.data.max_examples = 150
        config.extract.batch_size = 75
        config.profile.k_max = 8
        config.profile.gride_range_max = 8
        config.profile.gride_rank = 8
        config.profile.label_ks = (5,)
        config.profile.overlap_k = 5
        config.profile.decimation = False
        config.probe.enabled = False
        return config


    def get_sweep(arg=None):
        return [{"name": f"seed{s}", "overrides": {"model.seed": s}} for s in (0, 1)]
''')


def run_launch(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_sweep_runs_each_entry_and_overlays(tmp_path):
    config_file = tmp_path / "sweep_config.py"
    config_file.write_text(SWEEP_CONFIG)
    out = run_launch(f"--config={config_file}", f"--workdir={tmp_path / 'wd'}", "--sweep", cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "wd" / "sweep.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["seed0", "seed1"]
    for name in ("seed0", "seed1"):
        assert (tmp_path / "wd" / name / "results.json").is_file()
    # Different seeds give different random models, hence different profiles.
    assert summary["runs"][0]["id"] != summary["runs"][1]["id"]
    for figure in summary["figures"]:
        assert os.path.getsize(tmp_path / "wd" / figure) > 10_000


def test_overrides_and_unknown_experiment(tmp_path):
    config_file = tmp_path / "sweep_config.py"
    config_file.write_text(SWEEP_CONFIG)
    out = run_launch(f"--config={config_file}", f"--workdir={tmp_path / 'wd'}", "--config.experiment=extract",
                     cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((tmp_path / "wd" / "representations" / "manifest.json").read_text())
    assert manifest["n_examples"] == 150 and not (tmp_path / "wd" / "results.json").exists()
    out = run_launch(f"--config={config_file}", f"--workdir={tmp_path / 'wd2'}", "--config.experiment=nope",
                     cwd=REPO_ROOT)
    assert out.returncode != 0 and "config.experiment='nope': must be one of" in out.stderr
