"""LightningDiT blocks: RMSNorm and SwiGLU against their formulas, the rotary embedding's relative-position
property, the release's key layout loading strictly, the switches, the wrappers of the methods' inputs, the
feature hook, and clear errors for a checkpoint of the other family or another token grid."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import LIGHTNINGDIT_MODELS, MODELS, create_model, resolve_switches
from models.lightningdit import AxialRotaryEmbedding, SwiGLU, axial_rope_tables, norm_layer, rotate_half, swiglu_hidden
from models.pretrained import load_pretrained

TINY = dict(input_size=16, in_channels=1, num_classes=10)


def test_rmsnorm_and_swiglu_follow_their_formulas():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    norm = norm_layer(16, rmsnorm=True)
    torch.nn.init.normal_(norm.weight)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    ffn = SwiGLU(16, swiglu_hidden(16))
    assert ffn.w12.out_features == 2 * int(2 / 3 * 64) and ffn.w3.in_features == int(2 / 3 * 64)
    h = ffn.w3.in_features
    w1, w2 = ffn.w12.weight[:h], ffn.w12.weight[h:]
    b1, b2 = ffn.w12.bias[:h], ffn.w12.bias[h:]
    expected = (F.silu(x @ w1.T + b1) * (x @ w2.T + b2)) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), expected)


def test_rotary_embedding_makes_attention_depend_on_relative_positions_only():
    grid, head_dim = 6, 16
    rope = AxialRotaryEmbedding(head_dim, grid)
    torch.manual_seed(1)
    q, k = torch.randn(head_dim), torch.randn(head_dim)
    rotated_q = rope(q.expand(1, 1, grid * grid, head_dim))[0, 0]  # q placed at every position
    rotated_k = rope(k.expand(1, 1, grid * grid, head_dim))[0, 0]
    index = lambda row, col: row * grid + col
    dot = lambda a, b: float(rotated_q[index(*a)] @ rotated_k[index(*b)])
    for (r1, c1), (r2, c2) in [((0, 0), (2, 3)), ((1, 4), (0, 1)), ((3, 3), (3, 3))]:
        for dr, dc in [(1, 0), (0, 2), (2, 1)]:
            if max(r1, r2) + dr < grid and max(c1, c2) + dc < grid:
                assert dot((r1 + dr, c1 + dc), (r2 + dr, c2 + dc)) == pytest.approx(dot((r1, c1), (r2, c2)), abs=1e-4)
    assert dot((0, 0), (0, 1)) != pytest.approx(dot((0, 0), (1, 0)), abs=1e-3)  # rows and columns turn separately
    torch.testing.assert_close(rotated_q[0], q)  # position (0, 0): the identity
    assert torch.allclose(rotated_q.norm(dim=-1), q.norm().expand(grid * grid))  # a rotation keeps the norm
    cos, sin = axial_rope_tables(head_dim, grid)
    assert cos.shape == (grid * grid, head_dim)
    # pairs (2i, 2i+1) turn by one angle: cos is repeated pairwise, and rotate_half is a quarter turn
    assert torch.equal(cos[:, 0::2], cos[:, 1::2]) and torch.equal(rotate_half(rotate_half(q)), -q)
    # the first half of the width turns with the row, the second with the column
    assert torch.equal(cos[index(2, 0), : head_dim // 2], cos[index(2, 5), : head_dim // 2])
    assert torch.equal(cos[index(0, 3), head_dim // 2:], cos[index(4, 3), head_dim // 2:])


def release_state_dict(depth=6, width=128, heads=4, patch=4, channels=1, classes=10, size=16, seed=0):
    """A LightningDiT state dict written out from the release's naming (its lightningdit.py, swiglu_ffn.py and
    pos_embed.py with rmsnorm, swiglu and rope on, qk_norm off, the shift on), random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.02 * torch.randn(*shape, generator=g)
    tokens, hidden = (size // patch) ** 2, int(2 / 3 * 4 * width)
    cos, sin = axial_rope_tables(width // heads, size // patch)
    state = {"x_embedder.proj.weight": r(width, channels, patch, patch), "x_embedder.proj.bias": r(width),
             "t_embedder.mlp.0.weight": r(width, 256), "t_embedder.mlp.0.bias": r(width),
             "t_embedder.mlp.2.weight": r(width, width), "t_embedder.mlp.2.bias": r(width),
             "y_embedder.embedding_table.weight": r(classes + 1, width), "pos_embed": r(1, tokens, width),
             "feat_rope.freqs_cos": cos, "feat_rope.freqs_sin": sin,
             "final_layer.norm_final.weight": 1 + r(width), "final_layer.linear.weight": r(patch * patch * channels, width),
             "final_layer.linear.bias": r(patch * patch * channels),
             "final_layer.adaLN_modulation.1.weight": r(2 * width, width), "final_layer.adaLN_modulation.1.bias": r(2 * width)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(width), b + "norm2.weight": 1 + r(width),
                      b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
                      b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
                      b + "mlp.w12.weight": r(2 * hidden, width), b + "mlp.w12.bias": r(2 * hidden),
                      b + "mlp.w3.weight": r(width, hidden), b + "mlp.w3.bias": r(width),
                      b + "adaLN_modulation.1.weight": r(6 * width, width), b + "adaLN_modulation.1.bias": r(6 * width)})
    return state


def test_the_releases_key_layout_loads_strictly_and_the_model_is_deterministic(tmp_path):
    model = create_model("LightningDiT-T/4", **TINY, learn_sigma=False).eval()
    state = release_state_dict()
    model.load_state_dict(state, strict=True)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 0.8]), torch.tensor([1, 7])
    with torch.no_grad():
        a, b = model(x, t, y), model(x, t, y)
    assert torch.equal(a, b) and a.shape == (2, 1, 16, 16) and a.abs().sum() > 0
    torch.save(state, tmp_path / "release.pt")
    other = create_model("LightningDiT-T/4", **TINY, learn_sigma=False).eval()
    assert load_pretrained(other, tmp_path / "release.pt") == "state_dict"
    with torch.no_grad():
        assert torch.equal(other(x, t, y), a)


def test_a_checkpoint_of_the_other_family_names_it(tmp_path):
    torch.save(release_state_dict(), tmp_path / "lightning.pt")
    with pytest.raises(ValueError, match="the checkpoint is a LightningDiT .*model.rope=true.* set model.name=LightningDiT"):
        load_pretrained(create_model("DiT-T/4", **TINY, learn_sigma=False), tmp_path / "lightning.pt")
    torch.save(create_model("DiT-T/4", **TINY, learn_sigma=False).state_dict(), tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="the checkpoint is a DiT .* set model.name=DiT-"):
        load_pretrained(create_model("LightningDiT-T/4", **TINY, learn_sigma=False), tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="other block switches: .*model.qk_norm=false"):
        load_pretrained(create_model("LightningDiT-T/4", **TINY, learn_sigma=False, qk_norm=True), tmp_path / "lightning.pt")


def test_another_token_grid_is_an_error_unless_resized(tmp_path):
    torch.save(release_state_dict(), tmp_path / "release.pt")
    bigger = dict(TINY, input_size=32)
    with pytest.raises(ValueError, match="rotary tables are for 16 tokens, the model's for 64"):
        load_pretrained(create_model("LightningDiT-T/4", **bigger, learn_sigma=False), tmp_path / "release.pt")
    model = create_model("LightningDiT-T/4", **bigger, learn_sigma=False)
    used = load_pretrained(model, tmp_path / "release.pt", mode="resize")
    assert "feat_rope.freqs_cos recomputed for 64 tokens (was 16)" in used and "pos_embed recomputed" in used
    torch.testing.assert_close(model.feat_rope.freqs_cos, axial_rope_tables(32, 8)[0])


@pytest.mark.parametrize("switch", ["rmsnorm", "swiglu", "rope", "qk_norm", "adaln_shift"])
def test_each_switch_changes_its_part_only(switch):
    default = resolve_switches("LightningDiT-T/4")
    flipped = create_model("LightningDiT-T/4", **TINY, **{switch: not default[switch]})
    keys, base = set(flipped.state_dict()), set(create_model("LightningDiT-T/4", **TINY).state_dict())
    changed = {k.split(".", 2)[-1] if k.startswith("blocks.") else k for k in keys ^ base}
    marks = {"rmsnorm": "norm", "swiglu": "mlp.", "rope": "feat_rope", "qk_norm": "_norm", "adaln_shift": None}
    if marks[switch]:
        assert changed and all(marks[switch] in k for k in changed), changed
    else:  # the shift changes a shape, not the keys
        assert not changed
        assert flipped.state_dict()["blocks.0.adaLN_modulation.1.weight"].shape[0] == 4 * 128
    out = flipped(torch.randn(2, 1, 16, 16), torch.tensor([0.1, 0.9]), torch.tensor([0, 3]))
    assert out.shape == (2, 2, 16, 16)


def test_registry_and_dit_switches():
    assert {"LightningDiT-XL/1", "LightningDiT-XL/2", "LightningDiT-S/1", "LightningDiT-T/4"} <= set(LIGHTNINGDIT_MODELS)
    assert not set(MODELS) & set(LIGHTNINGDIT_MODELS)
    assert resolve_switches("DiT-XL/2", rope=None, swiglu=False) == {}
    with pytest.raises(ValueError, match="model.rope=True: DiT-XL/2 is the reference DiT block"):
        resolve_switches("DiT-XL/2", rope=True)
    xl1 = sum(p.numel() for p in create_model("LightningDiT-XL/1", input_size=16, in_channels=32, learn_sigma=False,
                                               num_classes=1000).parameters())
    assert 670e6 < xl1 < 690e6  # about DiT-XL/2's 675M: SwiGLU at 2/3 width keeps the MLP's size


@pytest.mark.parametrize("name", ["DiT-T/4", "LightningDiT-T/4"])
def test_the_methods_inputs_wrap_any_backbone_with_the_reference_keys(name):
    plain = set(create_model(name, **TINY).state_dict())
    for extra, prefix in (({"z_dim": 5}, "z_embedder."), ({"guidance_embedding": True}, "guidance_embedder.")):
        torch.manual_seed(0)
        wrapped = create_model(name, **TINY, **extra)
        keys = set(wrapped.state_dict())
        assert keys - plain and all(k.startswith(prefix) for k in keys - plain) and plain <= keys
        again = create_model(name, **TINY, **extra)
        again.load_state_dict(wrapped.state_dict(), strict=True)
        for p, q in zip(wrapped.parameters(), again.parameters()):
            assert torch.equal(p, q)
        assert wrapped.learn_sigma and wrapped.y_embedder is wrapped.backbone.y_embedder
        inputs = {"z": torch.randn(2, 5)} if "z_dim" in extra else {"s": torch.tensor([1.5, 3.0])}
        out = wrapped(torch.randn(2, 1, 16, 16), torch.tensor([3.0, 9.0]), torch.tensor([0, 1]), **inputs)
        assert out.shape == (2, 2, 16, 16)
        with pytest.raises(ValueError, match="must be given exactly when the model has it"):
            wrapped(torch.randn(2, 1, 16, 16), torch.tensor([3.0, 9.0]), torch.tensor([0, 1]))
    # the same seed draws the same backbone with or without a wrapper (the embedders come after it)
    torch.manual_seed(3)
    a = create_model(name, **TINY)
    torch.manual_seed(3)
    b = create_model(name, **TINY, guidance_embedding=True)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])


@pytest.mark.parametrize("name", ["DiT-T/4", "LightningDiT-T/4"])
def test_the_feature_hook_returns_the_tokens_after_the_chosen_blocks(name):
    torch.manual_seed(0)
    model = create_model(name, **TINY).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([0.2, 0.7]), torch.tensor([2, 5])
    with torch.no_grad():
        out, (second, last) = model(x, t, y, feature_depths=(2, 6))
        torch.testing.assert_close(out, model(x, t, y))
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, False)
        for block in model.blocks[:2]:
            h = block(h, c, **model.block_inputs())
    assert second.shape == (2, 16, 128) and not torch.equal(second, last)
    torch.testing.assert_close(second, h)
    assert math.isfinite(float(last.sum()))
