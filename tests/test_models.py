"""Tests for models/: DiT structure (reference names/shapes), numerics, registry and checkpoint loading."""
from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import pytest
import torch

from models import DIT_SIZES, MODELS, create_model
from models.dit import DiT, LabelEmbedder, timestep_embedding
from models.pretrained import extract_state_dict, load_pretrained


def tiny(**overrides) -> DiT:
    """DiT-T/4 on 16x16 latents: 16 tokens, 6 blocks of width 128."""
    kwargs = dict(input_size=16, in_channels=4, num_classes=10, learn_sigma=True, class_dropout_prob=0.1)
    kwargs.update(overrides)
    return create_model("DiT-T/4", **kwargs)


def randomize(model: DiT, seed: int = 0) -> DiT:
    """Overwrite the trainable weights with noise, so the zero-initialised output layers no longer hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def inputs(model: DiT, batch: int = 3, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=generator)
    t = torch.tensor([0, 500, 999][:batch])
    y = torch.arange(batch) % model.num_classes
    return x, t, y


def meta_model(name: str, **kwargs) -> DiT:
    with torch.device("meta"):
        return create_model(name, **kwargs)


# ---------------------------------------------------------------- structure


def test_dit_xl2_has_the_papers_parameter_count():
    model = meta_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632
    # pos_embed is a parameter (so it is in the checkpoint) but is never trained
    assert not model.pos_embed.requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 675_129_632 - 256 * 1152


def test_dit_xl2_reference_key_shapes():
    state = meta_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000).state_dict()
    expected = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.0.attn.qkv.weight": (3456, 1152),
        "blocks.0.attn.proj.weight": (1152, 1152),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608),
        "blocks.27.adaLN_modulation.1.weight": (6912, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.linear.bias": (32,),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key


def test_state_dict_keys_are_exactly_the_reference_ones():
    model = tiny()
    top = [
        "pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
        "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "final_layer.linear.weight", "final_layer.linear.bias",
        "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias",
    ]  # fmt: skip
    per_block = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"]
    blocks = [f"blocks.{i}.{layer}.{kind}" for i in range(6) for layer in per_block for kind in ("weight", "bias")]
    assert set(model.state_dict()) == set(top + blocks)


def test_registry_sizes_match_the_paper():
    assert set(MODELS) == {f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S", "T") for p in (2, 4, 8)}
    paper = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (6, 128, 4)}
    assert DIT_SIZES == paper
    for size, (depth, hidden, heads) in paper.items():
        for patch in (2, 4, 8):
            model = meta_model(f"DiT-{size}/{patch}", input_size=32)
            assert len(model.blocks) == depth
            assert model.pos_embed.shape == (1, (32 // patch) ** 2, hidden)
            assert model.blocks[0].attn.num_heads == heads
            assert model.patch_size == patch


def test_create_model_rejects_bad_names_and_sizes():
    with pytest.raises(ValueError, match="DiT-XL/2") as err:
        create_model("DiT-XXL/2")
    assert "DiT-XXL/2" in str(err.value) and "DiT-T/8" in str(err.value)
    with pytest.raises(ValueError, match="patch size 4"):
        create_model("DiT-T/4", input_size=30)


def test_initialisation_is_adaln_zero():
    model = create_model("DiT-S/2", input_size=8, num_classes=1000)
    for block in model.blocks:
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()
    for layer in (model.final_layer.adaLN_modulation[-1], model.final_layer.linear):
        assert not layer.weight.any() and not layer.bias.any()
    # xavier uniform: |w| <= sqrt(6 / (fan_in + fan_out)), and it nearly reaches the bound
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (384 + 3 * 384))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.99 * bound
    assert not model.blocks[0].attn.qkv.bias.any()
    proj = model.x_embedder.proj.weight  # patch embed treated as a linear layer on 4*2*2 inputs
    bound = math.sqrt(6 / (384 + 4 * 2 * 2))
    assert proj.abs().max() <= bound and proj.abs().max() > 0.95 * bound
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert not model.t_embedder.mlp[0].bias.any()


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("learn_sigma, channels", [(True, 8), (False, 4)])
def test_output_shape(learn_sigma, channels):
    model = randomize(tiny(learn_sigma=learn_sigma))
    x, t, y = inputs(model)
    assert model(x, t, y).shape == (3, channels, 16, 16)


def test_initial_output_is_exactly_zero():
    model = tiny()
    x, t, y = inputs(model)
    assert torch.equal(model(x, t, y), torch.zeros(3, 8, 16, 16))


def test_wrong_input_shape_is_a_clear_error():
    model = tiny()
    with pytest.raises(ValueError, match=r"\[B, 4, 16, 16\]"):
        model(torch.zeros(2, 4, 32, 32), torch.zeros(2), torch.zeros(2, dtype=torch.long))


def test_pos_embed_matches_independent_2d_sincos():
    model = tiny()
    grid, dim = 4, 128
    quarter = dim // 4
    expected = np.zeros((grid * grid, dim))
    for i in range(grid):  # row
        for j in range(grid):  # column
            for k in range(quarter):
                omega = 10000.0 ** (-k / quarter)
                # MAE/DiT: first half of the width encodes the column, second half the row
                expected[i * grid + j, k] = math.sin(j * omega)
                expected[i * grid + j, quarter + k] = math.cos(j * omega)
                expected[i * grid + j, 2 * quarter + k] = math.sin(i * omega)
                expected[i * grid + j, 3 * quarter + k] = math.cos(i * omega)
    assert model.pos_embed.dtype == torch.float32
    np.testing.assert_allclose(model.pos_embed[0].numpy(), expected, atol=1e-6)


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 1.0, 2.5, 17.0, 999.0])
    emb = timestep_embedding(t, 256)
    half = 128
    freqs = np.exp(-math.log(10000) * np.arange(half) / half)
    args = t.numpy().astype(np.float64)[:, None] * freqs[None]
    np.testing.assert_allclose(emb.numpy(), np.concatenate([np.cos(args), np.sin(args)], 1), atol=2e-4)
    assert torch.equal(emb[0], torch.cat([torch.ones(half), torch.zeros(half)]))
    odd = timestep_embedding(t, 7)  # odd width: a zero column is appended
    assert odd.shape == (5, 7) and not odd[:, -1].any()


def test_float_and_long_timesteps_agree_at_integers():
    model = randomize(tiny()).eval()
    x, t, y = inputs(model)
    assert torch.equal(model(x, t.long(), y), model(x, t.float(), y))


def test_unpatchify_inverts_row_major_patches():
    model = tiny()
    p, c, g = 4, 8, 4
    tokens = torch.arange(2 * g * g * p * p * c, dtype=torch.float32).reshape(2, g * g, p * p * c)
    image = model.unpatchify(tokens)
    assert image.shape == (2, c, g * p, g * p)
    for row, col, pi, qi, ci in [(0, 0, 0, 0, 0), (1, 2, 3, 1, 5), (3, 3, 3, 3, 7), (2, 0, 1, 2, 3)]:
        value = tokens[1, row * g + col, (pi * p + qi) * c + ci]
        assert image[1, ci, row * p + pi, col * p + qi] == value


def test_block_matches_hand_written_adaln_zero_block():
    """Paper Sec. 3.2: x + gate * Attn(LN(x) * (1 + scale) + shift), then the same with the tanh-GELU MLP."""
    block = randomize(tiny()).blocks[0]
    generator = torch.Generator().manual_seed(3)
    x0, c = torch.randn(2, 16, 128, generator=generator), torch.randn(2, 128, generator=generator)
    linear = block.adaLN_modulation[1]
    modulation = (c * torch.sigmoid(c)) @ linear.weight.T + linear.bias  # SiLU, then the linear layer
    shift1, scale1, gate1, shift2, scale2, gate2 = (modulation[:, None, k * 128 : (k + 1) * 128] for k in range(6))

    def norm(h):
        return (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-6)

    h = norm(x0) * (1 + scale1) + shift1
    q, k, v = (block.attn.qkv(h).reshape(2, 16, 3, 4, 32)[:, :, i].transpose(1, 2) for i in range(3))
    attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1) @ v
    x1 = x0 + gate1 * block.attn.proj(attention.transpose(1, 2).reshape(2, 16, 128))
    h = block.mlp.fc1(norm(x1) * (1 + scale2) + shift2)
    gelu_tanh = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    expected = x1 + gate2 * block.mlp.fc2(gelu_tanh)
    torch.testing.assert_close(block(x0, c), expected, atol=1e-5, rtol=1e-5)


def test_fused_attention_is_used_and_matches_plain_attention(monkeypatch):
    model = randomize(tiny()).eval()
    x, t, y = inputs(model)
    assert all(block.attn.fused_attn for block in model.blocks)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    counting = lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    fused = model(x, t, y)
    assert len(calls) == len(model.blocks)
    for block in model.blocks:
        block.attn.fused_attn = False
    torch.testing.assert_close(fused, model(x, t, y), atol=1e-5, rtol=1e-5)


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.5)
    assert embedder.embedding_table.num_embeddings == 11  # + null class
    labels = torch.full((4000,), 3)
    table = embedder.embedding_table.weight
    trained = embedder(labels, train=True)
    dropped = (trained == table[10]).all(dim=1)
    kept = (trained == table[3]).all(dim=1)
    assert torch.all(dropped ^ kept) and 0.45 < dropped.float().mean() < 0.55
    assert (embedder(labels, train=False) == table[3]).all()
    forced = embedder(torch.tensor([1, 2, 3]), train=False, force_drop_ids=torch.tensor([0, 1, 0]))
    assert torch.equal(forced, table[torch.tensor([1, 10, 3])])
    assert LabelEmbedder(10, 8, 0.0).embedding_table.num_embeddings == 10  # no null row without dropout


def test_model_drops_labels_to_null_in_train_mode_only():
    model = randomize(tiny(class_dropout_prob=1.0))
    x, t, y = inputs(model)
    null = torch.full_like(y, model.num_classes)
    model.eval()
    conditional, unconditional = model(x, t, y), model(x, t, null)
    assert not torch.allclose(conditional, unconditional)
    model.train()
    assert torch.equal(model(x, t, y), unconditional)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = randomize(tiny(class_dropout_prob=0.0)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    x, t, y = inputs(plain)
    block_calls = {"plain": 0, "checkpointed": 0}
    # a pre-hook: non-reentrant checkpointing may stop the recomputation before the block returns
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        model.blocks[0].register_forward_pre_hook(lambda *_, n=name: block_calls.__setitem__(n, block_calls[n] + 1))
    for model in (plain, checkpointed):
        (model(x, t, y) ** 2).mean().backward()
    assert block_calls == {"plain": 1, "checkpointed": 2}  # recomputed in the backward pass
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- checkpoints


def assert_same_weights(a: DiT, b: DiT):
    for (key, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), key


def test_plain_state_dict_round_trip(tmp_path):
    source = randomize(tiny())
    path = tmp_path / "plain.pt"
    torch.save(source.state_dict(), path)
    target = tiny()
    assert load_pretrained(target, path) == "state_dict"
    assert_same_weights(source, target)


def test_training_checkpoint_prefers_ema(tmp_path):
    ema, raw = randomize(tiny(), seed=1), randomize(tiny(), seed=2)
    optimizer = torch.optim.AdamW(raw.parameters())
    path = tmp_path / "0001000.pt"
    torch.save(
        {
            "model": raw.state_dict(),
            "ema": ema.state_dict(),
            "opt": optimizer.state_dict(),
            "args": argparse.Namespace(model="DiT-T/4", image_size=128),  # as DiT's train.py saves it
            "step": 1000,
        },
        path,
    )
    target = tiny()
    assert load_pretrained(target, path) == "ema"
    assert_same_weights(ema, target)
    assert load_pretrained(target, path, prefer_ema=False) == "model"
    assert_same_weights(raw, target)


def test_ema_only_and_wrapper_prefixes(tmp_path):
    source = randomize(tiny())
    prefixed = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "ema.pt"
    torch.save({"ema": prefixed}, path)
    target = tiny()
    assert load_pretrained(target, path, prefer_ema=False) == "ema"  # the only weights there are
    assert_same_weights(source, target)


def test_extract_state_dict():
    weight = torch.ones(2)
    assert extract_state_dict({"_orig_mod.a": weight})["a"] is weight
    both = {"model": {"module.w": torch.zeros(1)}, "ema": {"w": torch.ones(1)}, "step": 3}
    assert extract_state_dict(both)["w"].item() == 1.0
    assert extract_state_dict(both, prefer_ema=False)["w"].item() == 0.0
    with pytest.raises(ValueError, match="'step'"):
        extract_state_dict({"w": torch.zeros(1), "step": 3})
    with pytest.raises(ValueError, match="list"):
        extract_state_dict([torch.zeros(1)])


def test_mismatch_names_keys_shapes_and_cause(tmp_path):
    path = tmp_path / "ten_classes.pt"
    state = randomize(tiny(num_classes=10)).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["blocks.5.mlp.fc2.bias"]
    torch.save(state, path)
    target = tiny(num_classes=20)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError) as err:
        load_pretrained(target, path)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys (1): blocks.5.mlp.fc2.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "y_embedder.embedding_table.weight: checkpoint [11, 128] vs model [21, 128]" in message
    assert "model.num_classes=10" in message
    for key, value in target.state_dict().items():  # nothing half-loaded
        assert torch.equal(value, before[key]), key


def test_mismatch_in_image_size_is_explained(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(tiny(input_size=16).state_dict(), path)
    with pytest.raises(ValueError, match="16 patch tokens in the checkpoint vs 64 in the model"):
        load_pretrained(tiny(input_size=32), path)
    with pytest.raises(ValueError, match="patch size 4 in the checkpoint vs 2: model.name should end in /4"):
        load_pretrained(create_model("DiT-T/2", input_size=16, num_classes=10), path)


def test_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_pretrained(tiny(), missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        load_pretrained(tiny(), garbage)


def test_resize_fine_tune_copies_what_it_should(tmp_path):
    """A 256-px DiT-S/2 (32x32 latents, 1000 classes) into a 512-px, 100-class one: every weight is copied
    except the fixed position table (recomputed) and the class rows of the label table (the null row is kept)."""
    torch.manual_seed(0)
    old = randomize(create_model("DiT-S/2", input_size=32, num_classes=1000))
    path = tmp_path / "s2_256.pt"
    torch.save({"model": old.state_dict(), "ema": old.state_dict()}, path)
    torch.manual_seed(1)
    new = create_model("DiT-S/2", input_size=64, num_classes=100)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit"):
        load_pretrained(new, path)  # strict stays the default
    used = load_pretrained(new, path, mode="resize")
    assert "pos_embed recomputed for 1024 tokens (was 256)" in used and "label table new for 101 rows (was 1001)" in used
    loaded, before = new.state_dict(), old.state_dict()
    assert torch.equal(loaded["pos_embed"], fresh["pos_embed"])
    table = loaded["y_embedder.embedding_table.weight"]
    assert torch.equal(table[:-1], fresh["y_embedder.embedding_table.weight"][:-1])
    assert torch.equal(table[-1], before["y_embedder.embedding_table.weight"][-1])  # the null class, kept last
    copied = [k for k in before if k not in ("pos_embed", "y_embedder.embedding_table.weight")]
    assert len(copied) == len(before) - 2 and all(torch.equal(loaded[k], before[k]) for k in copied)


def test_resize_refuses_other_architecture_changes(tmp_path):
    path = tmp_path / "t4.pt"
    torch.save(tiny().state_dict(), path)
    with pytest.raises(ValueError, match="only adapts the image size and the number of classes.*x_embedder"):
        load_pretrained(tiny(in_channels=3), path, mode="resize")
