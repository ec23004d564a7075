"""What a run reports: console lines, metrics.jsonl, and TensorBoard / wandb when asked for."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nanopalm.atomic import write_atomic
from nanopalm.errors import UserError

# Dense peak FLOP/s per GPU for bf16/fp16 matmuls (vendor datasheets, without sparsity), used for MFU.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def gpu_peak_flops(device: torch.device) -> float | None:
    """The bf16 peak of a known GPU, by its name; None when unknown (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in GPU_PEAK_FLOPS.items():
        if key.lower() in name.lower():
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation, PaLM Appendix B: achieved model FLOP/s over the hardware peak."""
    return flops_per_token * tokens_per_s / peak_flops


def start_profiler(trace_dir: Path, device: torch.device, announce: bool) -> torch.profiler.profile:
    """torch.profiler over steps 2-4 (after a wait and a warmup step), traced for TensorBoard into trace_dir."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
        on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)),
    )
    profiler.start()
    if announce:
        print(f"profiling steps 2-4 into {trace_dir}", flush=True)
    return profiler


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl; a line cut short by a crash is skipped, the rest is good."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a training run directory?")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


class MetricsLogger:
    """One JSON object per line in out_dir/metrics.jsonl, plus optional TensorBoard and wandb.

    resumed_at: the step of the checkpoint a resumed run starts from, whose earlier rows past it are dropped;
    None for a new run, which starts an empty file.
    """

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, wandb_project: str, config: dict,
                 resumed_at: int | None = None):
        self.enabled = enabled
        self.tb = self.wandb = None
        if not enabled:
            return
        self.out_dir = Path(out_dir)
        self.file = None
        # A resumed run replays the steps after its checkpoint: dropping their old rows keeps every step once.
        self.rewind(-1 if resumed_at is None else resumed_at)  # a new run keeps no row
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard=True needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb_project needs the wandb package: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(out_dir))

    def rewind(self, step: int) -> None:
        """Drop the rows of steps after `step` (those of an earlier attempt that will be replayed, or of a
        trajectory abandoned by a loss-spike rollback), so that steps never run backwards in the file."""
        if not self.enabled:
            return
        if self.file is not None:
            self.file.close()
        path = self.out_dir / "metrics.jsonl"
        kept = [row for row in read_metrics(self.out_dir) if row.get("step", 0) <= step] if path.is_file() else []
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept).encode())
        self.file = open(path, "a")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for key, value in numbers.items():
                self.tb.add_scalar(key, value, row["step"])
        if self.wandb is not None:
            self.wandb.log(numbers, step=row["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
