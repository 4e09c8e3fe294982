"""The command line behind `launch.py` and `idjax run`.

`launch.py --config=configs/X.py:arg --workdir=DIR [--config.key=value ...] [--sweep] [--print_config]`

Dispatches on `config.experiment`: extract | profile | probe | probe_study | train | full | synthetic. With
`--sweep`, the config file's `get_sweep(arg)` gives a list of runs (name + flattened overrides such
as {"model.path": ..., "profile.k_max": 32}); each runs in DIR/<name>, one after another (each
resumable), and their profiles are then overlaid in DIR/sweep_*.pdf/png and summarised in DIR/sweep.json
and DIR/sweep.md. `--sweep --sweep_index=I [--sweep_count=N]` runs entry I only (a job array's task);
`--sweep --summarize` writes the summary of the entries finished so far and runs nothing. Entries that
extract the same thing (same extraction fingerprint: model, data, pooling, dtype...) share one store,
DIR/stores/<fingerprint>/ (with a fitted iGPT palette), which DIR/<name>/store.json points to.

DIR may be local or any `etils.epath` URI (gs://bucket/run): every file of the workdir, the sweep's
entries, shared stores and summaries goes through it (experiments/files.py, experiments/store.py). The
config files themselves are read from the local file system.

Every mistake a user can make (a flag, an override key or value, a path, missing data or checkpoint
files) is reported in at most two lines on stderr that name the flag or file and the fix; the
traceback is shown only with `--verbose` or IDJAX_DEBUG=1. The whole resolved config is validated
(experiments/config_schema.py) before any work starts.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import logging as std_logging
import os
import pathlib
import sys
import traceback
from collections.abc import Sequence

from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from experiments import config_schema

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:arg]).", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, checkpoints and figures.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Run every entry of the config file's get_sweep(arg).")
_SWEEP_INDEX = flags.DEFINE_integer("sweep_index", None, "With --sweep: run only entry I (0-based; a job array task).")
_SWEEP_COUNT = flags.DEFINE_integer("sweep_count", None, "With --sweep_index: the number of entries the job array "
                                    "expects; checked against get_sweep(arg).")
_SUMMARIZE = flags.DEFINE_bool("summarize", False, "With --sweep: summarise the finished entries, run nothing.")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "Print the resolved config (after overrides) and exit.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show full tracebacks for errors (also IDJAX_DEBUG=1).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process job: host:port of process 0 "
                                   "(also IDJAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process job: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process job: this process's index, 0..num_processes-1.")
# Defaults: experiments.distributed.Timeouts.
_TIMEOUTS = {name: flags.DEFINE_integer(f"{name}_timeout_seconds", None, f"Multi-process job: {what} (also "
                                        f"IDJAX_{name.upper()}_TIMEOUT_SECONDS).")
             for name, what in (("initialization", "how long startup waits for every process to join"),
                                ("heartbeat", "a process silent this long is declared dead and the job ends"),
                                ("barrier", "the longest wait for the other processes at a barrier"),
                                ("shutdown", "how long a finished process waits for the others to finish"))}

EXPERIMENTS = {
    "extract": ("experiments.extract", "run"),
    "profile": ("experiments.profile", "run"),
    "probe": ("experiments.profile", "run_probe_only"),
    "train": ("experiments.train", "run"),
    "full": ("experiments.full", "run"),
    "probe_study": ("experiments.probe_study", "run"),
    "synthetic": ("experiments.synthetic", "run"),
}
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
# Errors a user can act on (bad values, paths, data, checkpoints, memory); anything else is a bug and
# keeps its traceback.
# ImportError: a backend the environment lacks, e.g. gcsfs for a gs:// path ("Please install gcsfs ...")
USER_ERRORS = (ValueError, OSError, MemoryError, app.UsageError, RuntimeError, ImportError)


class UserError(Exception):
    """A mistake in the command line or config; the message names the flag or file and the fix."""


def _debug() -> bool:
    return os.environ.get("IDJAX_DEBUG", "") not in ("", "0") or "--verbose" in sys.argv


def _one_line(message: str, limit: int = 700) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(message: str, code: int = 2) -> None:
    """Exits with `error: message` and, on a second line, how to see more (never a traceback)."""
    print(f"error: {_one_line(message)}", file=sys.stderr)
    print("(rerun with --verbose or IDJAX_DEBUG=1 for the traceback; --help lists the flags and configs)",
          file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------------
# Help


def _config_summary(path: pathlib.Path) -> tuple[str, list[str]]:
    """First docstring line of a config file and the docstring lines that describe its `arg`."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return "", []
    doc = ast.get_docstring(tree) or ""
    lines = [line.strip() for line in doc.splitlines() if line.strip()]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "get_config":
            lines += [line.strip() for line in (ast.get_docstring(node) or "").splitlines() if line.strip()]
    args = [line for line in lines[1:] if line.startswith(("arg", "--config=", "`--config=")) or ":arg" in line]
    return (lines[0] if lines else ""), args


def shipped_configs_help() -> str:
    out = ["shipped configs (--config=PATH[:arg]):"]
    for path in sorted(CONFIG_DIR.glob("*.py")):
        if path.stem in ("__init__", "base"):
            continue
        title, args = _config_summary(path)
        out.append(f"  configs/{path.name:<22} {title}")
        out += [f"      {line}" for line in args]
    return "\n".join(out)


USAGE = """usage: launch.py --config=configs/X.py[:arg] --workdir=DIR [--config.KEY=VALUE ...] [flags]
       (installed: idjax run --config=... --workdir=...)

flags:
  --config=PATH[:arg]   the experiment config file; `arg` is passed to its get_config(arg)
  --config.KEY=VALUE    override one key, e.g. --config.profile.k_max=32 --config.model.path=/ckpt/esm2
  --workdir=DIR         results, checkpoints and figures (every stage resumes there)
  --sweep               run each entry of the config file's get_sweep(arg) in DIR/<name> and overlay them
  --sweep_index=I       with --sweep: run entry I only (a job array task); --sweep_count=N checks the count
  --summarize           with --sweep: overlay and tabulate the finished entries (sweep.json, sweep.md), run nothing
  --print_config        print the resolved config (after overrides) and exit
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I
                        one process of a multi-process job (jax.distributed; process 0 writes shared files)
  --heartbeat_timeout_seconds=30 --barrier_timeout_seconds=3600 (also --initialization_, --shutdown_)
                        multi-process limits; a failed or lost process ends every process of the job
  --verbose             full tracebacks for errors (also IDJAX_DEBUG=1)
  --helpfull            every absl flag, including library ones

config.experiment: extract | profile | probe | probe_study | train | full | synthetic
"""


def print_help() -> None:
    print(USAGE)
    print(shipped_configs_help())


# ---------------------------------------------------------------------------------------------------
# Flag parsing with errors a person can act on


def _config_arg(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _overrides(argv: Sequence[str]) -> list[str]:
    keys = []
    for arg in argv:
        if arg.startswith(("--config.", "--noconfig.")):
            keys.append(arg.split("=", 1)[0].removeprefix("--").removeprefix("no").removeprefix("config."))
    return keys


def _load_config_file(config_arg: str):
    """The config file's get_config(arg), loaded as config_flags would (for explaining errors)."""
    path, _, arg = config_arg.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        known = ", ".join(f"configs/{p.name}" for p in sorted(CONFIG_DIR.glob("*.py"))
                          if p.stem not in ("__init__", "base"))
        raise UserError(f"--config={config_arg}: no such file {file.resolve()}; shipped configs: {known}")
    spec = importlib.util.spec_from_file_location("explained_config", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config(arg or None) if arg else module.get_config()
    except Exception as err:  # the file's own error, with its location
        raise UserError(f"--config={config_arg}: loading it failed: {type(err).__name__}: {err}") from err


def _explain_parse_error(argv: Sequence[str], err: Exception) -> str:
    if isinstance(err, flags.Error) and "config file" not in str(err):
        return str(err)
    config_arg = _config_arg(argv)
    if config_arg is None:
        return f"{type(err).__name__}: {err}"
    try:
        config = _load_config_file(config_arg)
    except UserError as user_error:
        return str(user_error)
    known = set(config_schema.flatten(config))
    for key in _overrides(argv):
        parents = {k.rsplit(".", 1)[0] for k in known if "." in k}
        if key not in known and key not in parents and not any(key.startswith(f"{k}.") for k in known):
            return (f"--config.{key}: the config has no key {key!r}{config_schema.suggest(key, known)}; "
                    "--print_config lists every key")
    return f"--config={config_arg}: {type(err).__name__}: {err}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with --help answered here and every parse error turned into two lines."""
    if any(a in ("-h", "--help", "-help", "--helpshort", "-?") for a in argv[1:]):
        print_help()
        sys.exit(0)
    try:
        return FLAGS(argv)
    except Exception as err:
        if _debug():
            traceback.print_exc()
        fail(_explain_parse_error(argv, err))


# ---------------------------------------------------------------------------------------------------
# Checks before any work


def _shared_data() -> pathlib.Path:
    from configs import common

    return common.SHARED_DATA


def _missing_file_message(path: epath.PathLike, key: str) -> str:
    path = epath.Path(path)
    shared = _shared_data()
    if str(path).startswith(str(shared)):
        return (f"{key}: {path} not found. Shared datasets are read from $IDJAX_SHARED_DATA (now {shared}): "
                f"set IDJAX_SHARED_DATA to the directory holding them, or pass --{key}=FILE")
    return f"{key}: {path} not found; pass --{key}=<an existing path>"


def _store_complete(workdir: epath.Path) -> bool:
    from experiments import store

    return store.is_complete(store.store_dir(workdir))


def _store_dir(workdir: epath.Path) -> epath.Path:
    from experiments import store

    return store.store_dir(workdir)


def preflight(config, workdir: epath.Path) -> list[str]:
    """Every problem found before any work: config values, then the files the job will read."""
    found = config_schema.problems(config)
    if found:
        return found
    experiment = config.experiment
    if experiment in ("extract", "full") and not _store_complete(workdir):
        found += _model_problems(config)
        found += _data_problems(config.data)
    if experiment in ("profile", "probe") and not _store_complete(workdir):
        found.append(f"--workdir={workdir}: no finished representations in {_store_dir(workdir)}; "
                     "run --config.experiment=extract (or full) there first")
    if experiment == "probe_study":
        found += _model_problems(config)
        path = epath.Path(config.model.path or ".")
        if not found and not (path / "model_config.json").is_file():
            found.append(f"config.model.path={path} is not a training workdir (no model_config.json): the probe "
                         "study reads a model trained with configs/train_*.py")
        if config.data.name == "scope":  # the protein study reads SCOPe
            found += _data_problems(config.data)
    if experiment == "train":
        data = config.data
        if data.get("fasta") and not epath.Path(data.fasta).exists():
            found.append(_missing_file_message(data.fasta, "config.data.fasta"))
        if data.get("root") and not epath.Path(data.root).exists():
            found.append(_missing_file_message(data.root, "config.data.root"))
    return found


def _model_problems(config) -> list[str]:
    from models import registry

    model = config.model
    source, path = model.source, model.path
    if config.data.name == "arrays":
        return []
    if model.get("encoder"):  # the researcher's own model: importable, with that attribute
        try:
            registry.resolve_encoder_callable(model.encoder)
        except registry.EncoderError as err:
            return [str(err)]
        return []
    family = registry.family(model.family)
    if source not in family.SOURCES + registry.GENERIC_SOURCES:
        return [f"config.model.source={source!r}: model family {model.family!r} reads one of "
                f"{', '.join(family.SOURCES + registry.GENERIC_SOURCES)}"]
    if source == "random" or source in getattr(family, "PATHLESS_SOURCES", ()) \
            or (source == "trained" and config.get("training")):
        return []
    if not path:
        return [f"config.model.path is unset, but model.source={source!r} reads a checkpoint: pass "
                "--config.model.path=<checkpoint directory or file> (or --config.model.source=random)"]
    p = epath.Path(path)
    if not p.exists():
        return [f"config.model.path={path}: no such file or directory; pass the checkpoint's location"]
    if source == "hf" and p.is_dir() and not (p / "config.json").is_file():
        return [f"config.model.path={path} has no config.json: model.source='hf' expects a Hugging Face "
                "checkpoint directory (config.json + *.safetensors)"]
    if source == "fair_esm" and p.is_dir():
        return [f"config.model.path={path} is a directory: model.source='fair_esm' expects the .pt file"]
    return []


def _data_problems(data) -> list[str]:
    if data.get("source"):  # the researcher's own loader: importable now, called when the job starts
        from experiments import datasets

        try:
            datasets.resolve_source(data.source)
        except datasets.DataSourceError as err:
            return [str(err)]
        return []
    if data.name in ("scope", "uniprot", "scope_text", "arrays"):
        if not data.path:
            return [f"config.data.path is empty: data.name={data.name!r} reads a file; pass --config.data.path=..."]
        if not epath.Path(data.path).exists():
            return [_missing_file_message(data.path, "config.data.path")]
    elif data.get("root") and not epath.Path(data.root).exists():
        return [_missing_file_message(data.root, "config.data.root")]
    return []


# ---------------------------------------------------------------------------------------------------
# Running


def run_one(config, workdir: epath.Path):
    name = config.experiment
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)}")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--workdir={workdir} cannot be used as a directory ({err.strerror or err}); pass a "
                        "writable directory path") from err
    module, function = EXPERIMENTS[name]
    logging.info("running %s in %s", name, workdir)
    return getattr(importlib.import_module(module), function)(config, workdir)


def sweep_entries(config_arg: str) -> list[dict]:
    """Loads get_sweep(arg) from the config file named in --config."""
    path, _, arg = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("sweep_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_sweep"):
        raise UserError(f"{path} defines no get_sweep(arg); drop --sweep or add one")
    return module.get_sweep(arg or None)


SHARED_STORES = "stores"  # DIR/stores/<extraction fingerprint>/: the stores sweep entries share


def sweep_configs(config, config_arg: str) -> list:
    """One validated child config per sweep entry (all checked before the first run starts)."""
    children = []
    names: set[str] = set()
    for i, entry in enumerate(sweep_entries(config_arg)):
        child = copy.deepcopy(config)
        overrides = entry.get("overrides", {})
        known = set(config_schema.flatten(config))
        for key in overrides:
            if key not in known and not key.startswith("model.overrides."):
                raise UserError(f"sweep entry {entry.get('name', i)!r}: override {key!r} is not a config key"
                                f"{config_schema.suggest(key, known)}")
        with child.unlocked():
            child.update_from_flattened_dict(overrides)
            child.name = entry.get("name", f"run{i}")
        name = child.name
        if not isinstance(name, str) or name in names or name in (SHARED_STORES, "", ".", "..") or "/" in name:
            raise UserError(f"sweep entry {i}: name {name!r} must be a unique directory name other than "
                            f"{SHARED_STORES!r} (the shared stores live in DIR/{SHARED_STORES})")
        names.add(name)
        children.append(child)
    return children


def share_store(child, entry_dir: epath.Path, sweep_dir: epath.Path) -> None:
    """Points an entry that extracts at DIR/stores/<its extraction fingerprint>/, so entries that differ
    only after extraction (profile or probe options) extract once. An entry that trains its own model
    first, or only reads a store (profile, probe), keeps its own workdir's store."""
    from experiments import extract, store

    trains = child.get("training") and not child.model.get("encoder")
    if child.experiment not in ("extract", "full") or trains:
        return
    key = extract.extraction_fingerprint(child)
    store.point_to_store(entry_dir, store.shared_store_home(sweep_dir / SHARED_STORES, key), key)


def chosen_entries(n_entries: int, index: int | None, count: int | None, where: str) -> list[int]:
    """The entries this run executes: all, or `index` (checked against `count` and the sweep's length)."""
    if index is None:
        if count is not None:
            raise UserError("--sweep_count is given without --sweep_index: pass --sweep_index=I as well (or "
                            "drop --sweep_count to run every entry)")
        return list(range(n_entries))
    if count is not None and count != n_entries:
        raise UserError(f"--sweep_count={count}, but {where} lists {n_entries} entries: submit a job array of "
                        f"{n_entries} tasks (indices 0..{n_entries - 1}) and pass --sweep_count={n_entries}")
    if not 0 <= index < n_entries:
        raise UserError(f"--sweep_index={index} is outside 0..{n_entries - 1}: {where} lists {n_entries} entries")
    return [index]


def summarize_sweep(children: Sequence, workdir: epath.Path) -> dict:
    """Overlays the finished entries' profiles (DIR/sweep_*.png/pdf) and writes DIR/sweep.json and DIR/sweep.md;
    entries without results.json are listed as missing. Runs nothing."""
    from experiments import report
    from experiments.files import atomic_write_json, atomic_write_text, load_npz, read_json

    runs, rows, missing = [], [], []
    for child in children:
        entry = workdir / child.name
        if not (entry / "results.json").is_file():
            missing.append(child.name)
            continue
        fix = f"delete it and re-run the sweep entry {child.name}"
        results = read_json(entry / "results.json", fix=fix)
        runs.append((child.name, results, load_npz(entry / "profile.npz", fix=fix)))
        rows.append(report.sweep_row(results))
    if not runs:
        raise UserError(f"no sweep entry has finished in {workdir} (no {workdir}/<name>/results.json for "
                        f"{', '.join(missing)}): run the entries first (--sweep, or --sweep --sweep_index=I each)")
    figures = report.write_figures(workdir, runs, prefix="sweep_")
    summary = {"runs": rows, "missing": missing, "figures": [f.name for f in figures]}
    atomic_write_json(workdir / "sweep.json", summary, checksum=True)
    atomic_write_text(workdir / "sweep.md", report.sweep_markdown(rows, missing))
    print(report.sweep_markdown(rows, missing))
    print(f"sweep of {len(runs)} finished runs ({len(missing)} missing): {workdir / 'sweep.json'}, "
          f"{workdir / 'sweep.md'}; figures: {', '.join(str(workdir / f.name) for f in figures)}")
    return summary


def run_sweep(config, workdir: epath.Path, *, index: int | None = None, count: int | None = None,
              summarize: bool = False) -> None:
    """Runs the sweep's entries (all, or entry `index` only) then summarises; `summarize`: summarise only."""
    config_file = config_flags.get_config_filename(FLAGS["config"])
    children = sweep_configs(config, config_file)
    if summarize:
        if index is not None or count is not None:
            raise UserError("--summarize runs nothing, so it takes no --sweep_index/--sweep_count: drop them")
        summarize_sweep(children, workdir)
        return
    chosen = [children[i] for i in chosen_entries(len(children), index, count, f"get_sweep of {config_file}")]
    for child in chosen:
        problems = preflight(child, workdir / child.name)
        if problems:
            raise UserError(f"sweep run {child.name!r}: " + "; ".join(problems))
    for child in chosen:
        share_store(child, workdir / child.name, workdir)
    for child in chosen:
        logging.info("sweep %d/%d: %s", children.index(child) + 1, len(children), child.name)
        run_one(child, workdir / child.name)
    if index is None:
        summarize_sweep(children, workdir)
    else:
        print(f"sweep entry {index} ({chosen[0].name}) done in {workdir / chosen[0].name}; when every entry has "
              "run, `--sweep --summarize` overlays and tabulates them")


class _QuietLibraries(std_logging.Filter):
    """Keeps idjax's own INFO lines; drops the INFO chatter of orbax and jax internals."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or not any(
            part in record.pathname for part in ("/orbax/", "/jax/_src/", "/etils/", "/fontTools/"))


def _user_message(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError) and err.filename:
        shared = str(_shared_data())
        if str(err.filename).startswith(shared):
            return (f"{err.filename} not found ({err.strerror}). Shared datasets are read from "
                    f"$IDJAX_SHARED_DATA (now {shared}): set IDJAX_SHARED_DATA to the directory holding them")
    if isinstance(err, MemoryError):
        return f"out of memory: {err}"
    return str(err) if isinstance(err, (UserError, app.UsageError)) else f"{type(err).__name__}: {err}"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {list(argv[1:])}: flags are written --name=value (see --help)")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        config = _CONFIG.value
        if config is not None:
            config.get("experiment")  # a file that failed to load raises here, not during parsing
    except Exception as err:  # config_flags defers a failed load of the file to the first access
        if _debug():
            traceback.print_exc()
        fail(_explain_parse_error(sys.argv, err))
    if config is None:
        fail("--config is required, e.g. --config=configs/demo.py (--help lists the shipped configs)")
    if _PRINT_CONFIG.value:
        print(config)
        return
    if _WORKDIR.value is None:
        fail("--workdir is required: the directory for results, checkpoints and figures, e.g. --workdir=workdirs/run")
    workdir = epath.Path(_WORKDIR.value)
    try:
        from experiments import distributed

        sweep_only = [name for name, flag in (("--sweep_index", _SWEEP_INDEX.value is not None),
                                              ("--sweep_count", _SWEEP_COUNT.value is not None),
                                              ("--summarize", _SUMMARIZE.value)) if flag]
        if sweep_only and not _SWEEP.value:
            raise UserError(f"{', '.join(sweep_only)} act on a sweep: add --sweep (the config file's get_sweep)")
        if _SWEEP.value:
            distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                   **{name: flag.value for name, flag in _TIMEOUTS.items()})
            run_sweep(config, workdir, index=_SWEEP_INDEX.value, count=_SWEEP_COUNT.value, summarize=_SUMMARIZE.value)
        else:
            problems = preflight(config, workdir)  # config mistakes are named before any process joins a job
            if problems:
                raise UserError("; ".join(problems))
            distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                   **{name: flag.value for name, flag in _TIMEOUTS.items()})
            run_one(config, workdir)
    except (UserError, *USER_ERRORS) as err:
        if _debug() or _VERBOSE.value:
            raise
        distributed.fail_job(_user_message(err))  # several processes: tells the others, exits without waiting
        fail(_user_message(err), code=1)


def resolve_shipped_config(argv: list[str]) -> list[str]:
    """`--config=configs/demo.py` names the shipped file when no such file exists here (installed idjax,
    or a run from another directory)."""
    out = []
    for arg in argv:
        if arg.startswith("--config="):
            path, sep, rest = arg.removeprefix("--config=").partition(":")
            shipped = CONFIG_DIR / pathlib.Path(path).name
            if not pathlib.Path(path).exists() and pathlib.Path(path).parent.name in ("configs", "") \
                    and shipped.is_file():
                arg = f"--config={shipped}{sep}{rest}"
        out.append(arg)
    return out


def launch(argv: Sequence[str] | None = None) -> None:
    """Runs the command line (`argv[0]` is the program name)."""
    argv = resolve_shipped_config(list(sys.argv if argv is None else argv))
    app.run(main, argv=argv, flags_parser=parse_flags)
