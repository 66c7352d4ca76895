"""Train the same model with several timestep strategies and compare their validation loss.

    python scripts/compare_timesteps.py -c configs/demo/digits.yaml --out runs/compare_digits --ckpt-every 200
    python scripts/compare_timesteps.py -c CONFIG --strategy uniform --strategy speed \\
        --strategy speed_tau700:sampler=speed,weighting=speed,k=5,lam=0.6,tau=700 --steps 600

For every strategy the tool runs `main.py -c OUT/config.yaml -p train` and then `-p sample` as
subprocesses, each run in its own folder OUT/runs/<name>, with the same seed, data, model,
initial weights (OUT/init.pt, seeded, unless the config sets model.init_from) and number of
steps; only the `diffusion.timesteps` settings differ. The validation loss that
phases/validation.py logs (uniform stratified timesteps, no weights, fixed draws and noise on the
`data.holdout` evenly spaced held-out items) is the same measurement for every strategy, so the curves compare
the models, not the training objectives. It then writes

    OUT/results.md     table: final val_mse / val_loss, best val_mse and its step
    OUT/results.json   the same numbers plus every logged validation point
    OUT/val_loss.png   val_mse against steps, one line per strategy
    OUT/grids/<name>.png  each run's sample grid (same seeds for every strategy)
    OUT/config.yaml    the config with the trailing overrides, resolved once; every run reads it

`--strategy NAME` takes a preset (see PRESETS); `--strategy NAME:key=value,key=value` gives the
overrides itself: a field of `diffusion.timesteps` (e.g. `tau`) may be named alone, any other key
in full (e.g. `seed=1`); `NAME:` alone trains with the config's own settings. Trailing
`a.b=value` overrides apply to every run. Order, later wins: config file <- trailing overrides
<- strategy overrides <- the tool's own keys (experiment_dir, train.max_steps, train.eval_every,
data.holdout, ...).

Re-running the same command continues: a finished run (checkpoint at --steps) is not started
again, an interrupted one resumes from its last checkpoint, and an existing grid is kept. A run
folder whose recorded config differs from the planned one is an error, so runs made with
different settings are never mixed in one table.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from omegaconf import DictConfig, OmegaConf  # noqa: E402

from diffusion import create_diffusion  # noqa: E402
from diffusion.timesteps import build_timestep_strategy  # noqa: E402
from runtime.checkpoint import latest_checkpoint  # noqa: E402
from methods.registry import TimestepsConfig  # noqa: E402
from runtime.config import load_config, save_config, to_container  # noqa: E402

TIMESTEPS = "diffusion.timesteps"
TIMESTEPS_FIELDS = frozenset(f.name for f in fields(TimestepsConfig))  # short names in --strategy

# Each preset fixes the sampler, the weighting and the parameters they use (spec §1-§2), so the
# config's own timestep settings cannot leak into a named strategy. `normalize` and `weight_vb`
# are left to the config / trailing overrides: they apply to every strategy alike.
PRESETS: dict[str, tuple[str, ...]] = {
    "uniform": ("sampler=uniform", "weighting=none"),
    # SpeeD as in the paper's code (k=5, lam=0.6, dual sampling). tau=auto is meaningful_steps:
    # 642 on linear-1000, next to the paper configs' 700, and it follows the schedule (959 on
    # cosine, where a fixed 700 would put part of the informative steps in the suppressed area).
    "speed": ("sampler=speed", "weighting=speed", "k=5", "lam=0.6", "tau=auto", "dual=true"),
    "speed_tau700": ("sampler=speed", "weighting=speed", "k=5", "lam=0.6", "tau=700", "dual=true"),
    # The older public SpeeD code: tanh step sampler + P2 (k=1, gamma=1) weighting (spec §1.3, §1.5).
    "speed_legacy": ("sampler=speed_legacy", "weighting=p2", "p2_k=1", "p2_gamma=1", "dual=true"),
    "p2": ("sampler=uniform", "weighting=p2", "p2_k=1", "p2_gamma=1"),
    "min_snr": ("sampler=uniform", "weighting=min_snr", "gamma=5"),
    "logitnormal": ("sampler=logitnormal", "weighting=none", "mean=0", "std=1"),
    "loss_second_moment": ("sampler=loss_second_moment", "weighting=none", "history=10", "uniform_prob=0.001"),
}
DEFAULT_STRATEGIES = (
    "uniform", "speed", "speed_tau700", "speed_legacy", "p2", "min_snr", "logitnormal", "loss_second_moment",
)
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
VALIDATION_KEYS = ("val_mse", "val_vb", "val_loss")


@dataclass
class Strategy:
    """One training run of the comparison: a name, its overrides, and (once planned) its config."""

    name: str
    overrides: list[str]
    cfg: DictConfig | None = None
    run_dir: Path | None = None


@dataclass
class Comparison:
    """What every run shares: the config, the common overrides, the budget, and where it all goes."""

    config: Path
    out: Path
    common: list[str]
    steps: int
    eval_every: int
    holdout: int
    ckpt_every: int = 0  # 0: the config's train.ckpt_every
    init: Path | None = None  # shared initial weights (None: the config's model.init_from)
    sample: bool = True

    @property
    def snapshot(self) -> Path:
        """The config with the common overrides, resolved once: every run reads this file, so an
        edit of the experiment YAML during a comparison cannot make its runs differ."""
        return self.out / "config.yaml"

    def run_overrides(self, strategy: Strategy) -> list[str]:
        """Strategy overrides, then the keys the tool fixes (last, so nothing changes them)."""
        fixed = [
            f"experiment_dir={self.out / 'runs' / strategy.name}",
            f"train.max_steps={self.steps}",
            f"train.eval_every={self.eval_every}",
            f"data.holdout={self.holdout}",
            "train.progress=false",
            f"wandb.name={strategy.name}",
        ]
        if self.ckpt_every:
            fixed.append(f"train.ckpt_every={self.ckpt_every}")
        if self.init is not None:
            fixed.append(f"model.init_from={self.init}")
        return [*strategy.overrides, *fixed]


# ---------------------------------------------------------------- strategies from the command line


def split_overrides(text: str) -> list[str]:
    """'a=1,b=[2,3]' -> ['a=1', 'b=[2,3]']: commas inside brackets belong to the value."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def qualify(override: str) -> str:
    """'tau=700' -> 'diffusion.timesteps.tau=700' (a field of that section); other keys as they are."""
    if "=" not in override:
        raise ValueError(f"strategy override {override!r} is not of the form key=value")
    key, value = override.split("=", 1)
    key = key.strip()
    return f"{TIMESTEPS}.{key}={value}" if key in TIMESTEPS_FIELDS else f"{key}={value}"


def parse_strategy(spec: str) -> Strategy:
    """'NAME' (a preset) or 'NAME:key=value,...' (explicit overrides) -> Strategy."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not NAME.match(name):
        raise ValueError(f"strategy name {name!r} must be letters, digits, '_', '-' or '.' (it names files)")
    if not sep:
        if name not in PRESETS:
            raise ValueError(
                f"unknown strategy preset {name!r}; presets: {', '.join(PRESETS)} "
                f"(or give overrides: --strategy {name}:sampler=...,weighting=...)"
            )
        return Strategy(name, [qualify(o) for o in PRESETS[name]])
    return Strategy(name, [qualify(o) for o in split_overrides(rest)])


# ---------------------------------------------------------------- planning (before anything runs)


def plan(comparison: Comparison, strategies: list[Strategy]) -> None:
    """Resolve and validate every run's config up front, so a typo fails in seconds, not runs later."""
    names = [s.name for s in strategies]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"strategy names must be unique; repeated: {', '.join(repeated)}")
    for strategy in strategies:
        strategy.run_dir = comparison.out / "runs" / strategy.name
        try:
            cfg = load_config(comparison.config, [*comparison.common, *comparison.run_overrides(strategy)])
            diffusion = create_diffusion(cfg.diffusion.num_steps, cfg.diffusion.schedule, learn_sigma=True)
            build_timestep_strategy(cfg.diffusion.timesteps, diffusion, "cpu")
        except ValueError as err:  # ConfigError is a ValueError
            raise ValueError(f"strategy {strategy.name}: {err}") from None
        strategy.cfg = cfg
        check_same_settings(strategy)
    cache_paths = sorted({str(s.cfg.data.cache_path) for s in strategies})
    if len(cache_paths) > 1:
        raise ValueError(f"the strategies must share one data.cache_path, got {cache_paths}")


def check_same_settings(strategy: Strategy) -> None:
    """An existing run folder must have been made with the planned config (its location aside)."""
    saved_path = strategy.run_dir / "config.train.yaml"
    if not saved_path.is_file():
        return
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    differing = [key for key in differences(saved, to_container(strategy.cfg)) if key != "experiment_dir"]
    if differing:
        raise ValueError(
            f"{strategy.run_dir} was trained with other settings ({', '.join(differing)} differ from this "
            "command); use another --out, or delete that folder to retrain it"
        )


def differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b), key=str):
            found += differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return found
    return [] if a == b else [prefix.rstrip(".")]


# ---------------------------------------------------------------- running


def write_initial_weights(cfg: DictConfig, path: Path) -> None:
    """Seeded initial weights shared by every run, so all strategies start from the same model.

    The train phase draws the initial weights from the unseeded global RNG, so two runs with
    the same seed would start from different weights, mixing the strategy's effect with the
    luck of the initialisation.
    """
    import torch

    from datasets.latent_cache import read_cache_info
    from models import create_model
    from runtime.model_spec import model_args_from_cache

    margs = model_args_from_cache(cfg, read_cache_info(cfg.data.cache_path))
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("model_args") != margs or saved.get("seed") != int(cfg.seed):
            raise ValueError(
                f"{path} holds initial weights for {saved.get('model_args')} with seed {saved.get('seed')}, "
                f"not {margs} with seed {cfg.seed}: use another --out"
            )
        return
    torch.manual_seed(int(cfg.seed))
    model = create_model(**margs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": model.state_dict(), "model_args": margs, "seed": int(cfg.seed)}, tmp)
    tmp.replace(path)


def main_py(config: Path, phase: str, overrides: list[str], log_path: Path) -> None:
    """Run one phase of main.py as a subprocess, output to `log_path`; raise with its tail on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO_ROOT / "main.py"), "-c", str(config), "-p", phase, *overrides]
    with open(log_path, "a") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-20:])
        raise RuntimeError(f"main.py -p {phase} failed (exit {code}); last lines of {log_path}:\n{tail}")


def grid_path(comparison: Comparison, strategy: Strategy) -> Path:
    """Samples go to a folder named after the step, so a longer run never reuses an older grid."""
    return strategy.run_dir / "samples" / f"step{comparison.steps:07d}" / "grid.png"


def run_strategy(comparison: Comparison, strategy: Strategy) -> None:
    """Train (unless a checkpoint at --steps exists) and sample a grid (unless it exists)."""
    overrides = comparison.run_overrides(strategy)
    logs = comparison.out / "logs"
    latest = latest_checkpoint(strategy.run_dir)
    if latest is not None and int(latest.stem) >= comparison.steps:
        print(f"{strategy.name}: trained ({latest.name}), not re-run", flush=True)
    else:
        print(f"{strategy.name}: training {comparison.steps} steps -> {strategy.run_dir}", flush=True)
        main_py(comparison.snapshot, "train", overrides, logs / f"{strategy.name}.train.log")
    if not comparison.sample:
        return
    grid = grid_path(comparison, strategy)
    if grid.is_file():
        print(f"{strategy.name}: grid exists, not re-sampled", flush=True)
        return
    print(f"{strategy.name}: sampling a grid", flush=True)
    main_py(comparison.snapshot, "sample", [*overrides, f"sample.output={grid.parent}"],
            logs / f"{strategy.name}.sample.log")


# ---------------------------------------------------------------- results


def read_validation(jsonl: Path) -> list[dict]:
    """The validation records of a train log, one per step (a resumed run may log a step twice: last wins)."""
    if not jsonl.is_file():
        raise FileNotFoundError(f"no training log {jsonl}")
    by_step = {}
    for number, line in enumerate(jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{jsonl}:{number} is not JSON: {line[:80]!r}") from None
        if "val_mse" in record:
            by_step[int(record["step"])] = {"step": int(record["step"]), **{k: record[k] for k in VALIDATION_KEYS}}
    return [by_step[step] for step in sorted(by_step)]


def summarize(name: str, overrides: list[str], curve: list[dict], steps: int) -> dict:
    """Final and best validation numbers of one run (its last validation point must be at `steps`)."""
    if not curve or curve[-1]["step"] != steps:
        last = curve[-1]["step"] if curve else None
        raise ValueError(f"{name}: the last validation loss is at step {last}, expected {steps}")
    best = min(curve, key=lambda r: (r["val_mse"], r["step"]))
    return {
        "name": name,
        "overrides": list(overrides),
        "final": curve[-1],
        "best_val_mse": best["val_mse"],
        "best_step": best["step"],
        "curve": curve,
    }


def markdown_table(results: list[dict]) -> str:
    """The final and best validation numbers, one row per strategy."""
    lines = [
        "| strategy | final val_mse | final val_loss | best val_mse | at step |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        final = r["final"]
        lines.append(
            f"| {r['name']} | {final['val_mse']:.5f} | {final['val_loss']:.5f} "
            f"| {r['best_val_mse']:.5f} | {r['best_step']} |"
        )
    return "\n".join(lines)


def write_reports(out: Path, results: list[dict], header: dict) -> None:
    """OUT/results.json (every number) and OUT/results.md (the table and how it was made)."""
    (out / "results.json").write_text(json.dumps({**header, "strategies": results}, indent=1) + "\n")
    settings = "\n".join(f"- `{r['name']}`: `{' '.join(r['overrides']) or '(the config as it is)'}`" for r in results)
    common = f"`{' '.join(header['common_overrides'])}`" if header["common_overrides"] else "none"
    start = "the same seeded initial weights" if header["shared_init"] else f"`{header['init_from']}`"
    text = (
        f"# Timestep strategies on `{header['config']}`\n\n"
        f"{header['model']}, {header['steps']} training steps per strategy, seed {header['seed']} (unless a "
        f"strategy sets one), every run starting from {start}. Validation loss every {header['eval_every']} "
        f"steps on {header['holdout']} held-out cache items (uniform stratified timesteps, unweighted, fixed "
        f"noise: the same measurement for every strategy). Common overrides: {common}.\n\n"
        f"{markdown_table(results)}\n\nval_loss = val_mse + val_vb (learned-sigma VB term).\n\n"
        f"Strategy settings:\n\n{settings}\n"
    )
    (out / "results.md").write_text(text)


def plot_curves(results: list[dict], path: Path, title: str) -> None:
    """val_mse against steps, one line per strategy (log scale: early values are much larger)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for r in results:
        axes.plot([p["step"] for p in r["curve"]], [p["val_mse"] for p in r["curve"]],
                  marker="o", markersize=3, label=r["name"])
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(ScalarFormatter())
    axes.set_xlabel("training step")
    axes.set_ylabel("validation eps-MSE (uniform t, unweighted)")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train one model per timestep strategy and compare their validation loss.",
        epilog=f"presets: {', '.join(PRESETS)}; default set: {', '.join(DEFAULT_STRATEGIES)}",
    )
    parser.add_argument("-c", "--config", required=True, type=Path, help="experiment YAML")
    parser.add_argument(
        "--strategy", action="append", dest="strategies", metavar="NAME[:key=value,...]",
        help="a preset name, or NAME:overrides (repeatable; default: the default set)",
    )
    parser.add_argument("--steps", type=int, default=600, help="training steps per strategy (default 600)")
    parser.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (default 100)")
    parser.add_argument("--holdout", type=int, default=256, help="N evenly spaced cache items held out (default 256)")
    parser.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (default: the config's)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare_timesteps"), help="output folder")
    parser.add_argument("--no-sample", action="store_true", help="skip the sample grids")
    parser.add_argument("overrides", nargs="*", metavar="a.b=value", help="overrides for every run")
    args = parser.parse_args(argv)
    for key in ("steps", "eval_every", "holdout"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.ckpt_every < 0:
        parser.error("--ckpt-every must be non-negative")
    if not args.config.is_file():
        parser.error(f"config file not found: {args.config}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    comparison = Comparison(
        config=args.config.resolve(),
        out=args.out.resolve(),
        common=list(args.overrides),
        steps=args.steps,
        eval_every=args.eval_every,
        holdout=args.holdout,
        ckpt_every=args.ckpt_every,
        sample=not args.no_sample,
    )
    try:
        cfg = load_config(comparison.config, comparison.common)  # shared: cache, model, seed
        if cfg.model.init_from is None:
            comparison.init = comparison.out / "init.pt"  # a given init_from (fine-tuning) is shared as it is
        strategies = [parse_strategy(spec) for spec in args.strategies or DEFAULT_STRATEGIES]
        plan(comparison, strategies)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_config(cfg, comparison.snapshot)
    try:
        if not Path(cfg.data.cache_path).is_file():
            print(f"no cache at {cfg.data.cache_path}: extracting it first", flush=True)
            main_py(comparison.snapshot, "extract", [], comparison.out / "logs" / "extract.log")
        if comparison.init is not None:
            write_initial_weights(cfg, comparison.init)
        for strategy in strategies:
            run_strategy(comparison, strategy)
        results = [
            summarize(s.name, s.overrides, read_validation(s.run_dir / "logs" / "train.jsonl"), comparison.steps)
            for s in strategies
        ]
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    out = comparison.out
    if comparison.sample:
        (out / "grids").mkdir(parents=True, exist_ok=True)
        for strategy, result in zip(strategies, results):
            shutil.copyfile(grid_path(comparison, strategy), out / "grids" / f"{strategy.name}.png")
            result["grid"] = f"grids/{strategy.name}.png"
    header = {
        "config": str(args.config),
        "common_overrides": comparison.common,
        "model": str(cfg.model.name),
        "seed": int(cfg.seed),
        "steps": comparison.steps,
        "eval_every": comparison.eval_every,
        "holdout": comparison.holdout,
        "shared_init": comparison.init is not None,
        "init_from": None if comparison.init is not None else str(cfg.model.init_from),
    }
    write_reports(out, results, header)
    plot_curves(results, out / "val_loss.png", f"{args.config.name}: {cfg.model.name}, {comparison.steps} steps")
    print(f"\n{markdown_table(results)}\n\nwrote {out / 'results.md'}, results.json, val_loss.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
