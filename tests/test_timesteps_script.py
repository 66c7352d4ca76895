"""scripts/timesteps.py: JSON tables and the plot, from a config file plus overrides."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from diffusion.timesteps import dual, samplers, weightings

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "timesteps.py"
T = 1000


def linear_diffusion(num_steps, schedule, learn_sigma=True):
    assert schedule == "linear" and learn_sigma
    betas = np.linspace(1e-4, 0.02, num_steps, dtype=np.float64)
    return SimpleNamespace(num_timesteps=num_steps, betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))


@pytest.fixture
def script(monkeypatch):
    """The script as a module, with the training diffusion replaced by a numpy linear schedule."""
    spec = importlib.util.spec_from_file_location("timesteps_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(
        module, "training_diffusion", lambda cfg: linear_diffusion(cfg.diffusion.num_steps, cfg.diffusion.schedule)
    )
    return module


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("diffusion:\n  timesteps:\n    sampler: speed\n    tau: 700\n")
    return path


def test_json_output(script, config_file, capsys):
    assert script.main(["-c", str(config_file), "diffusion.timesteps.weighting=speed", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"p", "w"} and len(out["p"]) == T and len(out["w"]) == T
    abar = linear_diffusion(T, "linear").alphas_cumprod
    assert np.allclose(out["p"], dual.dual_marginal(samplers.speed_probabilities(T, 700, 5.0), 642))
    assert np.allclose(out["w"], weightings.speed_weights(abar, 700, 0.6))


def test_summary_and_plot(script, config_file, tmp_path, capsys):
    png = tmp_path / "plots" / "timesteps.png"
    assert script.main(["-c", str(config_file), "--plot", str(png), "diffusion.timesteps.dual=false"]) == 0
    assert "sampler=speed" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_override_is_a_clean_error(script, config_file, capsys):
    assert script.main(["-c", str(config_file), "diffusion.timesteps.k=-1"]) == 2
    assert "diffusion.timesteps.k" in capsys.readouterr().err


def test_runs_from_the_repo_root_with_the_real_diffusion(config_file):
    pytest.importorskip("diffusion.gaussian_diffusion", reason="create_diffusion not written yet")
    result = subprocess.run(
        [sys.executable, "scripts/timesteps.py", "-c", str(config_file), "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    p = np.array(json.loads(result.stdout)["p"])
    assert p.shape == (T,) and round(p[:700].sum(), 2) == 0.96
