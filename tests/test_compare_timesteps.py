"""scripts/compare_timesteps.py: two strategies end to end on the demo (tiny budget), the
report numbers against the runs' own logs, re-running, and the command-line parsing."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compare_timesteps.py"
CONFIG = ROOT / "configs" / "demo" / "digits.yaml"
STEPS, EVAL_EVERY, HOLDOUT = 6, 3, 16
BUDGET = ["--steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--holdout", str(HOLDOUT)]
TINY = ["model.name=DiT-T/4", "train.batch_size=16", "train.warmup_steps=2",
        "sample.classes=[0,1]", "sample.per_class=2", "sample.steps=2"]
STRATEGIES = ["--strategy", "uniform", "--strategy", "spd:sampler=speed,weighting=speed,tau=700,k=5,lam=0.6"]


def load_script():
    spec = importlib.util.spec_from_file_location("compare_timesteps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tool = load_script()


def compare(out: Path, *extra: str):
    command = [sys.executable, str(SCRIPT), "-c", str(CONFIG), "--out", str(out), *STRATEGIES, *BUDGET,
               *TINY, f"data.cache_path={out.parent / 'cache.h5'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def validation_records(jsonl: Path) -> dict:
    """step -> the last validation record logged at that step, read independently of the tool."""
    records = {}
    for line in jsonl.read_text().splitlines():
        record = json.loads(line)
        if "val_mse" in record:
            records[record["step"]] = record
    return records


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    proc = compare(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_reports_match_the_runs_logs(comparison):
    out, proc = comparison
    assert "extracting it first" in proc.stdout  # the cache did not exist
    report = json.loads((out / "results.json").read_text())
    assert [s["name"] for s in report["strategies"]] == ["uniform", "spd"]
    assert (report["steps"], report["eval_every"], report["holdout"]) == (STEPS, EVAL_EVERY, HOLDOUT)
    table = (out / "results.md").read_text()
    for entry in report["strategies"]:
        logged = validation_records(out / "runs" / entry["name"] / "logs" / "train.jsonl")
        assert sorted(logged) == [3, 6]
        for point in entry["curve"]:
            for key in ("val_mse", "val_vb", "val_loss"):
                assert point[key] == logged[point["step"]][key]
        final = logged[STEPS]
        assert entry["final"]["val_mse"] == final["val_mse"] and entry["final"]["val_loss"] == final["val_loss"]
        best_step = min(logged, key=lambda s: logged[s]["val_mse"])
        assert (entry["best_step"], entry["best_val_mse"]) == (best_step, logged[best_step]["val_mse"])
        row = (f"| {entry['name']} | {final['val_mse']:.5f} | {final['val_loss']:.5f} "
               f"| {logged[best_step]['val_mse']:.5f} | {best_step} |")
        assert row in table
    # the two runs really differ only in their timestep strategy, and start from the same weights
    configs = {n: OmegaConf.load(out / "runs" / n / "config.train.yaml") for n in ("uniform", "spd")}
    assert configs["uniform"].diffusion.timesteps.sampler == "uniform"
    assert configs["spd"].diffusion.timesteps.sampler == "speed" and configs["spd"].diffusion.timesteps.tau == 700
    for cfg in configs.values():
        assert (cfg.train.max_steps, cfg.train.eval_every, cfg.data.holdout) == (STEPS, EVAL_EVERY, HOLDOUT)
        assert cfg.model.init_from == str(out / "init.pt")
    snapshot = OmegaConf.load(out / "config.yaml")  # what every run read: config + trailing overrides
    assert snapshot.model.name == "DiT-T/4" and snapshot.train.batch_size == 16
    assert "-c " + str(out / "config.yaml") in (out / "logs" / "uniform.train.log").read_text()
    differing = tool.differences(OmegaConf.to_container(configs["uniform"]), OmegaConf.to_container(configs["spd"]))
    assert {key.rsplit(".", 1)[0] for key in differing} <= {"diffusion.timesteps", "experiment_dir", "wandb"}


def test_plot_and_grids_are_written(comparison):
    out, _ = comparison
    with Image.open(out / "val_loss.png") as plot:
        assert plot.format == "PNG" and plot.width > 300
    for name in ("uniform", "spd"):
        copied = out / "grids" / f"{name}.png"
        original = out / "runs" / name / "samples" / f"step{STEPS:07d}" / "grid.png"
        assert copied.read_bytes() == original.read_bytes()
        with Image.open(copied) as grid:  # 2 classes x 2 images of 16 px, 2 px padding
            assert grid.size == (2 * 18 + 2, 2 * 18 + 2)


def test_rerun_skips_finished_work_and_redoes_missing_grids(comparison):
    out, _ = comparison
    logs = {n: (out / "runs" / n / "logs" / "train.jsonl").read_text() for n in ("uniform", "spd")}
    (out / "runs" / "spd" / "samples" / f"step{STEPS:07d}" / "grid.png").unlink()
    proc = compare(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "uniform: trained (0000006.pt), not re-run" in proc.stdout
    assert "spd: trained (0000006.pt), not re-run" in proc.stdout
    assert "uniform: grid exists" in proc.stdout and "spd: sampling a grid" in proc.stdout
    assert (out / "grids" / "spd.png").is_file()
    for name, text in logs.items():
        assert (out / "runs" / name / "logs" / "train.jsonl").read_text() == text


def test_rerun_with_other_settings_is_refused(comparison, capsys):
    out, _ = comparison
    argv = ["-c", str(CONFIG), "--out", str(out), *STRATEGIES, *BUDGET, *TINY,
            f"data.cache_path={out.parent / 'cache.h5'}", "train.lr=0.01"]
    assert tool.main(argv) == 2
    message = capsys.readouterr().err
    assert "train.lr" in message and "runs/uniform" in message


def test_a_bad_strategy_fails_before_anything_runs(tmp_path, capsys):
    argv = ["-c", str(CONFIG), "--out", str(tmp_path / "out"), "--strategy", "uniform",
            "--strategy", "bad:sampler=speed,k=-1"]
    assert tool.main(argv) == 2
    message = capsys.readouterr().err
    assert "strategy bad" in message and "diffusion.timesteps.k" in message
    assert not (tmp_path / "out").exists()


def test_parse_strategy_presets_and_explicit_overrides():
    speed = tool.parse_strategy("speed")
    assert speed.name == "speed" and "diffusion.timesteps.tau=auto" in speed.overrides
    explicit = tool.parse_strategy("mine:tau=700, sample.classes=[1,2],diffusion.timesteps.k=2,seed=1")
    assert explicit.overrides == [
        "diffusion.timesteps.tau=700", "sample.classes=[1,2]", "diffusion.timesteps.k=2", "seed=1"
    ]
    assert tool.parse_strategy("asis:").overrides == []
    with pytest.raises(ValueError, match="unknown strategy preset 'nope'"):
        tool.parse_strategy("nope")
    with pytest.raises(ValueError, match="strategy name"):
        tool.parse_strategy("a/b:sampler=uniform")
    with pytest.raises(ValueError, match="key=value"):
        tool.parse_strategy("x:sampler")
    for name in tool.DEFAULT_STRATEGIES:
        assert name in tool.PRESETS


def test_read_validation_keeps_the_last_record_of_a_step(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    lines = [
        {"step": 2, "loss": 1.0},
        {"step": 2, "val_mse": 0.5, "val_vb": 0.1, "val_loss": 0.6},
        {"step": 4, "val_mse": 0.4, "val_vb": 0.1, "val_loss": 0.5},
        {"step": 2, "val_mse": 0.3, "val_vb": 0.1, "val_loss": 0.4},  # re-logged after a resume
    ]
    jsonl.write_text("".join(json.dumps(line) + "\n" for line in lines))
    curve = tool.read_validation(jsonl)
    assert curve == [{"step": 2, "val_mse": 0.3, "val_vb": 0.1, "val_loss": 0.4},
                     {"step": 4, "val_mse": 0.4, "val_vb": 0.1, "val_loss": 0.5}]
    summary = tool.summarize("x", [], curve, steps=4)
    assert summary["final"]["val_mse"] == 0.4 and (summary["best_step"], summary["best_val_mse"]) == (2, 0.3)
    with pytest.raises(ValueError, match="expected 6"):
        tool.summarize("x", [], curve, steps=6)
