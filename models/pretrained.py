"""Load published DiT weights (facebookresearch/DiT release format) or our own training checkpoints.

Accepted files: a plain state dict (what DiT-XL-2-256x256.pt is), or a dict holding the
weights under "ema" and/or "model" next to other entries ("opt", "args", "step", ...), as
written by DiT's train.py and by our train phase. Loading is strict: a checkpoint that does
not fit the model raises a ValueError that names the offending keys and shapes, instead of
silently running with partly random weights.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

ROTARY_TABLES = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")  # a LightningDiT's fixed rotary tables
# Added to every key by DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOWN = 5  # keys listed per kind of mismatch in an error message


def strip_wrapper_prefixes(key: str) -> str:
    """Remove leading DDP / torch.compile prefixes, in any order and nesting."""
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _select_weights(obj: object, prefer_ema: bool) -> tuple[str, Mapping]:
    """Which entry of a loaded checkpoint holds the weights: ("ema"|"model", dict) or ("state_dict", obj)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict or a dict with 'ema'/'model' entries, got {type(obj).__name__}")
    order = ("ema", "model") if prefer_ema else ("model", "ema")
    for key in order:
        if isinstance(obj.get(key), Mapping):
            return key, obj[key]
    return "state_dict", obj


def extract_state_dict(obj: object, prefer_ema: bool = True) -> dict[str, torch.Tensor]:
    """The model weights inside a loaded checkpoint, with DDP / compile prefixes removed.

    "ema" is taken over "model" when both exist and prefer_ema is True (the reverse when
    False); a checkpoint with only one of them gives that one either way.
    """
    source, weights = _select_weights(obj, prefer_ema)
    not_tensors = [f"{k!r} ({type(v).__name__})" for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        where = "top level" if source == "state_dict" else f"{source!r} entry"
        raise ValueError(
            f"the checkpoint's {where} is not a state dict: entries that are not tensors: "
            f"{', '.join(not_tensors[:_SHOWN])}; expected a plain state dict or a dict with 'ema'/'model' entries"
        )
    state: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        clean = strip_wrapper_prefixes(str(key))
        if clean in state:
            raise ValueError(f"the checkpoint has key {clean!r} twice once prefixes are removed (last: {key!r})")
        state[clean] = value
    return state


def _read_checkpoint(path: Path) -> object:
    """torch.load with weights_only=True and the reference repos' argument objects allowed (runtime/checkpoint.py)."""
    from runtime.checkpoint import load_checkpoint

    return load_checkpoint(path)


def _block_count(keys) -> int:
    indices = [int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))]
    return max(indices) + 1 if indices else 0


def block_switches_of(state: Mapping[str, torch.Tensor]) -> dict | None:
    """The block switches a DiT-family state dict was built with, read off its keys (None without blocks):
    all off and the adaLN shift on is the reference DiT block; anything else is a LightningDiT."""
    modulation = state.get("blocks.0.adaLN_modulation.1.weight")
    if modulation is None:
        return None
    width = modulation.shape[1]
    return {"rmsnorm": "blocks.0.norm1.weight" in state, "swiglu": "blocks.0.mlp.w12.weight" in state,
            "rope": "feat_rope.freqs_cos" in state, "qk_norm": "blocks.0.attn.q_norm.weight" in state,
            "adaln_shift": modulation.shape[0] == 6 * width}


def _architecture_hint(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """A LightningDiT checkpoint under a DiT name, the reverse, or other LightningDiT switches: say which."""
    theirs, ours = block_switches_of(state), block_switches_of(expected)
    if theirs is None or ours is None or theirs == ours:
        return None
    reference = {"rmsnorm": False, "swiglu": False, "rope": False, "qk_norm": False, "adaln_shift": True}
    if theirs == reference:
        return "the checkpoint is a DiT (reference blocks) but the model a LightningDiT: set model.name=DiT-..."
    switches = ", ".join(f"model.{k}={str(v).lower()}" for k, v in theirs.items())
    if ours == reference:
        return f"the checkpoint is a LightningDiT ({switches}) but the model a DiT: set model.name=LightningDiT-..."
    return f"the checkpoint is a LightningDiT with other block switches: {switches}"


def _mismatch_hints(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """Plain-language guesses at why a checkpoint does not fit, from the tell-tale DiT tensors."""

    def shapes(key: str):
        if key in state and key in expected:
            return tuple(state[key].shape), tuple(expected[key].shape)
        return None, None

    hints = []
    architecture = _architecture_hint(state, expected)
    if architecture:
        return [architecture]
    if not set(state) & set(expected):
        hints.append("no key in common with the model: is this a DiT checkpoint?")
    depth = _block_count(state), _block_count(expected)
    if depth[0] != depth[1]:
        hints.append(f"the checkpoint has {depth[0]} blocks, the model {depth[1]}: model.name has the wrong size")
    got, want = shapes("feat_rope.freqs_cos")
    if got and got != want:
        hints.append(f"the rotary tables are for {got[0]} tokens, the model's for {want[0]}: another latent size or "
                     "patch size; model.init_mode=resize recomputes them for fine-tuning")
    got, want = shapes("pos_embed")
    if got and got[-1] != want[-1]:
        hints.append(f"hidden size {got[-1]} in the checkpoint vs {want[-1]}: model.name has the wrong size")
    elif got and got[1] != want[1]:
        hints.append(
            f"{got[1]} patch tokens in the checkpoint vs {want[1]} in the model: the latent size "
            "(data.image_size / autoencoder downsampling) or the patch size in model.name differs"
        )
    got, want = shapes("y_embedder.embedding_table.weight")
    if got and got[0] != want[0]:
        hints.append(
            f"the label table has {got[0]} rows in the checkpoint vs {want[0]}: it holds num_classes + 1 rows "
            f"(null class) when class_dropout_prob > 0, so set model.num_classes={got[0] - 1} "
            "(or check model.class_dropout_prob)"
        )
    got, want = shapes("x_embedder.proj.weight")  # [hidden, channels, p, p]
    if got and got[1] != want[1]:
        hints.append(f"{got[1]} input channels in the checkpoint vs {want[1]}: check the autoencoder's latent channels")
    if got and got[2:] != want[2:]:
        hints.append(f"patch size {got[2]} in the checkpoint vs {want[2]}: model.name should end in /{got[2]}")
    got, want = shapes("final_layer.linear.weight")
    if got and got[0] != want[0]:
        hints.append(
            f"output width (patch_size^2 x out_channels) is {got[0]} in the checkpoint vs {want[0]}: "
            "check model.learn_sigma, the latent channels and the patch size in model.name"
        )
    if not hints:
        hints.append("check model.name, data.image_size, model.num_classes and model.learn_sigma")
    return hints


def _mismatch_report(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str | None:
    """None when state fits expected exactly (same keys, same shapes); otherwise a readable description."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {list(state[k].shape)} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or mismatched):
        return None
    lines = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if items:
            more = f", ... ({len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
            lines.append(f"  {title} ({len(items)}): {', '.join(items[:_SHOWN])}{more}")
    lines += [f"  likely cause: {hint}" for hint in _mismatch_hints(state, expected)]
    return "\n".join(lines)


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def resized_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> tuple[dict, list[str]]:
    """The checkpoint's weights fitted to a model of another resolution or number of classes.

    Every weight is copied except two, which the new model keeps from its own initialisation:
    pos_embed (DiT's fixed sin-cos table, recomputed for the new token grid; a LightningDiT's rotary tables
    likewise) and, when the class
    count differs, the label table, whose last row (the null class of classifier-free guidance)
    is copied from the checkpoint's last row. Anything else that does not fit is an error.
    Returns (state dict for load_state_dict(strict=True), what was not copied).
    """
    out, kept = dict(expected), []
    problems = [f"unexpected key {k}" for k in state if k not in expected]
    problems += [f"missing key {k}" for k in expected if k not in state]
    for key, value in state.items():
        if key not in expected:
            continue
        want = expected[key]
        if key == "pos_embed" and value.shape != want.shape:
            kept.append(f"pos_embed recomputed for {want.shape[1]} tokens (was {value.shape[1]})")
        elif key in ROTARY_TABLES and value.shape != want.shape:
            kept.append(f"{key} recomputed for {want.shape[0]} tokens (was {value.shape[0]})")
        elif key == "y_embedder.embedding_table.weight" and value.shape != want.shape and value.shape[1:] == want.shape[1:]:
            table = want.clone()
            table[-1] = value[-1]
            out[key] = table
            kept.append(f"label table new for {want.shape[0]} rows (was {value.shape[0]}); null-class row copied")
        elif value.shape != want.shape:
            problems.append(f"{key}: checkpoint {list(value.shape)} vs model {list(want.shape)}")
        else:
            out[key] = value
    if problems:
        raise ValueError("model.init_mode=resize only adapts the image size and the number of classes; also "
                         "different: " + "; ".join(problems[:_SHOWN]))
    return out, kept


def load_pretrained(model: nn.Module, path: str | Path, prefer_ema: bool = True, obj: object = None,
                    mode: str = "strict", drop_prefixes: tuple = ()) -> str:
    """Load the weights in `path` into `model` (`obj`: the file already read, so it is read once).

    mode "strict": every key and shape must match. "resize": see resized_state (fine-tuning to
    another resolution or class count). Keys starting with one of `drop_prefixes` are parts of
    another tool's network that ours does not have (REPA's projectors): removed first. Returns
    which entry was used ("ema", "model", or "state_dict" for a plain state dict), and for
    "resize" what was not copied.
    """
    path = Path(path)
    if obj is None:
        if not path.exists():
            raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
        obj = _read_checkpoint(path)
    try:
        source, _ = _select_weights(obj, prefer_ema)
        state = extract_state_dict(obj, prefer_ema)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    state = {k: v for k, v in state.items() if not k.startswith(tuple(drop_prefixes))}
    model = _unwrap(model)
    if mode == "resize":
        try:
            state, kept = resized_state(state, model.state_dict())
        except ValueError as err:
            raise ValueError(f"{path} ({source} weights): {err}") from None
        model.load_state_dict(state, strict=True)
        return f"{source}; " + ("; ".join(kept) if kept else "every weight copied")
    if mode != "strict":
        raise ValueError(f"model.init_mode={mode!r} is not one of strict, resize")
    report = _mismatch_report(state, model.state_dict())
    if report is not None:
        raise ValueError(f"{path} ({source} weights) does not fit {type(model).__name__}:\n{report}")
    model.load_state_dict(state, strict=True)
    return source
