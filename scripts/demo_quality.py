"""One table of measured quality for the demo: every method and sampler at its documented settings, several seeds.

    python scripts/demo_quality.py [--seeds 0 1] [--num 1000] [--only REGEX] [--out runs/demo_quality]

Each row is a trained demo run (configs/demo/*.yaml; train them first: scripts/demo.sh, the method sections of
README) sampled through the same path as `-p inference` (the checkpoint's EMA weights, per-image seeds, the
run's cfg scale unless the row says "no guidance"), `--num` images per seed with class-balanced labels, and
scored as `-p evaluate` scores them with the demo's settings (`evaluate.features=digits`): the Frechet distance
(FD) and precision/recall in the digit classifier's features against the reference batch (the cache's 1,797
images), and the share of samples the classifier reads as the digit their label asks for. The first rows are
`--num` real digits drawn from the reference, as they are (the floor of an FD at this sample size) and blurred
or noised (the metric's scale). NFE = network evaluations per image, counted by a hook on the network (a CFG
pair counts 2);
seconds = sampling the images on this machine, decoding included, the fastest of the seeds (a run that shared
the cores with other work is slower, not different). The score columns give mean +- the spread (half the range
over the seeds; with two seeds, half their difference).

Each (row, seed) is saved as <out>/<row>/seed<S>.json next to its .npz, so an interrupted table continues
where it stopped; the markdown table is printed at the end and written to <out>/table.md.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.sampling import sampled_checkpoint  # noqa: E402
from phases.generation import load_generator  # noqa: E402
from phases.npz_generation import generate_npz, inference_identity, sample_labels  # noqa: E402
from phases.scoring import feature_network, score_npz  # noqa: E402
from runtime.atomic_file import write_text_atomic  # noqa: E402
from runtime.config import load_config, sampler_settings  # noqa: E402

DEMO = "configs/demo/"


@dataclass(frozen=True)
class Row:
    """One table row: a demo config's run sampled with one sampler setting."""

    name: str  # file-safe id
    label: str  # what the table says
    config: str
    sampler: str
    steps: int
    overrides: tuple = field(default_factory=tuple)


def _cld(sampler: str, label: str, striding: str, steps: tuple) -> list[Row]:
    return [Row(f"cld_{sampler}_{striding}_{n}", f"CLD, {label} {n}, {striding} grid", DEMO + "digits_cld.yaml",
                sampler, n, (f"cld.striding={striding}",)) for n in steps]


def _compared(study: str, label: str, run: str, overrides: tuple) -> list[Row]:
    """A comparison run of README (the flow demo with 100 digits held out): ODE Heun 10, cfg 2.0 and 1.0."""
    config = DEMO + ("digits_repa.yaml" if study == "repa" else "digits_flow.yaml")
    common = ("flow.ode_solver=heun", f"experiment_dir={run}", "data.holdout=100", *overrides)
    name = f"{study}_{Path(run).name}"
    return [Row(name, f"flow, {label} (100 digits held out), ODE Heun 10", config, "ode", 10, common),
            Row(f"{name}_cfg1", f"flow, {label} (100 digits held out), ODE Heun 10, no guidance", config, "ode", 10,
                (*common, "sample.cfg_scale=1.0"))]


ROWS: list[Row] = [
    *[Row(f"ddpm{n}", f"diffusion, DDPM {n}", DEMO + "digits.yaml", "ddpm", n) for n in (50, 100)],
    *[Row(f"ddim{n}", f"diffusion, DDIM {n}", DEMO + "digits.yaml", "ddim", n) for n in (10, 25, 50)],
    Row("ddim50_cfg1", "diffusion, DDIM 50, no guidance", DEMO + "digits.yaml", "ddim", 50, ("sample.cfg_scale=1.0",)),
    *[Row(f"dpmpp{n}", f"diffusion, DPM++ {n}", DEMO + "digits.yaml", "dpm++", n) for n in (10, 20)],
    *[Row(f"distilled{n}", f"progressive distillation, {n}-step student", DEMO + "digits_distill.yaml",
          "distilled", n) for n in (32, 16, 8, 4, 2, 1)],
    Row("ddgan4", "DDGAN, 4 steps", DEMO + "digits_ddgan.yaml", "ddgan", 0),
    *_cld("sscs", "SSCS", "linear", (25, 50, 100)), *_cld("euler-maruyama", "Euler-Maruyama", "linear", (25, 50, 100)),
    *_cld("sscs", "SSCS", "quadratic", (25, 50, 100)),
    *_cld("euler-maruyama", "Euler-Maruyama", "quadratic", (25, 50, 100)),
    *[Row(f"cld_ode_heun{n}", f"CLD, probability-flow ODE, Heun {n}", DEMO + "digits_cld.yaml", "cld-ode", n,
          ("cld.ode_solver=heun",)) for n in (12, 25, 50)],
    Row("flow_heun10", "flow matching, ODE Heun 10", DEMO + "digits_flow.yaml", "ode", 10, ("flow.ode_solver=heun",)),
    Row("flow_heun10_cfg1", "flow matching, ODE Heun 10, no guidance", DEMO + "digits_flow.yaml", "ode", 10,
        ("flow.ode_solver=heun", "sample.cfg_scale=1.0")),
    Row("flow_euler20", "flow matching, ODE Euler 20", DEMO + "digits_flow.yaml", "ode", 20,
        ("flow.ode_solver=euler",)),
    Row("flow_sde50", "flow matching, SDE 50", DEMO + "digits_flow.yaml", "sde", 50),
    # the comparison runs of README's REPA and backbone sections (the baseline is one run: no REPA, DiT-T/4)
    *_compared("repa", "DiT-T/4", "runs/compare_repa/flow", ("repa.enabled=false",)),
    *_compared("repa", "DiT-T/4 + REPA", "runs/compare_repa/repa", ("repa.enabled=true",)),
    *_compared("backbone", "LightningDiT-T/4", "runs/compare_backbones/LightningDiT-T_4",
               ("model.name=LightningDiT-T/4",)),
    *[Row(f"meanflow{n}", f"MeanFlow, {n} step{'s' if n > 1 else ''}", DEMO + "digits_meanflow.yaml", "meanflow", n)
      for n in (1, 2)],
]


class EvaluationCounter:
    """Rows through the network's forward (a forward hook): per image, the network evaluations it cost."""

    def __init__(self, model: torch.nn.Module):
        self.rows = 0
        self.handle = model.register_forward_hook(self._count)

    def _count(self, module, inputs, output) -> None:
        self.rows += inputs[0].shape[0]

    def close(self) -> None:
        self.handle.remove()


def generate(row: Row, seed: int, num: int, out: Path) -> dict:
    """Sample `num` images of `row` with `seed` into `out` as `-p inference` does; NFE and seconds."""
    overrides = [*row.overrides, f"seed={seed}", f"sample.sampler={row.sampler}", f"sample.steps={row.steps}",
                 "inference.sampler=null", "inference.steps=null", "inference.batch_size=500",
                 "inference.class_balanced=true"]
    cfg = load_config(row.config, overrides)
    settings = sampler_settings(cfg, "inference")
    ckpt = sampled_checkpoint(cfg, settings)
    generator = load_generator(cfg, ckpt, settings, cfg.sample.use_ema, torch.device("cpu"))
    labels = sample_labels(num, generator.model_args["num_classes"], seed, cfg.inference.class_balanced)
    counter = EvaluationCounter(generator.model)
    start = time.perf_counter()
    generate_npz(generator, labels, seed, out, inference_identity(cfg, ckpt, settings, num), 500, None)
    seconds = time.perf_counter() - start
    counter.close()
    return {"nfe": counter.rows / num, "seconds": seconds, "checkpoint": str(ckpt)}


def blurred(images: np.ndarray, radius: float, seed: int) -> np.ndarray:
    from PIL import Image, ImageFilter

    return np.stack([np.asarray(Image.fromarray(x[..., 0]).filter(ImageFilter.GaussianBlur(radius)))[..., None]
                     for x in images])


def noised(images: np.ndarray, std: float, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed + 1000).normal(0.0, std, images.shape)
    return np.clip(images.astype(np.float64) + noise, 0, 255).astype(np.uint8)


# The metric's scale: real digits as they are, and corrupted (name, label, corruption, its strength).
REAL_ROWS = [("real", "real digits ({num:,} of the reference)", None, 0.0),
             ("real_blur0.5", "real digits, Gaussian blur radius 0.5 px", blurred, 0.5),
             ("real_blur1", "real digits, Gaussian blur radius 1 px", blurred, 1.0),
             ("real_noise25", "real digits + Gaussian noise, std 25 of 255", noised, 25.0)]


def real_digits(reference: Path, seed: int, num: int, out: Path, corrupt=None, strength: float = 0.0) -> dict:
    """`num` images drawn without replacement from the reference batch (what a perfect generator would give),
    optionally corrupted."""
    with np.load(reference) as data:
        images, labels = data["arr_0"], data["arr_1"]
    rows = np.random.default_rng(seed).permutation(len(images))[:num]
    images = images[rows] if corrupt is None else corrupt(images[rows], strength, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, images, labels[rows])
    return {"nfe": 0.0, "seconds": 0.0}


def measure(row, seed: int, num: int, folder: Path, cfg, extractor) -> dict:
    """One (row, seed): generate, score, save the result JSON (and reuse it when it is there)."""
    result_file = folder / f"seed{seed}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    npz = folder / f"seed{seed}.npz"
    npz.unlink(missing_ok=True)  # a half-made file of an interrupted run is made again
    if not isinstance(row, Row):  # (corruption, strength) of real digits
        result = real_digits(Path(cfg.evaluate.reference), seed, num, npz, *row)
    else:
        result = generate(row, seed, num, npz)
    scores = score_npz(npz, cfg.evaluate.reference, extractor, cfg.evaluate.batch_size,
                       folder.parent / "reference_cache", show_progress=False)
    result.update({key: scores[key] for key in ("fid", "precision", "recall", "accuracy")})
    write_text_atomic(result_file, json.dumps(result, indent=1) + "\n")
    return result


def spread(values: list[float], digits: int) -> str:
    """"mean +- half the range" (just the mean for one value)."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def table_line(label: str, results: list[dict]) -> str:
    nfe = results[0]["nfe"]
    seconds = min(r["seconds"] for r in results)  # the least disturbed run: others may have shared the cores
    cost = ["—", "—"] if nfe == 0 else [f"{nfe:.0f}" if nfe == round(nfe) else f"{nfe:.1f}", f"{seconds:.1f}"]
    cells = [label, spread([r["fid"] for r in results], 1), spread([r["accuracy"] for r in results], 3),
             spread([r["precision"] for r in results], 2), spread([r["recall"] for r in results], 2), *cost]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--only", default="", help="a regular expression: only the rows whose name matches")
    parser.add_argument("--out", default="runs/demo_quality")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    cfg = load_config(DEMO + "digits.yaml")
    if not Path(cfg.evaluate.reference).is_file():
        raise SystemExit(f"no reference batch {cfg.evaluate.reference}: run "
                         "`python scripts/reference_batch.py -c configs/demo/digits.yaml`")
    extractor = feature_network(cfg, "cpu")
    out = Path(args.out)
    rows = [((corrupt, strength), name, label.format(num=args.num)) for name, label, corrupt, strength in REAL_ROWS]
    rows += [(r, r.name, r.label) for r in ROWS]
    selected = [r for r in rows if re.search(args.only, r[1])]
    lines = ["| sampler | FD | accuracy | precision | recall | NFE | seconds |", "|" + " --- |" * 7]
    for row, name, label in selected:
        results = []
        for seed in args.seeds:
            result = measure(row, seed, args.num, out / name, cfg, extractor)
            results.append(result)
            print(f"{name} seed {seed}: FD {result['fid']:.2f}, accuracy {result['accuracy']:.3f}, "
                  f"NFE {result['nfe']:.1f}, {result['seconds']:.1f} s", flush=True)
        lines.append(table_line(label, results))
    table = "\n".join(lines)
    print(table)
    if not args.only:
        write_text_atomic(out / "table.md", table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
