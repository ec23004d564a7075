"""Run by tests/test_distributed.py under torchrun: PaLMAdafactor on FSDP2-sharded parameters whose rows do
not divide evenly over the ranks equals PaLMAdafactor in one process. Rank 0 writes the differences.

    torchrun --standalone --nproc_per_node=2 tests/helpers/sharded_adafactor.py --out=RESULT.json
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

from nanopalm.model import FusedLinear
from nanopalm.optim import PaLMAdafactor, matrix_layouts


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = FusedLinear(6, {"q": 3, "k": 2, "v": 2}, bias=False)  # 7 rows: 4 on rank 0, 3 on rank 1
        self.scale = nn.Parameter(torch.linspace(0.5, 3.0, 5))  # 5 elements: 3 and 2


def main(out: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():  # rows of very different sizes: a per-shard RMS would be far off
        net.proj.weight.mul_(torch.tensor([1.0, 1.0, 1.0, 100.0, 100.0, 0.01, 0.01])[:, None])
    reference = copy.deepcopy(net)
    fully_shard(net)
    optimizers = [PaLMAdafactor(list(m.parameters()), lr=0.05, layouts=matrix_layouts(m)) for m in (net, reference)]
    local_rows = {name: p.to_local().shape[0] for name, p in net.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator) for p in reference.parameters()]
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
        for p, g in zip(reference.parameters(), grads, strict=True):
            p.grad = g.clone()
        for optimizer in optimizers:
            optimizer.step()
    diffs = {name: (p.full_tensor() - r).abs().max().item()
             for (name, p), r in zip(net.named_parameters(), reference.parameters(), strict=True)}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"max_abs_diff": diffs, "rank0_rows": local_rows}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")))
