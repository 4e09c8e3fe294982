"""`pip install .` into a fresh virtualenv: only `idjax` in site-packages, the `idjax` command works from a
directory holding the user's own `configs` package, and `import idjax` loads neither JAX nor TF nor torch.

The fresh venv sees this environment's installed dependencies through a .pth file (a plain path entry,
whose own .pth files, such as an editable idjax, are not processed), so nothing is downloaded.
"""

import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from tests.conftest import REPO_ROOT


def _run(cmd, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IDJAX_DEBUG")}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.slow
def test_pip_install_in_a_fresh_venv(tmp_path):
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (REPO_ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
    site = site.stdout.strip()
    (tmp_path / "venv_site").write_text(site)
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    out = _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                str(source)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    installed = set(os.listdir(site))
    assert "idjax" in installed and not installed & {"configs", "models", "experiments", "launch.py"}

    user = tmp_path / "user"
    (user / "configs").mkdir(parents=True)
    (user / "configs" / "__init__.py").write_text("")
    (user / "configs" / "common.py").write_text("VALUE = 'mine'\n")
    layers = user / "layers"
    layers.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        np.save(layers / f"layer_{i}.npy", (rng.normal(size=(120, 5)) @ rng.normal(size=(5, 12))).astype(np.float32))
    np.save(layers / "labels.npy", rng.integers(0, 3, 120))

    idjax_cmd = str(venv / "bin" / "idjax")
    out = _run([idjax_cmd, "--help"], user)
    assert out.returncode == 0 and "idjax profile" in out.stdout and "configs/esm2.py" in out.stdout, out.stderr
    out = _run([idjax_cmd, "profile", "layers", "--out", "result", "--option", "k_max=8", "--option",
                "gride_range_max=8", "--option", "label_ks=(5,)", "--option", "overlap_k=5"], user)
    assert out.returncode == 0, out.stderr[-3000:]
    # The per-layer table and the selection line (three random 5-D layers need not have a selected layer).
    assert "| layer | ID (gride) +- err |" in out.stdout and "Selected layer" in out.stdout, out.stdout
    for name in ("results.json", "profile.npz", "report.md", "id_profile.png", "id_profile.pdf"):
        assert (user / "result" / name).is_file(), name
    out = _run([str(python), "-c", "import sys, idjax; from configs import common; "
                "print(common.VALUE, idjax.__file__, 'jax' in sys.modules, 'torch' in sys.modules, "
                "'tensorflow' in sys.modules)"], user)
    assert out.returncode == 0, out.stderr
    value, location, *loaded = out.stdout.split()
    assert value == "mine" and location.startswith(site) and loaded == ["False"] * 3
    out = _run([idjax_cmd, "run", "--config=configs/demo.py", "--config.profile.k_max=8", "--print_config"], user)
    assert out.returncode == 0 and "k_max: 8" in out.stdout, out.stderr[-2000:]
    out = _run([idjax_cmd, "profile", "missing"], user)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 2 and "missing" in out.stderr
