"""Loss spikes, handled as PaLM handled them (Section 5.1).

The 540B run saw about 20 loss spikes. The remedy: restart from a checkpoint roughly 100 steps before the
spike started, and skip roughly 200-500 data batches. Because nanoPALM's batch of a step is a pure function
of (seed, data step), skipping is exact: the run goes on at a later data step (TrainState.data_offset).

A spike is a non-finite loss or gradient norm, or a loss above `spike_factor` times the median of the last
`spike_window` steps. Where to go back to: with `rollback_interval` > 0, `RollbackPoints` copies the model,
optimizer and scaler state to host memory every that many steps, and a spike restores the newest copy at
least `rollback_distance` steps before it (owt_palm_paper: a copy every 50 steps, 100 back); with 0, the
newest checkpoint on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
from collections import deque
from dataclasses import dataclass

import torch

from nanopalm.checkpoint import TrainState
from nanopalm.distributed import local_shard


class SpikeDetector:
    def __init__(self, factor: float, window: int) -> None:
        self.factor = factor
        self.losses: deque[float] = deque(maxlen=window)

    def is_spike(self, loss: float, grad_norm: float, scaler_enabled: bool) -> bool:
        if not math.isfinite(loss):
            return True
        if not math.isfinite(grad_norm):
            return not scaler_enabled  # with fp16 the grad scaler skips such a step by itself
        if self.factor == 0 or len(self.losses) < min(10, self.losses.maxlen):
            return False
        return loss > self.factor * statistics.median(self.losses)

    def append(self, loss: float) -> None:
        self.losses.append(loss)

    def clear(self) -> None:
        self.losses.clear()


@dataclass
class RollbackPoint:
    state: TrainState
    params: list[torch.Tensor]  # host copies of this rank's parameters (or their shards), in order
    optimizer: list[dict]  # host copies of each parameter's optimizer state; [] before the first step
    scaler: dict


class RollbackPoints:
    """In-memory restart points, cheaper than checkpoints: no gathering, no disk, per rank its own shards."""

    def __init__(self, interval: int, distance: int) -> None:
        self.interval, self.distance = interval, distance
        # Enough points that one is always at least `distance` steps back, once the run is that far.
        self.points: deque[RollbackPoint] = deque(maxlen=distance // interval + 2 if interval else 0)

    def keep(self, state: TrainState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler) -> None:
        """Copy the state to host memory if `state.step` is a rollback step (and not already kept)."""
        kept = self.points and self.points[-1].state.step == state.step
        if not self.interval or state.step % self.interval or kept:
            return
        params = [local_shard(p).detach().to("cpu", copy=True) for p in model.parameters()]
        opt_state = [{k: local_shard(v).detach().to("cpu", copy=True) if torch.is_tensor(v) else copy.deepcopy(v)
                      for k, v in optimizer.state[p].items()} for p in model.parameters() if p in optimizer.state]
        self.points.append(RollbackPoint(dataclasses.replace(state), params, opt_state, scaler.state_dict()))

    def restore(self, spike_step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler) -> TrainState | None:
        """Restore the newest point at least `distance` steps before the spike (else the oldest kept); None
        when no point is kept. Points after it belong to the abandoned trajectory and are dropped."""
        if not self.points:
            return None
        eligible = [p for p in self.points if p.state.step <= spike_step - self.distance]
        point = eligible[-1] if eligible else self.points[0]
        while self.points[-1] is not point:
            self.points.pop()
        with torch.no_grad():
            for param, saved in zip(model.parameters(), point.params, strict=True):
                local_shard(param).copy_(saved)
            if not point.optimizer:  # kept before the first step: the optimizer starts afresh
                optimizer.state.clear()
            states = [optimizer.state[p] for p in model.parameters() if p in optimizer.state]
            for live, saved in zip(states, point.optimizer, strict=True):
                for key, value in saved.items():
                    if torch.is_tensor(value):
                        local_shard(live[key]).copy_(value)
                    else:
                        live[key] = copy.deepcopy(value)
        scaler.load_state_dict(point.scaler)
        return dataclasses.replace(point.state)
