"""Worker for tests/test_meanflow.py: the gradients of a functional method (MeanFlow's JVP on the bare network)
as the training loop reduces them, on one process with two accumulated micro-batches or on two processes with
one each (the same micro-batches, the same draws). Run as `python functional_gradients.py OUT` or under
`torchrun --nproc_per_node=2 functional_gradients.py OUT`; rank 0 writes the gradients to OUT."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.meanflow import MeanFlowMethod, TimeSampling  # noqa: E402
from models import create_model  # noqa: E402
from runtime import distributed as dist  # noqa: E402
from runtime.parallel import Replicated  # noqa: E402

MICRO_BATCHES = 2


def main(out: str) -> None:
    dist.init()
    torch.manual_seed(0)
    model = create_model("DiT-T/4", input_size=8, in_channels=1, num_classes=3, interval_embedding=True)
    for p in model.parameters():  # away from adaLN-Zero's zeros, so every part of the network has a gradient
        torch.nn.init.normal_(p, std=0.05)
    method = MeanFlowMethod(model, TimeSampling(ratio=0.5), cfg_scale=2.0, label_dropout=0.25, norm_p=1.0,
                            norm_eps=1e-3)
    spread = Replicated(functional=True)
    nets = spread.wrap(method.modules(), type("S", (), {"compile": False})(), torch.device("cpu"))
    assert nets["model"] is model, "a functional method's network must not be wrapped by DDP"
    x = torch.randn(MICRO_BATCHES, 4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (MICRO_BATCHES, 4), generator=torch.Generator().manual_seed(2))
    mine = range(dist.rank(), MICRO_BATCHES, dist.world_size())
    for micro in mine:
        loss, _ = method.loss("model", nets, x[micro], y[micro], torch.Generator().manual_seed(100 + micro))
        (loss / len(mine)).backward()
    spread.reduce_gradients([p for p in model.parameters() if p.requires_grad])  # the optimizer's parameters
    if dist.is_main():
        torch.save({name: p.grad for name, p in model.named_parameters() if p.requires_grad}, out)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
