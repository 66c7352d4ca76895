"""The evaluate phase end to end with a small stand-in feature network (the real Inception is tested separately)."""
import json
import sys
import types

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from metrics.features import FeatureExtractor, Features
from metrics.frechet import feature_statistics, frechet_distance
from metrics.inception_score import class_probabilities, inception_score
from metrics.precision_recall import precision_recall
from phases import evaluate, scoring
from runtime import distributed as dist
from runtime.config import Config


class TinyConvNet(FeatureExtractor):
    """Random conv net: pool [B, 8], logits [B, 5], spatial [B, 12]; counts the images it sees."""

    id = "tiny-conv-net"

    def __init__(self):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 5)
        self.images_seen = 0

    def __call__(self, images):
        self.images_seen += images.shape[0]
        with torch.no_grad():
            hidden = torch.relu(self.conv(images.float() / 127.5 - 1))
            pool = hidden.mean(dim=(2, 3))
            spatial = torch.nn.functional.adaptive_avg_pool2d(hidden[:, :3], 2).flatten(1)
            return Features(pool=pool, logits=3 * self.fc(pool), spatial=spatial)


def _images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(128 + shift, 60, size=(n, 12, 12, 3)), 0, 255).astype(np.uint8)


@pytest.fixture
def setup(tmp_path):
    samples, reference = _images(40, 0, shift=20), _images(30, 1)
    np.savez(tmp_path / "samples.npz", samples, np.arange(40) % 5)
    np.savez(tmp_path / "reference.npz", reference)
    cfg = OmegaConf.structured(Config)
    cfg.experiment_dir = str(tmp_path / "run")
    cfg.evaluate.samples = str(tmp_path / "samples.npz")
    cfg.evaluate.reference = str(tmp_path / "reference.npz")
    cfg.evaluate.batch_size = 16
    return cfg, samples, reference


def _expected(samples, reference):
    """Independent pass: all images through the net at once, then the metric functions."""
    net = TinyConvNet()
    s = net(torch.from_numpy(samples).permute(0, 3, 1, 2))
    r = net(torch.from_numpy(reference).permute(0, 3, 1, 2))
    fid = frechet_distance(*feature_statistics(r.pool.numpy()), *feature_statistics(s.pool.numpy()))
    sfid = frechet_distance(*feature_statistics(r.spatial.numpy()), *feature_statistics(s.spatial.numpy()))
    is_mean, is_std = inception_score(class_probabilities(s.logits.numpy()))
    precision, recall = precision_recall(r.pool.numpy(), s.pool.numpy())
    return dict(fid=fid, sfid=sfid, precision=precision, recall=recall, **{"is": is_mean, "is_std": is_std})


def test_run_writes_json_and_prints_it_last(setup, tmp_path, capsys):
    cfg, samples, reference = setup
    results = evaluate.run(cfg, feature_extractor=TinyConvNet())
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == results
    assert any("FID" in line for line in lines[:-1])  # the human-readable table comes first
    written = json.loads((tmp_path / "run" / "eval" / "samples.json").read_text())
    assert written == results
    assert results["num_samples"] == 40 and results["num_reference_images"] == 30
    assert results["samples"] == cfg.evaluate.samples and results["reference"] == cfg.evaluate.reference
    for key, value in _expected(samples, reference).items():
        assert results[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert results["fid"] > 0 and 1.0 < results["is"] <= 5.0 and 0 <= results["precision"] <= 1


def test_reference_statistics_are_cached_between_runs(setup):
    cfg, _, _ = setup
    first = TinyConvNet()
    evaluate.run(cfg, feature_extractor=first)
    assert first.images_seen == 70
    assert len(list((scoring.reference_cache_dir(cfg)).glob("reference-*.npz"))) == 1
    second = TinyConvNet()
    cfg.evaluate.output = str(scoring.reference_cache_dir(cfg).parent / "again.json")
    results = evaluate.run(cfg, feature_extractor=second)
    assert second.images_seen == 40  # only the samples
    assert results["precision"] is not None


def test_default_paths(tmp_path):
    cfg = OmegaConf.structured(Config)
    cfg.experiment_dir = str(tmp_path)
    assert evaluate.samples_path(cfg) == tmp_path / "inference" / "samples.npz"
    cfg.inference.output = str(tmp_path / "elsewhere" / "gen.npz")
    samples = evaluate.samples_path(cfg)
    assert samples == tmp_path / "elsewhere" / "gen.npz"
    assert scoring.results_path(cfg, samples) == tmp_path / "eval" / "gen.json"


def test_reference_with_statistics_only_has_no_precision_recall(setup, tmp_path, capsys):
    cfg, samples, reference = setup
    mu, sigma = feature_statistics(TinyConvNet()(torch.from_numpy(reference).permute(0, 3, 1, 2)).pool.numpy())
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    cfg.evaluate.reference = str(tmp_path / "stats.npz")
    results = evaluate.run(cfg, feature_extractor=TinyConvNet())
    assert results["precision"] is None and results["recall"] is None and results["sfid"] is None
    assert results["fid"] == pytest.approx(_expected(samples, reference)["fid"], rel=1e-4)
    assert "n/a" in capsys.readouterr().out


def test_missing_inputs_raise_clear_errors(setup, tmp_path):
    cfg, _, _ = setup
    cfg.evaluate.reference = None
    with pytest.raises(ValueError, match="evaluate.reference is not set"):
        evaluate.run(cfg, feature_extractor=TinyConvNet())
    cfg.evaluate.reference = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="evaluate.reference"):
        evaluate.run(cfg, feature_extractor=TinyConvNet())
    cfg.evaluate.reference = str(tmp_path / "reference.npz")
    cfg.evaluate.samples = str(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        evaluate.run(cfg, feature_extractor=TinyConvNet())
    np.savez(tmp_path / "stats_only.npz", mu=np.zeros(8), sigma=np.eye(8))
    cfg.evaluate.samples = str(tmp_path / "stats_only.npz")
    with pytest.raises(ValueError, match="no arr_0 images"):
        evaluate.run(cfg, feature_extractor=TinyConvNet())


def test_a_reference_in_another_format_is_named_before_the_feature_network_loads(setup, tmp_path, monkeypatch):
    from phases import scoring

    def never(*args, **kwargs):
        raise AssertionError("the feature network was loaded before the reference was checked")

    monkeypatch.setattr(scoring, "feature_network", never)
    cfg, _, _ = setup
    (tmp_path / "reference.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="reference.npz is not an .npz \\(zip\\) archive"):
        evaluate.run(cfg)
    with pytest.raises(ValueError, match="reference.npz is not an .npz"):
        scoring.load_evaluator(cfg)


def test_other_ranks_do_nothing(setup, monkeypatch, tmp_path):
    cfg, _, _ = setup
    monkeypatch.setattr(dist, "is_main", lambda: False)
    net = TinyConvNet()
    assert evaluate.run(cfg, feature_extractor=net) == {}
    assert net.images_seen == 0 and not (tmp_path / "run").exists()


def test_results_are_logged_to_wandb_when_enabled(setup, monkeypatch, capsys):
    cfg, _, _ = setup
    calls = {}

    class FakeRun:
        def log(self, metrics, step=None):
            calls["log"] = metrics

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg.wandb.mode = "offline"
    cfg.wandb.project = "dit-eval"
    results = evaluate.run(cfg, feature_extractor=TinyConvNet())
    assert calls["init"]["project"] == "dit-eval" and calls["init"]["mode"] == "offline"
    assert calls["log"]["fid"] == results["fid"] and calls["finished"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == results
