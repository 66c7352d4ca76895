"""SSCS against Euler-Maruyama with the exact score: where each wins, on two Gaussian data sets, two time grids.

    python scripts/cld_sampler_study.py [--steps 10 25 50 100 200]

On Gaussian data the exact score is known and both samplers' output moments are computed exactly
(diffusion/cld_gaussian.py), so the numbers are discretisation error alone: the largest of |mean error| / std and
|variance error| / variance over the dimensions (0.1 = 10% of the data's spread). "wide": unit-scale data, the
setting of the CLD paper's toy studies; "narrow": per-dimension stds 0.05..0.4, as image pixels given their
class, where the score near the data is stiff. Runs in seconds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.cld import CLD  # noqa: E402
from diffusion.cld_gaussian import GaussianData, moment_error, output_moments  # noqa: E402
from diffusion.cld_samplers import euler_maruyama_sample, sscs_sample  # noqa: E402

DATA = {
    "wide (std 0.5, 1, 1.5)": GaussianData.of([-1.0, 0.5, 2.0], [0.5, 1.0, 1.5]),
    "narrow (std 0.05, 0.2, 0.4)": GaussianData.of([0.0, -0.5, 0.5], [0.05, 0.2, 0.4]),
}
SAMPLERS = {"SSCS": sscs_sample, "Euler-Maruyama": euler_maruyama_sample}


def error(cld: CLD, data: GaussianData, sampler, steps: int, striding: str) -> float:
    run = lambda c, score, x, v, n, noise: sampler(c, score, x, v, n, noise, striding=striding)
    return moment_error(data, *output_moments(cld, data, run, steps))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 100, 200])
    args = parser.parse_args(argv)
    cld = CLD()
    print("| data | grid | sampler | " + " | ".join(f"{n} steps" for n in args.steps) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in args.steps) + " |")
    for data_name, data in DATA.items():
        for striding in ("linear", "quadratic"):
            for name, sampler in SAMPLERS.items():
                cells = [f"{error(cld, data, sampler, n, striding):.3g}" for n in args.steps]
                print(f"| {data_name} | {striding} | {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
