"""The training loop: data -> model -> loss -> optimizer, with evaluation, checkpoints and logs.

Reproducibility is built in: the batch of a step, its dropout masks and its learning rate are pure
functions of (seed, step), so a run resumed from a checkpoint follows the very trajectory of a run never
stopped, and a batch can be skipped on purpose (PaLM's loss-spike remedy, Section 5.1).
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import statistics
import time
from collections import deque
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from nanopalm import checkpoint as ckpt
from nanopalm import distributed as D
from nanopalm.atomic import write_atomic
from nanopalm.config import RunConfig
from nanopalm.data import BatchLoader, load_meta, prepare_shakespeare, resolve_dataset
from nanopalm.device import autocast, pick_device, pick_dtype
from nanopalm.errors import Interrupted, UserError
from nanopalm.metrics import MetricsLogger, gpu_peak_flops, mfu
from nanopalm.model import PaLM, lm_losses
from nanopalm.optim import build_optimizer, lr_at, micro_steps_at, set_lr
from nanopalm.plot import plot_runs
from nanopalm.signals import GracefulStop
from nanopalm.tokenizer import load_tokenizer

MAX_ROLLBACKS = 10  # more spikes than this and the run is diverging, not spiking


def step_seed(seed: int, step: int, micro_step: int) -> int:
    """The torch seed of one global micro-step: dropout masks depend on nothing else, so neither does
    training on the number of ranks."""
    return int(np.random.SeedSequence([seed, step, micro_step]).generate_state(1, np.uint64)[0] >> 1)


def tokenizer_fingerprint(directory: Path) -> str:
    """SHA-256 over the tokenizer files saved in a dataset or run directory."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).glob("tokenizer.*")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def nvtx(name: str, device: torch.device):
    """An NVTX range for Nsight Systems on CUDA (the seed shipped an nsys profile); no-op elsewhere."""
    return torch.cuda.nvtx.range(name) if device.type == "cuda" else nullcontext()


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        t = cfg.train
        self.dist, self.device = D.init_distributed(pick_device(t.device))
        self.dtype = pick_dtype(t.dtype, self.device)
        self.out_dir = Path(t.out_dir)
        D.check_divisible(t.gradient_accumulation_steps, self.dist)
        self.data_dir = self._dataset()
        self.data_meta = load_meta(self.data_dir)
        self.tokenizer_sha256 = tokenizer_fingerprint(self.data_dir)  # read once: every checkpoint records it
        self.step, self.tokens, self.data_offset, self.rollbacks = 0, 0, 0, 0
        self.best_val = math.inf
        self.saved_step = -1  # the step of the checkpoint this process saved or loaded last (-1: none)
        self.stop = GracefulStop()  # installed by train(): SIGTERM / Ctrl-C end the run with a checkpoint

        source = self._checkpoint_to_start_from()
        if source is not None:  # resume and finetuning keep the checkpoint's architecture
            model_cfg = ckpt.model_config_from_meta(source[1])
            model_cfg.dropout = cfg.model.dropout  # finetuning may change dropout (PaLM: 0.1)
            cfg.model = model_cfg
        torch.manual_seed(t.seed)
        self.raw_model = PaLM(cfg.model).to(self.device)
        use_compile = t.compile == "true" or (t.compile == "auto" and self.device.type == "cuda")
        # Before the optimizer is built: under FSDP2 it holds the parameter shards (raw_model is sharded in place).
        self.model = D.wrap_model(self.raw_model, self.dist, self.device, self.dtype, t.fsdp, use_compile)
        self.autocast_dtype = D.autocast_dtype(self.model, self.dtype)
        if source is not None:
            self._check_tokenizer(source[1])
            D.load_model_state(self.raw_model, ckpt.load_model_state(source[0]), source[0])
        self.optimizer = build_optimizer(self.raw_model, cfg.optim, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        if source is not None and t.resume:
            self._load_trainer_state(*source)

        block = cfg.model.block_size
        vocab = cfg.model.vocab_size
        self.train_loader = BatchLoader(self.data_dir, "train", t.batch_size, block, t.seed, self.device, vocab)
        self.val_loader = BatchLoader(self.data_dir, "val", t.batch_size, block, t.seed, self.device, vocab)
        self.tokenizer = load_tokenizer(self.data_dir)
        self.flops_per_token = self.raw_model.flops_per_token(block)
        self.peak_flops = gpu_peak_flops(self.device)
        self.losses: deque[float] = deque(maxlen=t.spike_window)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2).encode())
            self.tokenizer.save(self.out_dir)  # the run directory is self-contained for sampling
        self.logger = MetricsLogger(self.out_dir, self.dist.is_main, t.tensorboard, t.wandb_project, cfg.to_dict(),
                                    start_step=self.saved_step)

    # ---- setup -------------------------------------------------------------------------------
    def _dataset(self) -> Path:
        t = self.cfg.train
        if t.dataset == "shakespeare":
            try:
                return resolve_dataset(t.dataset)
            except UserError:
                if self.dist.is_main:  # the built-in corpus needs no download: make it on first use
                    print("preparing the built-in Shakespeare dataset (first run only)...", flush=True)
                    prepare_shakespeare()
                D.barrier(self.dist)
        return resolve_dataset(t.dataset)

    def _checkpoint_to_start_from(self) -> tuple[Path, dict] | None:
        t = self.cfg.train
        if t.resume:
            if not ckpt.has_checkpoints(self.out_dir):  # a job killed before its first checkpoint, started again
                print(f"--resume: no checkpoint in {self.out_dir} yet, starting the run from step 0", flush=True)
                return None
            return ckpt.find_checkpoint(self.out_dir)
        restart = D.restart_checkpoint(self.out_dir)
        if restart is not None:  # torchrun restarted this job after a failure (--max_restarts): continue it
            t.resume, t.init_from = True, ""
            return restart
        if ckpt.has_checkpoints(self.out_dir):
            raise UserError(f"{self.out_dir} already holds a run: add --resume to continue it, "
                            "or pick a new --out_dir")
        if t.init_from:
            return ckpt.find_checkpoint(t.init_from, prefer_best=True)
        return None

    def _check_tokenizer(self, meta: dict) -> None:
        expected, found = meta.get("tokenizer_sha256"), self.tokenizer_sha256
        if expected and expected != found:
            raise UserError(f"the checkpoint's tokenizer ({meta.get('tokenizer')} {expected[:8]}) is not the one "
                            f"dataset {self.cfg.train.dataset!r} was prepared with ({self.data_meta['tokenizer']} "
                            f"{found[:8]}): prepare the data with --tokenizer_from=<the checkpoint's run directory>")

    def _load_trainer_state(self, path: Path, meta: dict) -> None:
        state = ckpt.load_trainer_state(path)
        D.load_optimizer_state(self.raw_model, self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.data_offset, self.rollbacks = meta["data_offset"], meta.get("rollbacks", 0)
        self.best_val = meta.get("best_val_loss", math.inf)
        self.saved_step = self.step
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.train
        started = time.perf_counter()
        last_eval: dict = {}
        profiler = self._profiler()
        while self.step < t.max_iters:
            if self.step % t.eval_interval == 0 and self.step != self.saved_step:
                last_eval = self.evaluate_and_save()
            if self._time_is_up(started):
                if self.dist.is_main:
                    why = f"{self.stop.name} received" if self.stop.signum else f"max_minutes={t.max_minutes} reached"
                    print(f"{why} at step {self.step}: saving a checkpoint", flush=True)
                break
            self.train_step()
            if profiler is not None:
                profiler.step()
        if profiler is not None:
            profiler.stop()
        if self.step != self.saved_step:
            last_eval = self.evaluate_and_save()
        sampling = t.sample_tokens and not self.stop.signum  # a stop request wants out, not a sample
        if sampling and (self.dist.is_main or D.is_sharded(self.model)):  # FSDP: all ranks all-gather
            text = self.sample(t.sample_tokens)
            if self.dist.is_main:
                print(f"--- a sample from the model at step {self.step} ---\n{text}\n---")
        self.logger.close()
        return last_eval

    def _time_is_up(self, started: float) -> bool:
        """max_minutes passed, or a rank got SIGTERM / Ctrl-C: one all-reduce, so every rank stops together."""
        minutes = self.cfg.train.max_minutes
        up = float(minutes > 0 and time.perf_counter() - started > 60 * minutes)
        if not self.dist.enabled:  # one process: no collective, and no device sync every step
            return up > 0 or self.stop.signum is not None
        flags = torch.tensor([up, float(self.stop.signum is not None)], device=self.device)
        up, signalled = D.all_reduce_mean(flags, self.dist).tolist()
        if signalled and not self.stop.signum:
            self.stop.signum = signal.SIGTERM  # another rank was signalled: stop the same way
        return up > 0 or signalled > 0

    def train_step(self) -> None:
        t, o = self.cfg.train, self.cfg.optim
        tick = time.perf_counter()
        lr = lr_at(self.step, o)
        set_lr(self.optimizer, lr, o)
        micro_steps = micro_steps_at(self.step, t.gradient_accumulation_steps, o.batch_ramp)
        local_steps = micro_steps // self.dist.world_size
        data_step = self.step + self.data_offset
        loss_sum = torch.zeros((), device=self.device)
        self.model.train()
        for i in range(local_steps):
            # Global micro-step i * world + rank: ranks are disjoint and together equal one process.
            micro_step = i * self.dist.world_size + self.dist.rank
            torch.manual_seed(step_seed(t.seed, self.step, micro_step))
            x, y = self.train_loader.get_batch(data_step, micro_step)
            with D.no_grad_sync(self.model, i == local_steps - 1), nvtx("forward-backward", self.device):
                with autocast(self.device, self.autocast_dtype):
                    _, loss = self.model(x, y)
                    loss = loss / local_steps  # the mean over micro-steps, not their sum (seed defect 5)
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        max_norm = o.grad_clip if o.grad_clip > 0 else math.inf
        grad_norm = D.clip_grad_norm(self.raw_model, max_norm)
        stats = torch.stack([loss_sum.float(), torch.as_tensor(grad_norm, device=self.device).float()])
        loss_value, norm_value = D.all_reduce_mean(stats, self.dist).tolist()
        if self._is_spike(loss_value, norm_value):
            self.rollback(loss_value, norm_value)
            return
        with nvtx("optimizer", self.device):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss_value)
        step_tokens = micro_steps * t.batch_size * self.cfg.model.block_size
        self.step += 1
        self.tokens += step_tokens
        if self.step % t.log_interval == 0 or self.step == 1:
            self._log_train(loss_value, norm_value, lr, time.perf_counter() - tick, step_tokens)

    def _log_train(self, loss: float, grad_norm: float, lr: float, seconds: float, step_tokens: int) -> None:
        tokens_per_s = step_tokens / seconds
        row = {"step": self.step, "tokens": self.tokens, "train_loss": loss, "lr": lr, "grad_norm": grad_norm,
               "ms_per_step": 1000 * seconds, "tokens_per_s": tokens_per_s}
        line = (f"step {self.step:6d} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.2f} | "
                f"{1000 * seconds:.0f} ms/step | {tokens_per_s:,.0f} tok/s")
        if self.peak_flops:
            # tokens_per_s counts the whole step's tokens, all ranks together: against all ranks' peak.
            row["mfu"] = mfu(self.flops_per_token, tokens_per_s, self.peak_flops * self.dist.world_size)
            line += f" | mfu {100 * row['mfu']:.1f}%"
        self.logger.log(row)
        if self.dist.is_main:
            print(line, flush=True)

    # ---- loss spikes (PaLM Section 5.1) ------------------------------------------------------
    def _is_spike(self, loss: float, grad_norm: float) -> bool:
        if not math.isfinite(loss):
            return True
        if not math.isfinite(grad_norm):
            return not self.scaler.is_enabled()  # with fp16 the scaler skips inf steps by itself
        t = self.cfg.train
        if t.spike_factor == 0 or len(self.losses) < min(10, t.spike_window):
            return False
        return loss > t.spike_factor * statistics.median(self.losses)

    def rollback(self, loss: float, grad_norm: float) -> None:
        """Go back to the newest good checkpoint and skip the batches around the spike, as PaLM did."""
        spike_step, spike_data_step = self.step, self.step + self.data_offset
        self.rollbacks += 1
        if self.rollbacks > MAX_ROLLBACKS:
            raise UserError(f"training diverged: {self.rollbacks} loss spikes (last at step {spike_step}, "
                            f"loss {loss}); lower --learning_rate or raise --spike_factor")
        path, meta = ckpt.find_checkpoint(self.out_dir)
        D.load_model_state(self.raw_model, ckpt.load_model_state(path), path)
        rollbacks = self.rollbacks
        self._load_trainer_state(path, meta)
        self.rollbacks = rollbacks
        self.optimizer.zero_grad(set_to_none=True)
        # Resume the data stream spike_skip batches past the spike: step s now reads data step s + offset.
        self.data_offset = spike_data_step + self.cfg.train.spike_skip - self.step
        self.losses.clear()
        event = {"step": spike_step, "tokens": self.tokens, "event": "loss_spike", "loss": loss,
                 "grad_norm": grad_norm, "rolled_back_to": self.step, "data_offset": self.data_offset}
        self.logger.log(event)
        if self.dist.is_main:
            print(f"loss spike at step {spike_step} (loss {loss:.4f}, grad norm {grad_norm:.2f}): rolled back "
                  f"to step {self.step}, skipping to data step {self.step + self.data_offset}", flush=True)

    # ---- evaluation and checkpoints ----------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean val cross-entropy over the same eval_iters batches every time, in eval mode."""
        t = self.cfg.train
        self.model.eval()
        total = torch.zeros((), device=self.device)
        world, rank = self.dist.world_size, self.dist.rank
        for j in range(-(-t.eval_iters // world)):  # every rank runs the same number of forwards
            i = j * world + rank
            x, y = self.val_loader.get_batch(0, i % t.eval_iters)
            with autocast(self.device, self.autocast_dtype):
                logits, _ = self.model(x)
            if i < t.eval_iters:
                total += lm_losses(logits, y, z_loss=0.0)[1]
        return D.all_reduce_mean(total, self.dist).item() * world / t.eval_iters

    def evaluate_and_save(self) -> dict:
        val_loss = self.evaluate()
        val_bpb = val_loss / math.log(2) / self.data_meta["bytes_per_token_val"]
        self.best_val = min(self.best_val, val_loss)
        row = {"step": self.step, "tokens": self.tokens, "val_loss": val_loss, "val_bpb": val_bpb}
        self.logger.log(row)
        if self.dist.is_main:
            print(f"step {self.step:6d} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}", flush=True)
        if math.isfinite(val_loss):
            self.save(val_loss)
        if self.dist.is_main:
            plot_runs([self.out_dir], self.out_dir / "loss.png")
        return row

    def save(self, val_loss: float) -> None:
        model_state = D.model_state_dict(self.raw_model)
        trainer_state = {"optimizer": D.optimizer_state_dict(self.raw_model, self.optimizer),
                         "scaler": self.scaler.state_dict()}
        if self.dist.is_main:
            meta = {"config": self.cfg.to_dict(), "val_loss": val_loss, "tokens": self.tokens,
                    "data_offset": self.data_offset, "rollbacks": self.rollbacks, "best_val_loss": self.best_val,
                    "tokenizer": self.data_meta["tokenizer"], "tokenizer_sha256": self.tokenizer_sha256,
                    "world_size": self.dist.world_size, "job_id": D.job_id(), "torch_version": torch.__version__,
                    "rng": "derived from (seed, step, micro-step) each micro-step; nothing to restore"}
            ckpt.save_checkpoint(self.out_dir, self.step, model_state, trainer_state, meta, self.cfg.train.keep_last)
        self.saved_step = self.step
        D.barrier(self.dist)

    # ---- the rest ----------------------------------------------------------------------------
    def sample(self, max_new_tokens: int) -> str:
        prompt = self.tokenizer.encode(self.cfg.train.sample_prompt) or [self.tokenizer.eot_id]
        idx = torch.tensor([prompt], device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        self.raw_model.eval()
        with autocast(self.device, self.dtype):  # even under FSDP2: the KV cache takes the fp32 weights' dtype
            out = self.raw_model.generate(idx, max_new_tokens, temperature=0.8, top_k=200, generator=generator)
        return self.tokenizer.decode(out[0].tolist())

    def _profiler(self):
        if not self.cfg.train.profile:
            return None
        trace_dir = self.out_dir / "profile"
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1),
            on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)),
        )
        profiler.start()
        if self.dist.is_main:
            print(f"profiling steps 2-4 into {trace_dir}", flush=True)
        return profiler


def train(cfg: RunConfig) -> dict:
    """Run training to the end; returns the last evaluation ({step, tokens, val_loss, val_bpb}).
    SIGTERM or Ctrl-C: the step in progress finishes, a checkpoint is saved, then Interrupted is raised."""
    try:
        trainer = Trainer(cfg)
        with trainer.stop:
            result = trainer.train()
        if trainer.stop.signum:
            raise Interrupted(f"stopped by {trainer.stop.name} at step {trainer.step}, checkpoint saved: continue "
                              f"with --resume --out_dir={trainer.out_dir}", trainer.stop.exit_code)
        return result
    finally:
        D.shutdown_distributed()
