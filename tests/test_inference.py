"""Inference: the .npz is the same whatever the batch size and process count, and resumes."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import phases.generation
from phases import inference
from phases.npz_generation import sample_labels
from runtime.config import load_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo/digits.yaml"


@pytest.fixture(scope="module")
def run_dir(digits_cache, tmp_path_factory):
    """A tiny trained demo run (3 training steps) to sample from."""
    base = tmp_path_factory.mktemp("inference")
    (base / "digits.h5").symlink_to(digits_cache)
    proc = subprocess.run([sys.executable, "main.py", "-c", str(CONFIG), "-p", "train", f"experiment_dir={base / 'run'}",
                           f"data.cache_path={base / 'digits.h5'}", "train.max_steps=3", "train.batch_size=8",
                           "train.progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return base


def config(run_dir, out, *extra):
    return load_config(CONFIG, [f"experiment_dir={run_dir / 'run'}", f"data.cache_path={run_dir / 'digits.h5'}",
                                f"inference.output={out}", "inference.num_samples=7", "sample.steps=4",
                                "sample.sampler=ddpm", *extra])


def read(path):
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


def test_batch_size_and_processes_do_not_change_the_images(run_dir, tmp_path):
    a_path = inference.run(config(run_dir, tmp_path / "a.npz", "inference.batch_size=4"))
    b_path = inference.run(config(run_dir, tmp_path / "b.npz", "inference.batch_size=3"))
    a, labels_a = read(a_path)
    b, labels_b = read(b_path)
    assert a.shape == (7, 16, 16, 1) and a.dtype == np.uint8
    assert np.array_equal(labels_a, labels_b) and np.array_equal(a, b)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main.py",
         "-c", str(CONFIG), "-p", "inference", f"experiment_dir={run_dir / 'run'}", f"data.cache_path={run_dir / 'digits.h5'}",
         f"inference.output={tmp_path / 'c.npz'}", "inference.num_samples=7", "sample.steps=4", "sample.sampler=ddpm",
         "inference.batch_size=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / "c.npz")
    c, labels_c = read(tmp_path / "c.npz")
    assert np.array_equal(labels_a, labels_c) and np.array_equal(a, c)


def test_interrupted_inference_resumes_without_redoing_work(run_dir, tmp_path, monkeypatch):
    reference, _ = read(inference.run(config(run_dir, tmp_path / "ref.npz", "inference.batch_size=2")))
    real = phases.generation.Generator.images
    calls = []

    def flaky(self, labels, seeds, progress=False):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(list(seeds))
        return real(self, labels, seeds, progress)

    monkeypatch.setattr(phases.generation.Generator, "images", flaky)
    out = tmp_path / "resumed.npz"
    with pytest.raises(KeyboardInterrupt):
        inference.run(config(run_dir, out, "inference.batch_size=2"))
    assert not out.exists() and len(list((tmp_path / "resumed.npz.parts").glob("*.part.npz"))) == 2
    monkeypatch.setattr(phases.generation.Generator, "images", real)
    generated = []
    monkeypatch.setattr(phases.generation.Generator, "images",
                        lambda self, labels, seeds, progress=False: generated.extend(seeds) or real(self, labels, seeds))
    inference.run(config(run_dir, out, "inference.batch_size=3"))  # a different batch size on resume
    assert sorted(generated) == [4, 5, 6]  # seeds seed+i of the 3 missing images only
    resumed, _ = read(out)
    assert np.array_equal(resumed, reference)
    assert not (tmp_path / "resumed.npz.parts").exists()


def test_parts_from_other_settings_are_not_mixed(run_dir, tmp_path, monkeypatch):
    real = phases.generation.Generator.images

    def stop(self, labels, seeds, progress=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(phases.generation.Generator, "images", stop)
    with pytest.raises(KeyboardInterrupt):
        inference.run(config(run_dir, tmp_path / "x.npz"))
    monkeypatch.setattr(phases.generation.Generator, "images", real)
    with pytest.raises(ValueError, match="other settings"):
        inference.run(config(run_dir, tmp_path / "x.npz", "sample.cfg_scale=3.0"))


def test_labels_are_seeded_and_class_balanced_on_request():
    a = sample_labels(1000, 10, seed=3, class_balanced=False)
    assert torch.equal(a, sample_labels(1000, 10, seed=3, class_balanced=False))
    assert not torch.equal(a, sample_labels(1000, 10, seed=4, class_balanced=False))
    balanced = sample_labels(1000, 10, seed=3, class_balanced=True)
    assert torch.bincount(balanced).tolist() == [100] * 10


def test_inference_then_evaluate(run_dir, tmp_path, monkeypatch, capsys):
    """inference.evaluate=true: the feature network is loaded before sampling and the metrics JSON is printed last."""
    import json

    from phases import scoring
    from test_evaluate import TinyConvNet

    reference = inference.run(config(run_dir, tmp_path / "reference.npz", "seed=100"))
    net = TinyConvNet()
    monkeypatch.setattr(scoring, "feature_network", lambda cfg, device: net)
    capsys.readouterr()
    inference.run(config(run_dir, tmp_path / "s.npz", "inference.evaluate=true", f"evaluate.reference={reference}",
                         f"evaluate.output={tmp_path / 'metrics.json'}"))
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["num_samples"] == 7 and last["fid"] >= 0
    assert json.loads((tmp_path / "metrics.json").read_text())["fid"] == last["fid"]
    assert net.images_seen == 14  # the samples and the reference images


def test_missing_reference_fails_before_sampling(run_dir, tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("sampling started before the evaluation inputs were checked")

    monkeypatch.setattr(phases.generation.Generator, "images", never)
    with pytest.raises(FileNotFoundError, match="evaluate.reference"):
        inference.run(config(run_dir, tmp_path / "s.npz", "inference.evaluate=true",
                             f"evaluate.reference={tmp_path / 'absent.npz'}"))
