"""The `idjax` console command.

  idjax profile PATH [--labels FILE] [--out DIR] [--option KEY=VALUE ...]
      the layer profile of your own per-layer arrays (a directory of .npy files, an .npz, or an
      (L, N, D) .npy): results.json, profile.npz, figures (PNG + PDF) and report.md in DIR (paths local
      or gs:// and other etils.epath URIs)
  idjax run --config=configs/X.py[:arg] --workdir=DIR [--config.KEY=VALUE ...]
      the pipeline, exactly as `python launch.py ...` in a clone
  idjax --help | --version

Errors end in two lines naming the problem and the fix (tracebacks with --verbose or IDJAX_DEBUG=1).
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import sys
from collections.abc import Sequence

from etils import epath

import idjax
from idjax import layer_profile

USAGE = __doc__.split("\n\n")[1]


def _fail(message: str) -> int:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    print("(rerun with --verbose or IDJAX_DEBUG=1 for the traceback; idjax --help for usage)", file=sys.stderr)
    return 2


def _parse_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--option {text!r}: write KEY=VALUE, e.g. --option k_max=32")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value  # a bare word: a string option such as id_estimator=gride


def profile_command(args: argparse.Namespace) -> int:
    import numpy as np

    labels = None
    if args.labels:
        labels = np.load(io.BytesIO(epath.Path(args.labels).read_bytes()), allow_pickle=False)
    options = dict(_parse_option(option) for option in args.option)
    out = epath.Path(args.out)
    result = idjax.profile(args.path, labels, workdir=out, name=args.name or epath.Path(args.path).name,
                           **options)
    result.save(out)
    figures = result.plot(out)
    report = layer_profile.import_pipeline("experiments.report")
    report.write_report_md(out, result.summary, figures)
    print(result.to_markdown())
    print(f"\nresults: {out / 'results.json'}, {out / 'profile.npz'}, {out / 'report.md'}")
    return 0


def run_command(argv: Sequence[str]) -> int:
    layer_profile.import_pipeline("experiments.cli", keep_on_path=True)  # configs may import `configs.base`
    from experiments import cli

    cli.launch(["idjax run", *argv])
    return 0


def help_text() -> str:
    text = f"usage:\n{USAGE}\n"
    try:
        cli = layer_profile.import_pipeline("experiments.cli", keep_on_path=True)
        text += "\n" + cli.shipped_configs_help()
    except ImportError as err:
        text += f"\n(shipped configs unavailable: {err})"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("IDJAX_DEBUG", "") not in ("", "0") or "--verbose" in argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"idjax {idjax.__version__}")
        return 0
    if argv[0] == "run":
        return run_command(argv[1:])
    if argv[0] != "profile":
        return _fail(f"unknown command {argv[0]!r}: use `idjax profile PATH` or `idjax run --config=...`")
    parser = argparse.ArgumentParser(prog="idjax profile", description="Layer profile of per-layer arrays.")
    parser.add_argument("path", help="directory of per-layer .npy files (labels.npy optional), .npz, or (L,N,D) .npy")
    parser.add_argument("--labels", help=".npy of (N,) labels (default: labels.npy / 'labels' beside the layers)")
    parser.add_argument("--out", default="idjax_profile", help="output directory (default: ./idjax_profile)")
    parser.add_argument("--name", default=None, help="name shown in figures and tables")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a profile option (configs/base.py config.profile), e.g. gride_rank=32; repeatable")
    parser.add_argument("--verbose", action="store_true", help="full tracebacks")
    args = parser.parse_args(argv[1:])
    try:
        return profile_command(args)
    except (ValueError, TypeError, OSError, ImportError, MemoryError) as err:
        if debug:
            raise
        return _fail(f"{type(err).__name__}: {err}" if not isinstance(err, ValueError) else str(err))


def entry_point() -> None:
    sys.exit(main())
