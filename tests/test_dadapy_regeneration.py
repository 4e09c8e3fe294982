"""The committed DADApy 0.3.4 reference values are reproduced by their generator script.

tests/reference/dadapy_reference.npz is produced by tests/reference/make_dadapy_reference.py running in the
separate numpy<2 venv .venv-dadapy (``make dadapy-venv``). When that venv exists, regenerate into a temp
file and compare with the committed file: inputs and integer arrays exactly, floats to rtol 1e-12
(the brute-force kNN of X1/X1b goes through BLAS, whose last ulps may differ between CPUs).
"""

import os
import pathlib
import subprocess
import warnings

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT / "tests" / "reference"
SCRIPT = REFERENCE_DIR / "make_dadapy_reference.py"
COMMITTED = REFERENCE_DIR / "dadapy_reference.npz"
DADAPY_PYTHON = REPO_ROOT / ".venv-dadapy" / "bin" / "python"
# Written by `make dadapy-venv` only after DADApy installed, so a half-built venv is not mistaken for one.
DADAPY_READY = REPO_ROOT / ".venv-dadapy" / ".installed-stamp"

INPUT_KEYS = {"X1", "X1b", "X2", "X3", "X1_labels"}
FLOAT_RTOL = 1e-12
# Column 0 of a brute-force (GEMM-form) distance matrix is the self distance: pure cancellation residue
# (up to ~1e-7), not a meaningful number, so compare it absolutely.
SELF_DISTANCE_ATOL = 1e-6


def test_committed_reference_is_small_and_loadable():
    assert COMMITTED.is_file(), f"{COMMITTED} is missing; run `make dadapy-reference`"
    assert COMMITTED.stat().st_size < 2 * 1024 * 1024
    with np.load(COMMITTED, allow_pickle=False) as ref:
        for key in INPUT_KEYS:
            assert key in ref.files
        assert str(ref["meta_versions"]).startswith("dadapy 0.3.4;")


@pytest.mark.skipif(
    not DADAPY_READY.exists(),
    reason=f"{DADAPY_READY.relative_to(REPO_ROOT)} not found (build the venv with `make dadapy-venv`)",
)
def test_dadapy_reference_regenerates(tmp_path):
    out = tmp_path / "dadapy_reference.npz"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run(
        [str(DADAPY_PYTHON), str(SCRIPT), "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"generator failed:\n{proc.stdout}\n{proc.stderr}"

    with np.load(COMMITTED, allow_pickle=False) as ref, np.load(out, allow_pickle=False) as new:
        assert sorted(new.files) == sorted(ref.files), "the generator's key set changed"
        for key in sorted(ref.files):
            a, b = ref[key], new[key]
            assert a.shape == b.shape and a.dtype == b.dtype, f"{key}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
            if key == "meta_versions":
                if str(a) != str(b):
                    warnings.warn(f"reference made with [{a}], regenerated with [{b}]", stacklevel=1)
                continue
            if key in INPUT_KEYS or a.dtype.kind in "iub":
                np.testing.assert_array_equal(b, a, err_msg=key)
            elif key.endswith("_distances"):
                np.testing.assert_allclose(b[:, 0], a[:, 0], rtol=0, atol=SELF_DISTANCE_ATOL, err_msg=key)
                np.testing.assert_allclose(b[:, 1:], a[:, 1:], rtol=FLOAT_RTOL, atol=0, err_msg=key)
            else:
                np.testing.assert_allclose(b, a, rtol=FLOAT_RTOL, atol=0, err_msg=key)
