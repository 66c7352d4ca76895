"""Training methods: one module per method (diffusion, flow, distill, ddgan, cld), each with a SPEC
(methods/spec.py) registered once in methods/registry.py; base.py is the seam to the training loop and
sampling.py samples any checkpoint through its method's spec. This package imports nothing on its own
(the config schema reads the registry without torch)."""
