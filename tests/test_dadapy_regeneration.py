"""The committed DADApy 0.3.4 reference values are reproduced by their generator script.

tests/reference/dadapy_reference.npz is produced by tests/reference/make_dadapy_reference.py running in the
separate numpy<2 venv .venv-dadapy (``make dadapy-venv``). When that venv exists, the generator runs into a
temporary file and `reference_mismatches` compares the result with the committed file.

What the comparison protects, and why each tolerance is what it is:
- It must pass on any CPU. The inputs are built from uniform draws and + - * / only (see the generator's
  docstring), so they are bit-identical everywhere and are compared exactly. DADApy's outputs are not:
  its brute-force kNN goes through the machine's BLAS (GEMM form), and its TwoNN fit goes through scipy's
  `curve_fit` (MINPACK), which stops once a step changes the estimate by less than xtol = 1.49e-8
  relative, so the reported value is only defined to about that and moves with the BLAS, SIMD width and
  threading (measured: 1.0e-10 relative between an AMD EPYC and an Intel Xeon). Floats are therefore
  compared at FLOAT_RTOL = 1e-7, about 7x curve_fit's own stopping tolerance and 1000x the largest
  difference seen between machines. kNN indices may differ only where two distances tie within that
  tolerance (a near-tie's order is decided by the last bits). Column 0 of a brute-force distance matrix
  is the self distance, pure cancellation residue, compared absolutely (SELF_DISTANCE_ATOL).
- It must still fail when the generator changes: a changed input is caught exactly, a changed DADApy call
  (another argument, rank, fraction or k) moves the affected values by 1e-5 relative or far more, two
  orders of magnitude above FLOAT_RTOL. `test_an_altered_generator_is_caught` runs deliberately altered
  copies of the generator and checks that each alteration is reported on the keys it affects.
"""

import os
import pathlib
import subprocess
import warnings

import numpy as np
import pytest

from tests.neighbour_checks import assert_same_neighbours

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT / "tests" / "reference"
SCRIPT = REFERENCE_DIR / "make_dadapy_reference.py"
COMMITTED = REFERENCE_DIR / "dadapy_reference.npz"
DADAPY_PYTHON = REPO_ROOT / ".venv-dadapy" / "bin" / "python"
# Written by `make dadapy-venv` only after DADApy installed, so a half-built venv is not mistaken for one.
DADAPY_READY = REPO_ROOT / ".venv-dadapy" / ".installed-stamp"
needs_dadapy = pytest.mark.skipif(
    not DADAPY_READY.exists(),
    reason=f"{DADAPY_READY.relative_to(REPO_ROOT)} not found (build the venv with `make dadapy-venv`)",
)

INPUT_KEYS = {"X1", "X1b", "X2", "X3", "X1_labels"}
FLOAT_RTOL = 1e-7
SELF_DISTANCE_ATOL = 1e-6


def reference_mismatches(ref, new) -> list[str]:
    """Every key on which the regenerated arrays `new` differ from the committed `ref` beyond what
    differences between machines explain (see the module docstring). Empty when they agree."""
    problems = []
    if sorted(new.files) != sorted(ref.files):
        return [f"key set changed: missing {sorted(set(ref.files) - set(new.files))}, "
                f"new {sorted(set(new.files) - set(ref.files))}"]
    for key in sorted(ref.files):
        a, b = ref[key], new[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{key}: {a.shape} {a.dtype} -> {b.shape} {b.dtype}")
            continue
        if key == "meta_versions":
            if str(a) != str(b):
                warnings.warn(f"reference made with [{a}], regenerated with [{b}]", stacklevel=1)
            continue
        try:
            if key.endswith("_indices"):
                graph = key.removesuffix("_indices")
                ref_d, new_d = ref[f"{graph}_distances"], new[f"{graph}_distances"]
                assert_same_neighbours(new_d[:, 1:], b[:, 1:], ref_d[:, 1:], a[:, 1:], rtol=FLOAT_RTOL, what=key)
                np.testing.assert_array_equal(b[:, 0], a[:, 0], err_msg=f"{key}: column 0 is the point itself")
            elif key in INPUT_KEYS or a.dtype.kind in "iub":
                np.testing.assert_array_equal(b, a, err_msg=key)
            elif key.endswith("_distances"):
                np.testing.assert_allclose(b[:, 0], a[:, 0], rtol=0, atol=SELF_DISTANCE_ATOL, err_msg=key)
                np.testing.assert_allclose(b[:, 1:], a[:, 1:], rtol=FLOAT_RTOL, atol=0, err_msg=key)
            else:
                np.testing.assert_allclose(b, a, rtol=FLOAT_RTOL, atol=0, err_msg=key)
        except AssertionError as err:
            problems.append(f"{key}: {str(err).strip().splitlines()[0]}")
    return problems


def _regenerate(script: pathlib.Path, out: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([str(DADAPY_PYTHON), str(script), "--out", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"generator failed:\n{proc.stdout}\n{proc.stderr}"


def test_committed_reference_is_small_and_loadable():
    assert COMMITTED.is_file(), f"{COMMITTED} is missing; run `make dadapy-reference`"
    assert COMMITTED.stat().st_size < 2 * 1024 * 1024
    with np.load(COMMITTED, allow_pickle=False) as ref:
        for key in INPUT_KEYS:
            assert key in ref.files
        assert str(ref["meta_versions"]).startswith("dadapy 0.3.4;")


def test_machine_level_differences_pass_and_real_changes_fail():
    """The comparison itself, without DADApy: perturbations of the size machines produce pass; a value
    moved by 1e-5, a changed input bit and a swapped pair of non-tied neighbours fail."""
    with np.load(COMMITTED, allow_pickle=False) as ref:
        committed = {key: ref[key] for key in ref.files}

    class Npz(dict):
        files = property(lambda self: list(self))

    rng = np.random.default_rng(0)
    jittered = Npz(committed)
    for key, value in committed.items():
        if value.dtype.kind == "f" and key not in INPUT_KEYS:
            jittered[key] = value * (1 + 1e-9 * rng.uniform(-1, 1, size=value.shape))
    assert reference_mismatches(Npz(committed), jittered) == []

    moved = Npz(committed, **{"X2_twonn_fit_f0.9": committed["X2_twonn_fit_f0.9"] * (1 + 1e-5)})
    assert [p.split(":")[0] for p in reference_mismatches(Npz(committed), moved)] == ["X2_twonn_fit_f0.9"]

    changed_input = Npz(committed, X3=np.nextafter(committed["X3"], np.inf))
    assert "X3" in [p.split(":")[0] for p in reference_mismatches(Npz(committed), changed_input)]

    swapped = committed["X2_indices"].copy()
    swapped[0, [1, 5]] = swapped[0, [5, 1]]  # rank 1 and rank 5 of point 0 are not tied
    problems = reference_mismatches(Npz(committed), Npz(committed, X2_indices=swapped))
    assert [p.split(":")[0] for p in problems] == ["X2_indices"]


@pytest.mark.slow
@needs_dadapy
def test_dadapy_reference_regenerates(tmp_path):
    out = tmp_path / "dadapy_reference.npz"
    _regenerate(SCRIPT, out)
    with np.load(COMMITTED, allow_pickle=False) as ref, np.load(out, allow_pickle=False) as new:
        problems = reference_mismatches(ref, new)
    assert not problems, "regenerated reference differs:\n" + "\n".join(problems)


# Each alteration: (text in the generator, its replacement, keys that must be reported).
ALTERATIONS = {
    # A changed DADApy argument whose effect is small: GRIDE's bisection stops at width 1e-5 instead of 1e-7.
    "gride_bisection_tolerance": (
        "d._compute_id_gride_single_scale(0.001, 1000, mus.copy(), n1, n2, 1e-7)",
        "d._compute_id_gride_single_scale(0.001, 1000, mus.copy(), n1, n2, 1e-5)",
        {"X1_gride_n1_2_id"},
    ),
    # A changed input: X2's noise amplitude 0.02 -> 0.0201.
    "x2_noise": ("0.02 * _noise(rng, (400, 10))", "0.0201 * _noise(rng, (400, 10))", {"X2", "X2_twonn_ml"}),
    # A changed call: the unweighted label overlap at k - 1 neighbours.
    "overlap_k": ("d1.return_label_overlap(labels, k=k, weighted=False)",
                  "d1.return_label_overlap(labels, k=k - 1, weighted=False)", {"X1_label_overlap_k30_unweighted"}),
}


@pytest.mark.slow
@needs_dadapy
@pytest.mark.parametrize("name", sorted(ALTERATIONS))
def test_an_altered_generator_is_caught(tmp_path, name):
    old, new_text, expected = ALTERATIONS[name]
    source = SCRIPT.read_text()
    assert source.count(old) == 1, f"alteration {name!r} no longer matches the generator"
    altered = tmp_path / "make_dadapy_reference_altered.py"
    altered.write_text(source.replace(old, new_text))
    out = tmp_path / "altered.npz"
    _regenerate(altered, out)
    with np.load(COMMITTED, allow_pickle=False) as ref, np.load(out, allow_pickle=False) as regenerated:
        reported = {p.split(":")[0] for p in reference_mismatches(ref, regenerated)}
    assert expected <= reported, f"{name}: expected {sorted(expected)} among the reported keys {sorted(reported)}"
