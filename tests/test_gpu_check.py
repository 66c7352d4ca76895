"""scripts/gpu_check.py --cpu: the GPU check's every step with tiny models on the CPU, so the script cannot rot
before a GPU runs it."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.e2e

# compile, and benchmarks whose code path the CPU run covers once already: GPU only
EXPECTED_SKIPS = {"train_compiled", "sample_ddpm250_bf16_compiled", "sample_flow_ode50_interval",
                  "sample_meanflow_1step", "train_lightningdit_flow_repa"}


def test_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu" and report["device"] == "cpu"
    steps = {**report["check"], **report["benchmark"]}
    assert {"extract", "train_diffusion", "flow_repa", "fsdp", "meanflow", "kill_and_resume", "sample",
            "inference", "evaluate", "pytest_gpu", "train_lightningdit_flow_repa", "train_dit_b4_cpu_eager",
            "sample_ddpm250_fp32", "extract_sd_vae"} <= set(steps)
    for name, step in steps.items():
        assert step["status"] == ("SKIP" if name in EXPECTED_SKIPS else "PASS"), (name, step)
    checks = report["check"]
    assert checks["kill_and_resume"]["figures"]["ema_max_abs_diff"] == 0.0  # bit-identical on the CPU
    assert checks["kill_and_resume"]["figures"]["resumed_from_step"] > 0
    assert abs(checks["evaluate"]["figures"]["fid"]) < 1e-3
    assert checks["pytest_gpu"]["figures"]["skipped"] >= 5
    assert all(report["benchmark"][name]["figures"]["img_s"] > 0 for name in report["benchmark"]
               if name not in EXPECTED_SKIPS)
    lines = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "SKIP", "FAIL"))]
    assert len(lines) == len(steps)  # one line per check
