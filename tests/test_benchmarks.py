"""scripts/benchmark_train.py and scripts/benchmark_sampling.py: each runs the real phase code on CPU
with tiny settings, ends with "<number> img/s", and leaves nothing in the temporary folder."""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from datasets.latent_cache import read_cache_info
from runtime.config import load_config
from runtime.model_spec import check_cache_matches_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "digits.yaml"
IMAGENET = ROOT / "configs" / "imagenet_256" / "dit_s2.yaml"  # 4x32x32 latents, like DiT-XL/2's
LAST_LINE = re.compile(r"^(\d+(?:\.\d+)?) img/s$")


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_cache(digits_cache):
    """The demo's real 1x16x16 cache (make_synthetic_cache only writes 4x32x32 latents)."""
    return digits_cache


def run_script(name, args, tmp_path):
    """The script as a user runs it, with TMPDIR in tmp_path; returns (stdout, img/s, the TMPDIR)."""
    temp = tmp_path / "tmpdir"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}  # torch makes this folder on import
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{name}.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = LAST_LINE.match(proc.stdout.strip().splitlines()[-1])
    assert match, proc.stdout
    return proc.stdout, float(match.group(1)), temp


@pytest.mark.parametrize("method", ["diffusion", "flow"])
def test_train_on_an_existing_cache(demo_cache, tmp_path, method):
    out, rate, temp = run_script("benchmark_train", [
        "-c", str(DEMO), f"data.cache_path={demo_cache}", "model.name=DiT-T/4", "train.batch_size=16",
        f"model.method={method}", "--warmup", "2", "--steps", "3"], tmp_path)
    assert rate > 0
    assert "3 steps timed after 2 warm-up steps" in out
    assert f"data: cache {demo_cache}" in out
    assert not list(temp.iterdir()), "the temporary run folder was left behind"


def test_train_on_a_synthetic_cache(tmp_path):
    out, rate, temp = run_script("benchmark_train", [
        "-c", str(IMAGENET), "model.name=DiT-T/8", "train.batch_size=8", "data.num_workers=0",
        "--items", "32", "--warmup", "1", "--steps", "2"], tmp_path)
    assert rate > 0
    assert "2 steps timed after 1 warm-up steps" in out and "synthetic cache of 32 random latents" in out
    assert not list(temp.iterdir()), "the synthetic cache or the run folder was left behind"


def test_synthetic_cache_passes_the_train_phase_check_or_says_why_not(tmp_path):
    bench = load_script("benchmark_train")
    cfg = load_config(IMAGENET, [f"data.cache_path={tmp_path / 'absent.h5'}"])
    path, overrides = bench.synthetic_cache(cfg, tmp_path, items=8)
    check_cache_matches_config(load_config(IMAGENET, overrides), read_cache_info(path))  # raises on a mismatch
    demo = load_config(DEMO, [f"data.cache_path={tmp_path / 'absent.h5'}"])
    with pytest.raises(ValueError, match="model expects 3x16x16 latents.*pass data.cache_path"):
        bench.synthetic_cache(demo, tmp_path / "demo", items=8)


def test_throughput_is_total_images_over_total_time_after_the_warmup():
    bench = load_script("benchmark_train")
    records = [{"step": 5, "img/s": 1.0}, {"step": 10, "img/s": 100.0}, {"step": 15, "img/s": 50.0},
               {"step": 17, "img/s": 200.0}, {"step": 15, "val_loss": 0.5}]
    # windows after step 5: 5 steps at 100 img/s, 5 at 50, 2 at 200, batch 4 -> 48 images in 0.2+0.4+0.04 s
    rate, steps, seconds = bench.throughput_after(records, warmup=5, batch_size=4)
    assert steps == 12 and seconds == pytest.approx(0.64) and rate == pytest.approx(48 / 0.64)
    with pytest.raises(ValueError, match="no log record after the warm-up"):
        bench.throughput_after(records[:1], warmup=5, batch_size=4)


def test_train_refuses_overrides_of_the_keys_it_sets(capsys):
    bench = load_script("benchmark_train")
    with pytest.raises(SystemExit):
        bench.parse_args(["-c", str(DEMO), "train.max_steps=10"])
    assert "train.max_steps=10: set by this script" in capsys.readouterr().err


def test_sampling_a_bare_state_dict_with_the_demo_geometry(demo_cache, tmp_path):
    out, rate, temp = run_script("benchmark_sampling", [
        "-c", str(DEMO), f"data.cache_path={demo_cache}", "model.name=DiT-T/4", "sample.steps=2",
        "sample.batch_size=4", "--images", "6"], tmp_path)
    assert rate > 0
    assert "latent 1x16x16" in out and "8 images in 2 batches" in out  # rounded up to whole batches
    assert not list(temp.iterdir()), "the random checkpoint was left behind"


def test_sampling_without_decoding(tmp_path):
    out, rate, temp = run_script("benchmark_sampling", [
        "-c", str(IMAGENET), "model.name=DiT-T/8", "sample.steps=2", "sample.batch_size=2", "--no-decode",
        "--images", "2"], tmp_path)
    assert rate > 0
    assert "latent 4x32x32" in out and "decoder: none" in out
    assert not list(temp.iterdir()), "the random checkpoint was left behind"


def test_sampling_a_flow_model_with_the_sde(demo_cache, tmp_path):
    out, rate, temp = run_script("benchmark_sampling", [
        "-c", str(ROOT / "configs/demo/digits_flow.yaml"), f"data.cache_path={demo_cache}", "sample.sampler=sde",
        "sample.steps=3", "sample.batch_size=4", "sample.cfg_interval=[0,0.5]", "--images", "4"], tmp_path)
    assert rate > 0
    assert "sampler sde x 3 steps" in out and "latent 1x16x16" in out
    assert not list(temp.iterdir()), "the random checkpoint was left behind"


def test_sampling_a_distilled_student_of_the_same_model(tmp_path):
    out, rate, temp = run_script("benchmark_sampling", [
        "-c", str(IMAGENET), "model.name=DiT-T/8", "sample.cfg_scale=1.5", "sample.batch_size=2", "--no-decode",
        "--distilled", "4", "--images", "2"], tmp_path)
    assert rate > 0
    assert "sampler distilled x 4 steps" in out and "(1 row per image per forward)" in out
    assert not list(temp.iterdir()), "the student checkpoint was left behind"
