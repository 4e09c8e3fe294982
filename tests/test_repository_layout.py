"""Package layering: the geometry library stays free of the pipeline, and the pipeline's file helpers
(experiments/files.py) and multi-process helpers (experiments/distributed.py) are leaves that models/ may use
without an import cycle."""

import ast
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PIPELINE_PACKAGES = {"experiments", "models", "configs"}


def _imports(path: pathlib.Path, *, top_level_only: bool) -> list[str]:
    """Absolute module names imported by `path` (only module-level statements with `top_level_only`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_files_module_imports_only_the_standard_library_numpy_and_epath():
    allowed = set(sys.stdlib_module_names) | {"numpy", "etils"}
    imported = {name.split(".")[0] for name in _imports(REPO / "experiments" / "files.py", top_level_only=False)}
    assert imported <= allowed, f"experiments/files.py must stay a leaf; it imports {sorted(imported - allowed)}"


def test_distributed_module_imports_no_pipeline_module():
    used = {name.split(".")[0] for name in _imports(REPO / "experiments" / "distributed.py", top_level_only=False)}
    assert not used & PIPELINE_PACKAGES, f"experiments/distributed.py must stay a leaf; it imports {sorted(used)}"


LEAVES = ("experiments.files", "experiments.distributed")


@pytest.mark.parametrize("path", sorted((REPO / "models").glob("*.py")), ids=lambda p: p.name)
def test_models_use_only_the_leaf_modules_of_experiments(path):
    used = {name for name in _imports(path, top_level_only=False) if name.split(".")[0] == "experiments"}
    other = {name for name in used if name != "experiments" and not name.startswith(LEAVES)}
    assert not other, f"{path.name} imports {sorted(other)}; models/ may only use {', '.join(LEAVES)}"


@pytest.mark.parametrize("path", sorted((REPO / "idjax").glob("*.py")), ids=lambda p: p.name)
def test_idjax_never_imports_the_pipeline_at_import_time(path):
    pipeline = {name for name in _imports(path, top_level_only=True) if name.split(".")[0] in PIPELINE_PACKAGES}
    assert not pipeline, f"idjax/{path.name} imports {sorted(pipeline)} at module level"


def test_no_file_helpers_left_in_the_geometry_library():
    assert not (REPO / "idjax" / "files.py").exists()
    import idjax

    with pytest.raises(AttributeError):
        idjax.files  # noqa: B018


def test_models_define_each_small_helper_once():
    """One params unwrap (checkpoints.unwrap_params) and one round-up (protein_tokenizer.round_up) in models/."""
    defined: dict[str, list[str]] = {}
    for path in sorted((REPO / "models").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and ("unwrap" in node.name or "round_up" in node.name
                                                      or node.name == "_as_params"):
                defined.setdefault(node.name.lstrip("_"), []).append(path.name)
    assert defined == {"unwrap_params": ["checkpoints.py"], "round_up": ["protein_tokenizer.py"]}


def test_unwrap_params_takes_the_tree_or_the_variables_dict():
    from models.checkpoints import unwrap_params

    tree = {"layers_0": {"kernel": 1}}
    assert unwrap_params(tree) is tree
    assert unwrap_params({"params": tree}) is tree
    assert unwrap_params({"params": tree, "intermediates": {}}) is tree
