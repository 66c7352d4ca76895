"""LDM-format autoencoder state dicts for the tests, written out from the CompVis layout (ldm's
`Encoder` / `Decoder`: encoder.down.{level}.block.{j}, .attn.{j}, .downsample; decoder.up.{level}...; mid
block_1, attn_1, block_2), random values. VA-VAE f16d32 is this layout with 128 x (1, 1, 2, 2, 4), 2 blocks
per level, 32 latent channels and attention at the lowest resolution."""
import torch


def ldm_vae_state(ch=32, mult=(1, 1), blocks=1, z=32, attention_levels=(1,), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.05 * torch.randn(*shape, generator=g)
    state = {}

    def norm(prefix, c):
        state[prefix + ".weight"], state[prefix + ".bias"] = 1 + r(c), r(c)

    def conv(prefix, out, inp, k):
        state[prefix + ".weight"], state[prefix + ".bias"] = r(out, inp, k, k), r(out)

    def resnet(prefix, inp, out):
        norm(prefix + ".norm1", inp)
        conv(prefix + ".conv1", out, inp, 3)
        norm(prefix + ".norm2", out)
        conv(prefix + ".conv2", out, out, 3)
        if inp != out:
            conv(prefix + ".nin_shortcut", out, inp, 1)

    def attention(prefix, c):
        norm(prefix + ".norm", c)
        for name in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.{name}", c, c, 1)

    def mid(prefix, c):
        resnet(prefix + ".block_1", c, c)
        attention(prefix + ".attn_1", c)
        resnet(prefix + ".block_2", c, c)

    levels = len(mult)
    conv("encoder.conv_in", ch, 3, 3)
    width = ch
    for level in range(levels):
        out = ch * mult[level]
        for j in range(blocks):
            resnet(f"encoder.down.{level}.block.{j}", width, out)
            width = out
            if level in attention_levels:
                attention(f"encoder.down.{level}.attn.{j}", width)
        if level != levels - 1:
            conv(f"encoder.down.{level}.downsample.conv", width, width, 3)
    mid("encoder.mid", width)
    norm("encoder.norm_out", width)
    conv("encoder.conv_out", 2 * z, width, 3)
    conv("quant_conv", 2 * z, 2 * z, 1)
    conv("post_quant_conv", z, z, 1)
    width = ch * mult[-1]
    conv("decoder.conv_in", width, z, 3)
    mid("decoder.mid", width)
    for level in reversed(range(levels)):
        out = ch * mult[level]
        for j in range(blocks + 1):
            resnet(f"decoder.up.{level}.block.{j}", width, out)
            width = out
            if level in attention_levels:
                attention(f"decoder.up.{level}.attn.{j}", width)
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", width, width, 3)
    norm("decoder.norm_out", width)
    conv("decoder.conv_out", 3, width, 3)
    # training-only parts of VA-VAE's checkpoint, which the autoencoder does not have
    state["loss.discriminator.main.0.weight"] = r(4, 3, 3, 3)
    state["linear_proj.weight"] = r(16, z, 1, 1)
    return state
