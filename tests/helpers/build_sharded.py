"""The peak bytes of tensors while each rank builds an FSDP2 model (distributed.build_model), against the
whole model's: one JSON line per rank. Run by tests/test_distributed.py under torchrun (gloo)."""

import json

import torch
from torch.distributed._tools.mem_tracker import MemTracker

from nanopalm import distributed as D
from nanopalm.device import Precision
from nanopalm.model import PaLMConfig

CONFIG = PaLMConfig(vocab_size=256, block_size=64, n_layer=8, n_head=4, head_dim=16, d_model=64)


def main() -> None:
    info, device = D.init_distributed(torch.device("cpu"), fsdp=True)
    tracker = MemTracker()
    with tracker:
        model, _ = D.build_model(CONFIG, info, device, Precision(torch.float32, sharded=True), seed=0)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]  # not the meta device's (no memory)
    whole = sum(p.numel() for p in model.parameters()) * 4  # DTensors: numel() is the whole parameter's
    largest = max(p.numel() for p in model.parameters()) * 4
    print(json.dumps({"rank": info.rank, "peak": peak, "whole": whole, "largest": largest}), flush=True)
    D.shutdown_distributed()


if __name__ == "__main__":
    main()
