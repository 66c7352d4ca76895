"""What a training method tells the rest of the tool: one `MethodSpec` per method module (its `SPEC`).

The generic code (train, sample, inference, the FID sweeps, distill) never tests a method's name:
it asks the spec of `model.method` (training) or of the checkpoint's recorded method (sampling).
Registering a method is one entry in methods/registry.py; everything else lives in its module.
Importing this module does not import torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class Published:
    """A checkpoint written by another tool, read as one of ours.

    `meta` is what our own checkpoint of that method would carry besides its weights ({"method": ...,
    ...}); `drop` names key prefixes of the file that our network does not have (REPA's projectors),
    removed before strict loading; `source` says in a few words what the file was recognised as.
    """

    meta: dict
    drop: tuple = ()
    source: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """One training method: how it trains, what its checkpoints record, and how they sample.

    Sampling (every method):
      samplers            the `sample.sampler` names this method's checkpoints accept
      generation_sampler  (cfg, model, model_args, checkpoint_meta, settings) -> sample(noise, y, generators,
                          progress) -> latents; settings are the resolved sampler keys of the phase
      describe_sampler    (checkpoint_meta, settings, cfg) -> one console line
      title               what a checkpoint of this method is, for messages ("a flow-matching model")
      guidance            classifier-free guidance (cfg_scale != 1) can be honoured
      cfg_interval        sample.cfg_interval can be honoured (guidance limited to a range of time)
      time_shift          sample.time_shift can be honoured (a shifted sampling grid)
      guide_all_channels  the default of sample.cfg_all_channels (None in the config)
      alignable           representation alignment (repa.enabled) can be added to its training: it denoises
                          with one network call per loss, and its method has time_key(network time) -> bucket
    Training (None for a method `-p train` cannot run):
      model_args          (cfg, margs) -> the DiT arguments of the method's network
      build               (cfg, model, device) -> the Method (methods/base.py) the loop trains
      metadata            (cfg) -> what its checkpoints carry so that they can be sampled
      flops_per_image     (cfg, margs) -> model FLOPs of one update per image (for MFU)
      validation_loss     (cfg, method, model, dataset, num_items, device) -> metrics on held-out items
    Config:
      check_config        (cfg) -> None, raising ConfigError: the method's own section, checked only when
                          the method runs (training it, sampling one of its checkpoints, distilling it)
    Other tools' checkpoints:
      recognise           (loaded object, cfg) -> Published | None, for files that say what they are
      read_bare           (state_dict, cfg) -> Published, for a bare state dict sampled with this
                          method's samplers (it cannot say what it is)
    Checkpoints outside checkpoints/:
      locate              (experiment_dir, steps) -> the checkpoint a sampler of this method means when no
                          ckpt= is given (distilled students live in their stage folders)
      output_root         (experiment_dir, ckpt) -> where sample/inference/evaluate write for that checkpoint
      check_init          (init_meta, cfg) -> None: can a run of this method start from a checkpoint with this
                          metadata (model.init_from)? e.g. a flow run from a flow model of the other convention
    Distillation:
      teacher             (model, model_args, cfg, all_channels) -> denoise(z, t, y, scale) -> x_hat in continuous
                          time, when a checkpoint of this method can be a progressive-distillation teacher
    """

    name: str
    title: str
    samplers: tuple
    generation_sampler: Callable
    describe_sampler: Callable
    guidance: bool = True
    cfg_interval: bool = True
    time_shift: bool = False
    guide_all_channels: bool = False
    alignable: bool = False
    model_args: Optional[Callable] = None
    build: Optional[Callable] = None
    metadata: Optional[Callable] = None
    flops_per_image: Optional[Callable] = None
    validation_loss: Optional[Callable] = None
    check_config: Callable = field(default_factory=lambda: _accept)
    recognise: Optional[Callable] = None
    read_bare: Optional[Callable] = None
    locate: Optional[Callable] = None
    output_root: Optional[Callable] = None
    check_init: Callable = field(default_factory=lambda: _accept)
    teacher: Optional[Callable] = None

    @property
    def trainable(self) -> bool:
        return self.build is not None


def _accept(*args, **kwargs) -> None:
    """The default check: accept anything (a method with nothing of its own to check)."""
    return None
