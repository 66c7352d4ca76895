"""The contract every registered method keeps, checked with each toy backbone (DiT, LightningDiT): its spec is registered under its
name, it builds, one loss per objective is finite and trains, its state survives a round trip, its checkpoint
metadata is plain data, it samples with its own sampler and refuses another method's, and its config section
is checked only when it runs. Also: the method-agnostic code never tests a method's name."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from methods import registry, sampling
from models import create_model
from runtime.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
BASE_MARGS = {"name": "DiT-T/4", "input_size": 8, "in_channels": 1, "num_classes": 3, "learn_sigma": True,
              "class_dropout_prob": 0.1}
# A sampler call each method's checkpoints accept cheaply, and a value its config section refuses.
OWN_SAMPLER = {"diffusion": ("ddim", 2), "distill": ("distilled", 0), "ddgan": ("ddgan", 0), "cld": ("sscs", 2),
               "flow": ("ode", 2), "meanflow": ("meanflow", 1)}
BAD_SECTION = {"diffusion": ("diffusion.schedule=quadratic", "diffusion.schedule"),
               "distill": ("distill.start_steps=12", "power of two"), "ddgan": ("ddgan.num_steps=0", "ddgan.num_steps"),
               "cld": ("cld.mass=0", "cld.mass"), "flow": ("flow.path=cosine", "flow.path"),
               "meanflow": ("meanflow.ratio=2", "meanflow.ratio")}
NAMES = registry.names()
BACKBONES = ("DiT-T/4", "LightningDiT-T/4")


def toy_cfg():
    cfg = OmegaConf.structured(Config)
    cfg.ddgan.discriminator, cfg.ddgan.z_dim = "D-T/4", 8
    return cfg


def metadata_of(name, cfg):
    """What a checkpoint of the method records besides its weights."""
    spec = registry.spec(name)
    if spec.metadata is not None:
        return {"method": name, **spec.metadata(cfg)}
    return {"method": name, "distill": {"steps": 2, "parameterization": "v", "cfg_scale": 1.0, "cfg_range": None,
                                        "cfg_all_channels": False, "schedule": "linear", "num_steps": 1000}}


def test_the_tables_cover_every_registered_method():
    assert set(OWN_SAMPLER) == set(BAD_SECTION) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_each_spec_is_registered_under_its_name_with_its_section(name):
    spec = registry.spec(name)
    registration = next(r for r in registry.REGISTRATIONS if r.name == name)
    assert spec.name == name and spec.trainable == registration.trainable and spec.samplers
    if registration.section:
        assert registration.section in OmegaConf.structured(Config)
    for other in registry.specs():
        if other.name != name:
            assert not set(spec.samplers) & set(other.samplers), "a sampler name must say which method it is for"


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", [n for n in NAMES if registry.spec(n).trainable])
def test_a_trainable_method_builds_trains_and_round_trips_its_state(name, backbone):
    spec, cfg = registry.spec(name), toy_cfg()
    margs = spec.model_args(cfg, dict(BASE_MARGS, name=backbone))
    torch.manual_seed(0)
    model = create_model(**margs)
    method = spec.build(cfg, model, torch.device("cpu"))
    modules = method.modules()
    assert modules["model"] is model and spec.flops_per_image(cfg, margs) > 0
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    for objective in method.objectives():
        method.begin_step(0)
        loss, metrics = method.loss(objective.name, modules, x, y, torch.Generator().manual_seed(1))
        assert loss.ndim == 0 and torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
        loss.backward()
        trained = [p for n in objective.modules for p in modules[n].parameters() if p.requires_grad]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
        for module in modules.values():
            module.zero_grad(set_to_none=True)
    state = method.state_dict()
    restored = spec.build(cfg, create_model(**margs), torch.device("cpu"))
    restored.load_state_dict(state)
    assert repr(restored.state_dict()) == repr(state)
    meta = {"method": name, **spec.metadata(cfg)}
    buffer = __import__("io").BytesIO()
    torch.save(meta, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True) == meta  # plain data: loadable with weights_only


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_samples_with_its_own_sampler_and_refuses_the_others(name, backbone):
    spec, cfg = registry.spec(name), toy_cfg()
    base = dict(BASE_MARGS, name=backbone)
    margs = spec.model_args(cfg, base) if spec.model_args else dict(base, learn_sigma=False)
    model = create_model(**margs).eval()
    meta = metadata_of(name, cfg)
    sampler, steps = OWN_SAMPLER[name]
    settings = OmegaConf.create({"sampler": sampler, "steps": steps, "cfg_scale": 1.0, "eta": 0.0,
                                 "cfg_all_channels": None, "cfg_interval": None, "time_shift": 1.0})
    sample = sampling.generation_sampler(cfg, model, margs, meta, settings)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    noise = torch.stack([torch.randn(1, 8, 8, generator=g) for g in generators])
    with torch.no_grad():
        out = sample(noise, torch.tensor([0, 2]), generators, False)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    for other in registry.specs():
        if other.name == name:
            continue
        foreign = other.samplers[0]
        with pytest.raises(ValueError, match=rf"it samples with {re.escape(', '.join(spec.samplers))}.*not '{foreign}'"):
            sampling.generation_sampler(cfg, model, margs, meta, OmegaConf.merge(settings, {"sampler": foreign}))


@pytest.mark.parametrize("name", NAMES)
def test_a_methods_section_is_checked_only_when_the_method_runs(name, tmp_path):
    override, message = BAD_SECTION[name]
    cfg = load_config(ROOT / "configs/demo/digits.yaml", [override])  # another method runs: not checked
    with pytest.raises(ConfigError, match=message):
        registry.spec(name).check_config(cfg)


def test_a_bad_section_of_the_method_that_trains_is_a_config_error_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "-c", "configs/demo/digits.yaml", "-p", "train",
                           "model.method=ddgan", "ddgan.num_steps=0", f"experiment_dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "ddgan.num_steps=0" in proc.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="model.method='gan' is not one of diffusion, ddgan, cld, flow"):
        load_config(ROOT / "configs/demo/digits.yaml", ["model.method=gan"])


def test_the_method_agnostic_code_never_tests_a_methods_name():
    """phases/, runtime/ and main.py ask the spec; a comparison with a method's or a sampler's name would be a
    method leaking out of its module."""
    words = {name for spec in registry.specs() for name in (spec.name, *spec.samplers)}
    pattern = re.compile(r"(==|!=|\bin)\s*[\(\[]?\s*[\"'](" + "|".join(map(re.escape, words)) + r")[\"']")
    leaks = []
    for path in [ROOT / "main.py", *(ROOT / "phases").glob("*.py"), *(ROOT / "runtime").glob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                leaks.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not leaks, "\n".join(leaks)
