"""Representation alignment (REPA) in parts: the loss, the projector and where its gradients go, the frozen
encoder's preprocessing and weight loading, the method wrapper, and the checks made before any work."""

import pytest
import timm
import torch
import torch.nn.functional as F

from methods.alignment import AlignedMethod, alignment_loss, default_depth
from methods.flow import build as build_flow
from models import create_model
from models.encoders import build_encoder, encoder_input, input_size, resample_tokens
from models.projector import Aligned

TINY_VIT = {"patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2}  # 16 px -> 4 x 4 tokens of 24 channels


def tiny_vit_file(path, seed=0, **sizes):
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, num_classes=10,
                            **{**TINY_VIT, **sizes})
    torch.save(vit.state_dict(), path)
    return vit


def aligned_model(depth=2, seed=0, name="DiT-T/4"):
    torch.manual_seed(seed)
    backbone = create_model(name, input_size=16, in_channels=1, num_classes=10, learn_sigma=False)
    return backbone, Aligned(backbone, depth=depth, projector_dim=32, feature_dim=24)


def test_the_alignment_loss_is_minus_the_mean_token_cosine():
    a = torch.randn(3, 5, 8)
    assert torch.allclose(alignment_loss(a, 2.5 * a), torch.full((3,), -1.0), atol=1e-6)  # scale does not matter
    assert torch.allclose(alignment_loss(a, -a), torch.full((3,), 1.0), atol=1e-6)
    b = torch.randn(3, 5, 8)
    by_hand = -torch.stack([torch.stack([F.cosine_similarity(a[i, n], b[i, n], dim=0) for n in range(5)]).mean()
                            for i in range(3)])
    assert torch.allclose(alignment_loss(a, b), by_hand, atol=1e-6)
    assert alignment_loss(a.half(), b.half()).dtype == torch.float32  # the cosine in float32 (fp16 NaNs in REPA)


def test_default_depths_are_repas():
    assert [default_depth(n) for n in (28, 24, 12, 6)] == [8, 8, 4, 2]


@pytest.mark.parametrize("name", ["DiT-T/4", "LightningDiT-T/4"])
def test_the_projector_sits_beside_the_backbone_under_repas_key_names(name):
    backbone, model = aligned_model(name=name)
    x, t, y = torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 7])
    out, projected = model(x, t, y, project=True)
    assert projected.shape == (2, 16, 24)  # 4 x 4 tokens -> the encoder's width
    assert torch.equal(out, backbone(x, t, y)) and torch.equal(model(x, t, y), out)
    keys = set(model.state_dict())
    assert {k for k in keys if not k.startswith("projectors.")} == set(backbone.state_dict())
    assert {k for k in keys if k.startswith("projectors.")} == {
        f"projectors.0.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    assert model.state_dict()["projectors.0.0.weight"].shape == (32, 128)
    assert model.state_dict()["projectors.0.4.weight"].shape == (24, 32)


def test_the_alignment_term_trains_the_blocks_up_to_its_depth_only():
    _, model = aligned_model(depth=2)
    _, projected = model(torch.randn(2, 1, 16, 16), torch.rand(2), torch.tensor([1, 7]), project=True)
    alignment_loss(projected, torch.randn(2, 16, 24)).mean().backward()
    reached = lambda module: any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert reached(model.blocks[0]) and reached(model.blocks[1]) and reached(model.projectors)
    assert not any(reached(block) for block in model.blocks[2:]) and not reached(model.final_layer)


def test_a_depth_beyond_the_blocks_is_refused():
    with pytest.raises(ValueError, match=r"repa.depth=7 must be in 1..6"):
        aligned_model(depth=7)


def test_the_encoder_input_follows_repas_preprocessing():
    images = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)  # one grey 2 x 2 image
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.25, 0.5, 1.0])
    x = encoder_input(images, mean, std, 2)
    assert x.shape == (1, 3, 2, 2)
    for c in range(3):  # the grey channel repeated, [0, 1], then (x - mean) / std
        expected = torch.tensor([[0.0, 1.0], [0.2, 0.4]])
        assert torch.allclose(x[0, c], (expected - mean[c]) / std[c], atol=1e-6)
    flat = encoder_input(torch.full((1, 3, 16, 16), 128, dtype=torch.uint8), mean, std, 14)
    assert flat.shape == (1, 3, 14, 14)  # bicubic to the encoder's side; a flat image stays flat
    assert torch.allclose(flat, ((128 / 255 - mean) / std).view(1, 3, 1, 1).expand(1, 3, 14, 14), atol=1e-5)
    assert [input_size(224, s) for s in (256, 512, 16)] == [224, 448, 14]  # REPA's 224 x size / 256


def test_tokens_resample_to_the_models_grid():
    tokens = torch.randn(2, 16, 5)
    assert torch.equal(resample_tokens(tokens, 4), tokens)
    flat = torch.ones(2, 256, 5) * torch.arange(5.0)
    assert torch.allclose(resample_tokens(flat, 8), torch.ones(2, 64, 5) * torch.arange(5.0))
    with pytest.raises(ValueError, match="not a square grid"):
        resample_tokens(torch.randn(1, 15, 5), 4)


def test_the_encoder_loads_its_local_weights_and_gives_the_vits_patch_tokens(tmp_path):
    vit = tiny_vit_file(tmp_path / "vit.pth").eval()
    encoder = build_encoder("vit_tiny_patch16_224", str(tmp_path / "vit.pth"), 256, 16, 4, TINY_VIT)
    assert encoder.dim == 24 and not any(p.requires_grad for p in encoder.parameters())
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    mean, std = torch.tensor(vit.pretrained_cfg["mean"]), torch.tensor(vit.pretrained_cfg["std"])
    with torch.no_grad():
        by_hand = vit.forward_features(encoder_input(images, mean, std, 16))[:, 1:]  # the class token dropped
    assert torch.allclose(encoder(images), by_hand, atol=1e-5)
    encoder.train()
    assert not encoder.training  # frozen: always eval
    half = build_encoder("vit_tiny_patch16_224", str(tmp_path / "vit.pth"), 128, 16, 2, TINY_VIT)
    assert half(images).shape == (3, 4, 24)  # an 8 px input (2 x 2 tokens) for a model with 2 x 2 tokens


def test_missing_or_mismatched_encoder_weights_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="repa.encoder_weights is not set"):
        build_encoder("vit_tiny_patch16_224", None, 256, 16, 4, TINY_VIT)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build_encoder("vit_tiny_patch16_224", str(tmp_path / "absent.pth"), 256, 16, 4, TINY_VIT)
    tiny_vit_file(tmp_path / "deeper.pth", depth=2)
    with pytest.raises(ValueError, match="does not fit vit_tiny_patch16_224"):
        build_encoder("vit_tiny_patch16_224", str(tmp_path / "deeper.pth"), 256, 16, 4, TINY_VIT)
    with pytest.raises(ValueError, match="not a timm model name"):
        build_encoder("no_such_vit", str(tmp_path / "deeper.pth"), 256, 16, 4, TINY_VIT)


class FixedEncoder(torch.nn.Module):
    """Stands in for the frozen encoder: tokens from the pixels, so the target is known."""

    dim = 24

    def forward(self, images):
        return images.float().flatten(1)[:, :16, None].expand(-1, -1, 24) / 255 + torch.arange(24.0)


def test_the_aligned_method_adds_the_weighted_term_to_the_methods_loss(tmp_path):
    from runtime.config import load_config

    cfg = load_config("configs/demo/digits_flow.yaml", [f"experiment_dir={tmp_path}"])
    backbone, model = aligned_model()
    model.eval()  # no random label dropout: the calls below must see the same inputs
    inner = build_flow(cfg, model, torch.device("cpu"))
    method = AlignedMethod(inner, FixedEncoder(), weight=0.5, buckets=4)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    torch.manual_seed(9)  # the method's noise comes from torch's global generator
    loss, metrics = method.loss("model", {"model": model}, x, y, torch.Generator().manual_seed(3), images)
    torch.manual_seed(9)
    plain, _ = build_flow(cfg, backbone, torch.device("cpu")).loss("model", {"model": backbone}, x, y, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(9)
    inner.loss("model", {"model": _Recorder(model)}, x, y, generator)
    _, projected = model(*_Recorder.last, project=True)
    expected = alignment_loss(projected, FixedEncoder()(images)).mean()
    assert torch.allclose(metrics["proj_loss"], expected, atol=1e-6)
    assert torch.allclose(loss, plain + 0.5 * expected, atol=1e-6) and torch.allclose(metrics["loss"], loss)
    logged = method.log_metrics()
    assert any(key.startswith("proj_t") for key in logged)
    with pytest.raises(ValueError, match="needs the images of the batch"):
        method.loss("model", {"model": model}, x, y, torch.Generator().manual_seed(3))
    assert method.path is inner.path  # the method's own helpers are reachable through the wrapper


class _Recorder:
    """The network as the method calls it, keeping the inputs of the last call."""

    last = None

    def __init__(self, net):
        self.net = net

    def __call__(self, x, t, y, **inputs):
        _Recorder.last = (x, t, y)
        return self.net(x, t, y, **inputs)



def test_repa_settings_are_checked_before_any_work(tmp_path):
    from methods import registry
    from methods.alignment import prepare
    from runtime.config import ConfigError, load_config

    tiny_vit_file(tmp_path / "vit.pth")
    cfg = load_config("configs/demo/digits_repa.yaml", [f"experiment_dir={tmp_path}", f"repa.encoder_weights={tmp_path / 'vit.pth'}",
                                                        f"repa.encoder_kwargs={TINY_VIT}".replace("'", "")])
    margs = {"name": "DiT-T/4", "input_size": 16, "in_channels": 1, "num_classes": 10}
    cache = {"image_format": "png", "image_size": 16}
    with pytest.raises(ConfigError, match="not model.method=ddgan"):
        prepare(cfg, registry.spec("ddgan"), margs, cache, "cpu")
    with pytest.raises(ValueError, match="holds none: add them with .*extract.store_images=jpeg"):
        prepare(cfg, registry.spec("flow"), margs, {**cache, "image_format": None}, "cpu")
    cfg.repa.depth = 7
    with pytest.raises(ConfigError, match="repa.depth=7 is beyond DiT-T/4's 6 blocks"):
        prepare(cfg, registry.spec("flow"), margs, cache, "cpu")
    cfg.repa.depth = None
    aligned, encoder = prepare(cfg, registry.spec("flow"), margs, cache, "cpu")
    assert aligned["alignment"] == {"depth": 2, "projector_dim": 256, "feature_dim": 24} and encoder.grid == 4


def test_an_original_dinov2_release_file_loads_with_its_position_table_resampled(tmp_path):
    """DINOv2's own checkpoint layout (dinov2_vitb14_pretrain.pth: a mask token, the 37 x 37 table of 518 px) as a
    tiny ViT-B/14-shaped model: timm's filter converts it, the table is resampled to REPA's 224 px (16 x 16)."""
    sizes = {"depth": 1, "embed_dim": 24, "num_heads": 2}
    torch.manual_seed(0)
    original = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, **sizes)  # 518 px
    state = {**original.state_dict(), "mask_token": torch.zeros(1, 24)}
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 24)
    torch.save(state, tmp_path / "dinov2_tiny_pretrain.pth")
    encoder = build_encoder("vit_base_patch14_dinov2", str(tmp_path / "dinov2_tiny_pretrain.pth"), 224, 256, 16, sizes)
    assert encoder.vit.pos_embed.shape == (1, 1 + 16 * 16, 24) and encoder.vit.num_prefix_tokens == 1
    assert torch.equal(encoder.vit.blocks[0].attn.qkv.weight, original.blocks[0].attn.qkv.weight)
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    assert encoder(images).shape == (1, 256, 24)


@pytest.mark.parametrize("name, prefix, mean", [
    ("vit_base_patch16_clip_224", 1, (0.48145466, 0.4578275, 0.40821073)),  # CLIP's own constants
    ("vit_base_patch14_reg4_dinov2", 5, (0.485, 0.456, 0.406)),  # DINOv2 with registers: 4 more prefix tokens
    ("vit_base_patch16_224.mae", 1, (0.485, 0.456, 0.406)),
])
def test_other_timm_vits_work_by_name_with_their_own_preprocessing(tmp_path, name, prefix, mean):
    sizes = {"depth": 1, "embed_dim": 24, "num_heads": 2}
    patch = 14 if "patch14" in name else 16
    vit = timm.create_model(name, pretrained=False, num_classes=0, img_size=4 * patch, **sizes)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    encoder = build_encoder(name, str(tmp_path / "vit.pth"), 4 * patch, 256, 4, sizes)
    assert torch.allclose(encoder.mean.flatten(), torch.tensor(mean)) and encoder.vit.num_prefix_tokens == prefix
    assert encoder(torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)).shape == (2, 16, 24)


def test_the_demo_encoder_script_writes_a_file_the_demo_config_loads(tmp_path):
    import importlib.util

    from runtime.config import load_config

    spec = importlib.util.spec_from_file_location("train_digits_encoder", "scripts/train_digits_encoder.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "digits_vit.pth"
    assert script.main(["--out", str(out), "--steps", "3", "--batch-size", "8"]) == 0 and out.is_file()
    r = load_config("configs/demo/digits_repa.yaml", [f"repa.encoder_weights={out}"]).repa
    encoder = build_encoder(r.encoder, r.encoder_weights, r.resolution, 16, 4, dict(r.encoder_kwargs))
    assert encoder(torch.zeros(2, 1, 16, 16, dtype=torch.uint8)).shape == (2, 16, 192)
    assert script.main(["--out", str(out)]) == 0  # an existing file is kept, not trained again
