"""Command line: `python main.py -c CONFIG -p PHASE [a.b=value ...]` (also under torchrun).

Phases: extract (images -> autoencoder -> HDF5 latent cache), train, sample (PNG grid),
inference (many samples -> ADM .npz), evaluate (FID / IS / precision / recall), distill
(progressive distillation). torch is imported only once a phase runs, so --help and
--print-config answer at once.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from runtime.config import PHASES, ConfigError, load_config  # omegaconf only: no torch yet

EPILOG = """\
examples:
  python main.py -c configs/demo/digits.yaml -p extract
  python main.py -c configs/demo/digits.yaml -p train train.max_steps=200
  torchrun --nproc_per_node=8 main.py -c configs/imagenet_256/dit_xl2.yaml -p train
  python main.py -c configs/imagenet_256/dit_xl2.yaml -p sample sample.classes=[207,360] sample.cfg_scale=4.0

Configs: every base.yaml from configs/ down to the file's folder, then the file, then the
overrides. Every key, its type and default: runtime/config.py; how it works: README.md.
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="main.py",
        description="Train, sample and evaluate class-conditional latent diffusion transformers (DiT).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-c", "--config", required=True, help="experiment YAML under configs/")
    parser.add_argument("-p", "--phase", required=True, choices=PHASES, help="what to run")
    parser.add_argument("overrides", nargs="*", metavar="a.b=value", help="config overrides")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (schema <- base.yaml chain <- file <- overrides) and exit")
    return parser.parse_args(argv)


def check_experiment_dir(path: str) -> None:
    """Every phase writes below experiment_dir: a regular file on its path is named before any work."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == Path(path) else f"cannot be created: {folder} is a file"
                raise FileNotFoundError(f"experiment_dir={path} {what}, not a folder; choose another experiment_dir")
            return


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:  # touches nothing
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    from runtime import distributed as dist
    from runtime.atomic_file import DiskFullError
    from runtime.preemption import Preempted
    from runtime.run_lock import RunLockedError
    from runtime.training_loop import NonFiniteLossError

    phase = importlib.import_module(f"phases.{args.phase}")

    dist.init()
    try:
        check_experiment_dir(cfg.experiment_dir)
        phase.run(cfg)
    except Preempted as stop:  # a clean stop on SIGTERM/SIGINT/SIGUSR1: progress is saved
        print(stop, file=sys.stderr, flush=True)
        return stop.exit_code
    except ConfigError as err:  # a config value that only the phase could judge (exit 2, like the others)
        print(f"config error ({args.phase}): {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, NonFiniteLossError, RunLockedError, DiskFullError) as err:
        print(f"error ({args.phase}): {err}", file=sys.stderr)
        return 1
    finally:
        dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
