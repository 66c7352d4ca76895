"""Show the timestep distribution P(t) and loss weight w(t) that a config trains with.

    python scripts/timesteps.py -c configs/imagenet_256/dit_xl2.yaml diffusion.timesteps.sampler=speed --json
    python scripts/timesteps.py -c CONFIG diffusion.timesteps.weighting=speed --plot timesteps.png

--json prints {"p": [...], "w": [...]} (T values each); without it a short summary is printed.
P is the marginal of one batch element: SpeeD's dual sampling is included, in its large-batch
limit unless --batch-size gives the batch size. w is the weight on the eps-MSE (normalised
when diffusion.timesteps.normalize is set; for loss_second_moment it includes the importance
weight of the warm-up, i.e. uniform, distribution).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from diffusion.timesteps import build_timestep_strategy  # noqa: E402
from diffusion.timesteps.speed_threshold import meaningful_steps, resolve_tau  # noqa: E402
from runtime.config import load_config  # noqa: E402


def training_diffusion(cfg):
    """The 1000-step training diffusion of the config (tables are always built on it)."""
    from diffusion import create_diffusion

    return create_diffusion(cfg.diffusion.num_steps, cfg.diffusion.schedule, learn_sigma=True)


def timestep_tables(cfg, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(P(t), w(t)) for the config's diffusion.timesteps section."""
    strategy = build_timestep_strategy(cfg.diffusion.timesteps, training_diffusion(cfg), "cpu")
    return strategy.probabilities(batch_size), strategy.weights()


def summary(cfg, p: np.ndarray, w: np.ndarray) -> str:
    ts = cfg.diffusion.timesteps
    t = np.arange(p.size)
    lines = [
        f"sampler={ts.sampler} weighting={ts.weighting} tau={ts.tau} schedule={cfg.diffusion.schedule} T={p.size}",
        f"P: mode t={int(np.argmax(p))}, mean t={float(np.dot(p, t)):.1f}",
        f"w: min {w.min():.4g} (t={int(np.argmin(w))}), max {w.max():.4g} (t={int(np.argmax(w))}), "
        f"E_P[w]={float(np.dot(p, w)):.4f}",
    ]
    return "\n".join(lines)


def markers(cfg) -> dict:
    """Where SpeeD's threshold tau and the dual-sampling pivot are, when the strategy uses them."""
    ts = cfg.diffusion.timesteps
    abar = training_diffusion(cfg).alphas_cumprod
    out = {}
    if ts.sampler == "speed" or ts.weighting == "speed":
        out["tau"] = resolve_tau(ts.tau, abar)
    if ts.dual and ts.sampler in ("speed", "speed_legacy"):
        out["dual pivot"] = min(meaningful_steps(abar), abar.size - 1)
    return out


def title_of(cfg) -> str:
    """The strategy and the parameters it uses."""
    ts = cfg.diffusion.timesteps
    used = {"speed": ["tau", "k", "dual"], "speed_legacy": ["dual"], "lognormal": ["mean", "std"],
            "logitnormal": ["mean", "std"], "logitnormal_index": ["mean", "std"],
            "loss_second_moment": ["history", "uniform_prob"]}.get(ts.sampler, [])
    used += {"speed": ["lam", "tau"], "p2": ["p2_k", "p2_gamma"], "min_snr": ["gamma"]}.get(ts.weighting, [])
    params = ", ".join(f"{key}={ts[key]}" for key in dict.fromkeys(used))
    return f"sampler={ts.sampler}, weighting={ts.weighting}" + (f" ({params})" if params else "")


def plot(p: np.ndarray, w: np.ndarray, title: str, path: Path, marks: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.arange(p.size)
    fig, (ax_p, ax_w) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    ax_p.plot(t, p, label="P(t)")
    ax_p.axhline(1.0 / p.size, color="grey", linestyle=":", label=f"uniform 1/T = {1.0 / p.size:.2g}")
    ax_p.set_ylabel("P(t)")
    ax_p.set_title(title, fontsize=9)
    ax_w.plot(t, w)
    ax_w.set_ylabel("w(t) on eps-MSE")
    ax_w.set_xlabel("timestep t")
    for (name, step), style in zip((marks or {}).items(), ("--", "-.")):
        for ax in (ax_p, ax_w):
            ax.axvline(step, color="tab:red", linestyle=style, label=f"{name} = {step}" if ax is ax_p else None)
    ax_p.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", required=True, help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="a.b=value config overrides")
    parser.add_argument("--json", action="store_true", help='print {"p": [...], "w": [...]}')
    parser.add_argument("--plot", type=Path, help="write a PNG of P(t) and w(t)")
    parser.add_argument("--batch-size", type=int, help="exact dual-sampling marginal for this batch size")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        p, w = timestep_tables(cfg, args.batch_size)
    except ValueError as err:  # ConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"p": p.tolist(), "w": w.tolist()}))
    else:
        print(summary(cfg, p, w))
    if args.plot is not None:
        plot(p, w, title_of(cfg), args.plot, markers(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
