"""Entry point: `python launch.py --config=configs/X.py:arg --workdir=DIR [--config.key=value ...] [--sweep]`.

The command line lives in experiments/cli.py (shared with the installed `idjax run`); `--help` lists
the flags and the shipped configs, `--print_config` prints the resolved config.
"""

from experiments import cli

if __name__ == "__main__":
    cli.launch()
