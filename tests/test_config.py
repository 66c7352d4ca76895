"""Config loading: inheritance down configs/, overrides, schema errors naming key and file."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runtime.config import ConfigError, config_chain, load_config, sampler_settings

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_chain_order_and_precedence(tmp_path):
    write(tmp_path / "configs/base.yaml", "seed: 1\ntrain:\n  lr: 0.5\n  max_steps: 7\n")
    write(tmp_path / "configs/a/base.yaml", "seed: 2\n")
    exp = write(tmp_path / "configs/a/b/exp.yaml", "train:\n  lr: 0.25\n")
    chain = config_chain(exp)
    assert chain == [tmp_path / "configs/base.yaml", tmp_path / "configs/a/base.yaml", exp]
    cfg = load_config(exp, ["train.max_steps=9"])
    assert cfg.seed == 2  # nearer base wins
    assert cfg.train.lr == 0.25  # the file wins over bases
    assert cfg.train.max_steps == 9  # the command line wins over everything
    assert cfg.train.batch_size == 256  # schema default


def test_unknown_key_names_key_and_file(tmp_path):
    exp = write(tmp_path / "configs/exp.yaml", "train:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(exp)
    assert "train.batch_sise" in str(err.value)
    assert str(exp) in str(err.value)


def test_error_in_base_names_the_base_file(tmp_path):
    base = write(tmp_path / "configs/base.yaml", "modle:\n  name: x\n")
    exp = write(tmp_path / "configs/exp.yaml", "seed: 1\n")
    with pytest.raises(ConfigError, match="modle") as err:
        load_config(exp)
    assert str(base) in str(err.value)


def test_wrong_type_and_bad_override(tmp_path):
    exp = write(tmp_path / "configs/exp.yaml", "seed: 1\n")
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(exp, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="a.b=value"):
        load_config(exp, ["train.lr"])
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(exp, ["train.precision=fp8"])


def test_inference_block_overrides_sampler_keys_only_for_inference(tmp_path):
    exp = write(tmp_path / "configs/exp.yaml", "sample:\n  cfg_scale: 4.0\n  steps: 100\ninference:\n  cfg_scale: 1.5\n")
    cfg = load_config(exp)
    assert sampler_settings(cfg, "sample").cfg_scale == 4.0
    assert sampler_settings(cfg, "inference").cfg_scale == 1.5
    assert sampler_settings(cfg, "inference").steps == 100  # not overridden: inherited from sample


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    if "imagenet_256" in str(path) and path.name != "base.yaml" and cfg.model.method == "ddgan":
        assert cfg.train.batch_size == 256 and cfg.train.lr == 1.6e-4 and cfg.ddgan.lr_d == 1.25e-4  # the release's
        assert list(cfg.train.betas) == [0.5, 0.9] and cfg.ddgan.num_steps == 4 and cfg.sample.sampler == "ddgan"
    elif path.name == "lightningdit_xl1_vavae.yaml":  # the release's 64-epoch recipe
        assert cfg.train.batch_size == 1024 and cfg.train.lr == 2e-4 and list(cfg.train.betas) == [0.9, 0.95]
        assert (cfg.flow.time_sampling, cfg.flow.cosine_loss, cfg.flow.convention) == ("logit_normal", 1.0, "sit")
        assert cfg.autoencoder.normalization == "channel" and not cfg.model.learn_sigma
        assert sampler_settings(cfg, "inference").steps == 249 and sampler_settings(cfg, "inference").cfg_scale == 10.0
    elif path.name == "sit_xl2_repa.yaml":  # REPA's recipe
        assert (cfg.train.batch_size, cfg.train.lr, cfg.train.max_grad_norm, cfg.train.weight_decay) == (256, 1e-4, 1.0, 0.0)
        assert cfg.repa.enabled and (cfg.repa.depth, cfg.repa.weight, cfg.repa.projector_dim) == (8, 0.5, 2048)
        assert cfg.repa.encoder == "vit_base_patch14_dinov2" and cfg.repa.resolution == 224
        assert cfg.model.class_dropout_prob == 0.1 and not cfg.model.learn_sigma and cfg.extract.store_images == "jpeg"
        assert list(sampler_settings(cfg, "inference").cfg_interval) == [0.0, 0.7]
    elif "imagenet_256" in str(path) and path.name != "base.yaml":
        assert cfg.train.batch_size == 256 and cfg.train.lr == 1e-4 and cfg.train.ema_decay == 0.9999
        assert cfg.model.class_dropout_prob == 0.1 and cfg.model.learn_sigma
        assert cfg.diffusion.schedule == "linear" and cfg.diffusion.num_steps == 1000
    if path.name.endswith("_speed_repa.yaml"):
        assert cfg.repa.enabled and cfg.repa.depth == 8 and cfg.model.method == "diffusion"
    if path.name.endswith(("_speed.yaml", "_speed_repa.yaml")):
        ts = cfg.diffusion.timesteps
        assert (ts.sampler, ts.weighting, ts.tau, ts.k, ts.lam) == ("speed", "speed", 700, 5.0, 0.6)


def test_cli_reports_misspelled_key(tmp_path):
    exp = write(tmp_path / "configs/exp.yaml", "trian:\n  lr: 1\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "-c", str(exp), "-p", "train"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    assert "trian" in proc.stderr and str(exp) in proc.stderr


def test_cli_help_lists_phases():
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0
    for phase in ("extract", "train", "sample", "inference", "evaluate"):
        assert phase in proc.stdout


def test_messages_say_whether_the_key_or_the_value_is_wrong(tmp_path):
    exp = write(tmp_path / "configs/exp.yaml", "seed: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'train.learning_rate'"):
        load_config(exp, ["train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match="invalid value for 'train.lr'"):
        load_config(exp, ["train.lr=fast"])


@pytest.mark.parametrize("override, message", [
    ("train.ema_decay=1.5", "train.ema_decay=1.5: it must be in [0, 1]"),
    ("train.ema_decay=-0.1", "train.ema_decay=-0.1: it must be in [0, 1]"),
    ("train.keep_last=-1", "train.keep_last=-1: it must be >= 0"),
    ("train.max_grad_norm=-1.0", "train.max_grad_norm=-1.0: it must be >= 0"),
    ("sample.cfg_scale=-2.0", "sample.cfg_scale=-2.0: it must be >= 0"),
    ("inference.cfg_scale=-1.0", "inference.cfg_scale=-1.0: it must be >= 0"),
    ("sample.batch_size=0", "sample.batch_size=0: it must be at least 1"),
    ("inference.batch_size=0", "inference.batch_size=0: it must be at least 1"),
    ("inference.num_samples=0", "inference.num_samples=0: it must be at least 1"),
    ("train.batch_size=0", "train.batch_size=0: it must be at least 1"),
    ("train.lr=0.0", "train.lr=0.0: the learning rate must be a finite number > 0"),
    ("train.lr=-1e-4", "the learning rate must be a finite number > 0"),
    ("train.lr=nan", "the learning rate must be a finite number > 0"),
    ("model.class_dropout_prob=1.5", "model.class_dropout_prob=1.5: it must be in [0, 1]"),
    ("sample.cfg_interval=[0.6,0.2]", "sample.cfg_interval=[0.6, 0.2]: it must be [lo, hi] with 0 <= lo <= hi <= 1"),
    ("inference.cfg_interval=[0.0,1.5]", "inference.cfg_interval=[0.0, 1.5]: it must be [lo, hi]"),
    ("sample.cfg_interval=[0.5]", "sample.cfg_interval=[0.5]: it must be [lo, hi]"),
    ("sample.time_shift=0", "sample.time_shift=0.0: the time shift must be a finite number > 0"),
    ("inference.time_shift=-3", "inference.time_shift=-3.0: the time shift must be a finite number > 0"),
])
def test_values_out_of_range_are_config_errors(tmp_path, override, message):
    exp = write(tmp_path / "configs/exp.yaml", "seed: 1\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(exp, [override])


def test_config_values_exit_2_and_files_exit_1(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "main.py", "-c", "configs/demo/digits.yaml", *args],
                                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    bad_value = run("-p", "train", "train.ema_decay=2")
    assert bad_value.returncode == 2 and "train.ema_decay=2" in bad_value.stderr
    missing_file = run("-p", "train", f"data.cache_path={tmp_path / 'none.h5'}")
    assert missing_file.returncode == 1 and "not found" in missing_file.stderr


def test_imagenet_defaults_are_faithful_to_the_protocols():
    cfg = load_config(ROOT / "configs/imagenet_256/dit_xl2.yaml")
    assert cfg.extract.precision == "fp32"  # the permanent cache is encoded exactly
    assert sampler_settings(cfg, "inference").precision == "fp32"  # DiT's FID protocol (TF32 matmuls)
    assert sampler_settings(cfg, "inference").cfg_scale == 1.5 and sampler_settings(cfg, "sample").cfg_scale == 4.0
    assert cfg.evaluate.adm_distances is False and cfg.diffusion.rescale_vb is False


def test_print_config_prints_the_resolved_config_and_touches_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "-c", "configs/demo/digits_distill.yaml", "-p", "train",
                           f"experiment_dir={tmp_path / 'run'}", "train.lr=0.5", "--print-config"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert printed.train.lr == 0.5 and printed.sample.cfg_scale == printed.distill.cfg_scale == 2.0  # resolved
    assert printed.experiment_dir == str(tmp_path / "run") and not (tmp_path / "run").exists()


def test_help_and_print_config_do_not_import_torch():
    probe = ("import runpy, sys\nsys.argv = ['main.py'] + sys.argv[1:]\n"
             "try:\n    runpy.run_path('main.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch imported:', 'torch' in sys.modules)")
    for args in (["--help"], ["-c", "configs/demo/digits.yaml", "-p", "train", "--print-config"]):
        proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.stdout.strip().endswith("torch imported: False"), proc.stdout + proc.stderr


def test_encoder_kwargs_written_without_spaces_are_refused():
    """YAML reads {depth:1} as one key "depth:1" with no value: silently ignored sizes would misbuild the encoder."""
    with pytest.raises(ConfigError, match="space after each colon"):
        load_config(ROOT / "configs/demo/digits_repa.yaml", ["repa.encoder_kwargs={patch_size:4,depth:4}"])
    cfg = load_config(ROOT / "configs/demo/digits_repa.yaml", ["repa.encoder_kwargs={patch_size: 4, depth: 2}"])
    assert dict(cfg.repa.encoder_kwargs) == {"patch_size": 4, "depth": 2}
