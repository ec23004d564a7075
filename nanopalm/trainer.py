"""The training loop: data -> model -> loss -> optimizer, with evaluation, checkpoints and logs.

Reproducibility is built in: the batch of a step, its dropout masks and its learning rate are pure
functions of (seed, step), so a run resumed from a checkpoint follows the very trajectory of a run never
stopped, and a batch can be skipped on purpose (PaLM's loss-spike remedy, Section 5.1).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from nanopalm import distributed as D
from nanopalm import shakespeare
from nanopalm.atomic import check_dir, ensure_dir, write_atomic
from nanopalm.budget import Budget
from nanopalm.checkpoint import Checkpointer, StartPoint, TrainState
from nanopalm.config import RUN_CONFIG_FILE, RunConfig, TrainConfig
from nanopalm.data import BatchLoader, load_meta
from nanopalm.device import free_memory, pick_device, pick_precision
from nanopalm.errors import MEMORY_ADVICE, Interrupted, UserError, warn
from nanopalm.evaluate import Score, Scorer, describe
from nanopalm.faults import fault_point
from nanopalm.instruct import ExampleLoader, save_template, score_examples
from nanopalm.lora import lora_base_record, trainable_parameters
from nanopalm.memory import GIB, Setup, estimate
from nanopalm.metrics import MetricsLogger, gpu_peak_flops, mfu, start_profiler
from nanopalm.optim import apply_schedule, build_optimizer, micro_steps_at
from nanopalm.plot import plot_runs
from nanopalm.sampling import generate_text
from nanopalm.signals import GracefulStop
from nanopalm.spikes import RollbackPoints, SpikeDetector
from nanopalm.tokenizer import load_tokenizer, tokenizer_fingerprint

LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
MAX_ROLLBACKS = 10  # more spikes than this and the run is diverging, not spiking


def step_seed(seed: int, step: int, micro_step: int) -> int:
    """The torch seed of one global micro-step: dropout masks depend on nothing else, so neither does
    training on the number of ranks."""
    return int(np.random.SeedSequence([seed, step, micro_step]).generate_state(1, np.uint64)[0] >> 1)


def nvtx(name: str, device: torch.device):
    """An NVTX range for Nsight Systems on CUDA (the seed shipped an nsys profile); no-op elsewhere."""
    return torch.cuda.nvtx.range(name) if device.type == "cuda" else nullcontext()


def effective_config(cfg: RunConfig, start: StartPoint | None) -> tuple[RunConfig, list[str]]:
    """The config a run trains with: the one given, with the architecture of the checkpoint it starts from
    (resumed or finetuned), whose dropout and fused switch the run may change, and a finetune its LoRA keys.
    Also returns each given model key that the checkpoint overrides, as `key=given (checkpoint: value)`."""
    if start is None:
        if cfg.model.lora_rank:
            raise UserError(f"--lora_rank={cfg.model.lora_rank} adapts a trained model: give it with --init_from=RUN")
        return cfg, []
    saved = start.checkpoint.config()
    if start.resume and saved.optim.optimizer != cfg.optim.optimizer:
        raise UserError(f"the run was trained with --optimizer={saved.optim.optimizer}, not {cfg.optim.optimizer}: "
                        f"resume with the same optimizer, or start a new run from its weights with --init_from")
    # Not architecture: dropout (PaLM finetunes with 0.1), the fused switch, and a finetune's LoRA adapters.
    adapters = {} if start.resume else {k: getattr(cfg.model, k) for k in LORA_KEYS}
    model = dataclasses.replace(saved.model, dropout=cfg.model.dropout, fused=cfg.model.fused, **adapters)
    overridden = [f"{f.name}={getattr(cfg.model, f.name)!r} (checkpoint: {getattr(model, f.name)!r})"
                  for f in dataclasses.fields(model) if getattr(cfg.model, f.name) != getattr(model, f.name)]
    return dataclasses.replace(cfg, model=model), overridden


class Trainer:
    def __init__(self, cfg: RunConfig):
        t = cfg.train
        self.dist, self.device = D.init_distributed(pick_device(t.device), t.fsdp)
        self.precision = pick_precision(t.dtype, self.device, self.dist.sharded, t.tf32)
        D.check_divisible(t.gradient_accumulation_steps, self.dist)
        self.out_dir = self._check_out_dir(t.out_dir)
        self.checkpointer = Checkpointer(self.out_dir, t.keep_last, self.dist, t.checkpoint_format)
        start = self.checkpointer.start_point(t.resume, t.init_from)
        self.data_dir = shakespeare.resolve_or_prepare(t.dataset, self.dist.is_main, lambda: D.barrier(self.dist))
        self.data_meta = load_meta(self.data_dir)
        self.tokenizer_sha256 = tokenizer_fingerprint(self.data_dir)  # read once: every checkpoint records it
        self.cfg, overridden = effective_config(cfg, start)
        if overridden and self.dist.is_main:
            print(f"the checkpoint's model settings apply: {', '.join(overridden)}", flush=True)
        if start is not None:
            self._check_tokenizer(start.checkpoint.meta)
        # A LoRA run's checkpoints hold its adapters and name the base they adapt (nanopalm/lora.py).
        self.lora_base = lora_base_record(start) if self.cfg.model.lora_rank else None
        # The data before the model: a block longer than the data or a vocabulary smaller than it fails here, in
        # a second, not after the model is built (a 10^8-token block's RoPE tables alone take gigabytes).
        block, vocab = self.cfg.model.block_size, self.cfg.model.vocab_size
        # Instruction data (nanopalm/instruct.py): whole examples a row, the responses alone learned.
        self.instructions = self.data_meta.get("kind") == "instructions"
        loader = ExampleLoader if self.instructions else BatchLoader
        self.train_loader = loader(self.data_dir, "train", t.batch_size, block, t.seed, self.device, vocab)
        self.val_loader = loader(self.data_dir, "val", t.batch_size, block, t.seed, self.device, vocab)
        if self.instructions and self.dist.is_main and (cut := self.train_loader.cut + self.val_loader.cut):
            skipped = self.train_loader.skipped + self.val_loader.skipped
            print(f"{cut} examples are longer than block_size + 1 = {block + 1} tokens: their ends are cut"
                  + (f"; {skipped} of them leave no response token in the block and are left out" if skipped else ""),
                  flush=True)
        self.tokenizer = load_tokenizer(self.data_dir)

        compile_blocks = t.compile is True or (t.compile == "auto" and self.device.type == "cuda")
        self.raw_model, self.model = D.build_model(self.cfg.model, self.dist, self.device, self.precision, t.seed,
                                                   t.activation_checkpointing, compile_blocks)
        self._warn_if_memory_is_short()  # the weights are a step's smallest part: the rest is not allocated yet
        self.optimizer = build_optimizer(self.raw_model, self.cfg.optim, self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.grad_scaler)
        self.state = TrainState()
        self.saved_step: int | None = None  # the step of the checkpoint this process saved or loaded last
        self.budget = Budget(t.max_iters, t.max_minutes, self.cfg.optim.cooldown)
        if start is not None:
            optimizer = self.optimizer if start.resume else None  # finetuning: the weights, a fresh optimizer
            loaded = self.checkpointer.load(start.checkpoint, self.raw_model, optimizer, self.scaler)
            if start.resume:
                self.state, self.saved_step = loaded, loaded.step
                self._replan_if_budget_changed(start.checkpoint.config().train)
                if self.dist.is_main:
                    print(f"resumed from {start.checkpoint.path} at step {loaded.step}", flush=True)

        self.flops_per_token = self.raw_model.flops_per_token(block)
        self.peak_flops = gpu_peak_flops(self.device)
        self.spikes = SpikeDetector(t.spike_factor, t.spike_window)
        self.rollback_points = RollbackPoints(t.rollback_interval, t.rollback_distance)
        self.signals = GracefulStop()  # installed by train(): SIGTERM / Ctrl-C end the run with a checkpoint
        self.last_eval: dict = {}  # the newest evaluation row ({step, tokens, val_loss, val_bpb, ...})
        self.iteration_started = time.perf_counter()
        ensure_dir(self.out_dir, "--out_dir")
        if self.dist.is_main:
            self._record_config()
            self.tokenizer.save(self.out_dir)  # the run directory is self-contained for sampling
            save_template(self.data_meta, self.out_dir)
        self.logger = MetricsLogger(self.out_dir, self.dist.is_main, t.tensorboard, t.wandb_project,
                                    self.cfg.to_dict(), resumed_at=self.saved_step)
        if self.dist.is_main:  # what --dtype=auto and --device=auto chose, before the first step
            dtype = str(self.precision.dtype).removeprefix("torch.")
            lora = self.cfg.model.lora_rank
            trains = f" ({trainable_parameters(self.raw_model):,} trainable: LoRA rank {lora})" if lora else ""
            print(f"{self.raw_model.num_params():,} parameters{trains} on {self.device} ({dtype}), "
                  f"{t.batch_size * t.gradient_accumulation_steps * block:,} tokens a step, "
                  f"{self.dist.world_size} rank(s)", flush=True)

    def _check_out_dir(self, out_dir: str) -> Path:
        """--out_dir, checked now (a bad path fails before any work) and made only once the run starts. Rank 0
        probes it (the ranks' probes at once would race, one removing what another just made) and every rank
        raises its one-line error."""
        problem = None
        if self.dist.is_main:
            try:
                check_dir(out_dir, "--out_dir")
            except UserError as e:
                problem = str(e)
        problems = [p for p in D.all_gather(problem, self.dist) if p]
        if problems:
            raise UserError(problems[0])
        return Path(out_dir).expanduser()

    def _record_config(self) -> None:
        """RUN/config.json, what `--resume` continues: written when the run starts, and again only when a resume
        changed one of the keys config.RESUME_MAY_CHANGE allows (run_config logged which)."""
        path, text = self.out_dir / RUN_CONFIG_FILE, json.dumps(self.cfg.to_dict(), indent=2).encode()
        if not path.is_file() or path.read_bytes() != text:
            write_atomic(path, text)

    def _warn_if_memory_is_short(self) -> None:
        """Before the optimizer state and the first step: the planner's estimate of a step's peak
        (nanopalm/memory.py) against the memory the device has free. A warning, never a refusal: an estimate can be
        wrong."""
        need = estimate(Setup.of_run(self.cfg, self.dist, self.precision, self.device), self.cfg.train.batch_size,
                        self.raw_model)
        free = free_memory(self.device)
        if self.dist.is_main and free is not None and need.total > free:
            warn(f"a training step needs about {need.total / GIB:.1f} GiB of {self.device} memory at its "
                 f"peak (the planner's estimate: parameters {need.parameters / GIB:.1f}, gradients "
                 f"{need.gradients / GIB:.1f}, optimizer {need.optimizer / GIB:.1f}, activations "
                 f"{need.activations / GIB:.1f}, temporary {need.temporary / GIB:.1f} GiB) but {free / GIB:.1f} GiB "
                 f"is free, so it may run out: {MEMORY_ADVICE}")

    def _replan_if_budget_changed(self, saved: TrainConfig) -> None:
        """A resume that changes max_iters or max_minutes drops the cooldown the clock planned for the old budget:
        the new budget plans its own (nanopalm/budget.py)."""
        t = self.cfg.train
        if self.state.cooldown_end and (saved.max_iters, saved.max_minutes) != (t.max_iters, t.max_minutes):
            self.state.cooldown_start = self.state.cooldown_end = 0
            if self.dist.is_main:
                print("the budget changed: the cooldown planned for the old one is dropped", flush=True)

    def _check_tokenizer(self, meta: dict) -> None:
        expected, found = meta.get("tokenizer_sha256"), self.tokenizer_sha256
        if expected and expected != found:
            raise UserError(f"the checkpoint's tokenizer ({meta.get('tokenizer')} {expected[:8]}) is not the one "
                            f"dataset {self.cfg.train.dataset!r} was prepared with ({self.data_meta['tokenizer']} "
                            f"{found[:8]}): prepare the data with --tokenizer_from=<the checkpoint's run directory>")

    # ---- the loop ----------------------------------------------------------------------------
    def train(self) -> str | None:
        """Train to the budget's end (max_iters, or the end of the cooldown the clock planned: nanopalm/budget.py),
        or until every rank stops together; returns why it stopped early: None (it did not), "max_minutes", or the
        name of the signal that asked it to stop (SIGTERM, SIGINT)."""
        t = self.cfg.train
        profiler = start_profiler(self.out_dir / "profile", self.device, self.dist.is_main) if t.profile else None
        stop = None
        while self.state.step < self.budget.end(self.state) and stop is None:
            self.iteration_started = time.perf_counter()
            if self.state.step % t.eval_interval == 0 and self.state.step != self.saved_step:
                self.evaluate_and_checkpoint()  # (not again at a step just saved or resumed from)
            self.rollback_points.keep(self.state, self.raw_model, self.optimizer, self.scaler)
            stop = self.train_step()
            self.state.seconds += time.perf_counter() - self.iteration_started
            if profiler is not None:
                profiler.step()
        if profiler is not None:
            profiler.stop()
        if stop is not None and self.dist.is_main:
            why = f"max_minutes={t.max_minutes} reached" if stop == "max_minutes" else f"{stop} received"
            print(f"{why} at step {self.state.step}: saving a checkpoint", flush=True)
        if self.state.step != self.saved_step:
            self.evaluate_and_checkpoint()
        if stop in (None, "max_minutes"):  # a signal wants out now: no whole-val score, no sample
            self.record_val_bpb_full()
            if t.sample_tokens and (self.dist.is_main or self.dist.sharded):  # FSDP: all ranks all-gather
                text = self.sample(t.sample_tokens)
                if self.dist.is_main:
                    print(f"--- a sample from the model at step {self.state.step} ---\n{text}\n---")
        self.logger.close()
        return stop

    def train_step(self) -> str | None:
        """One optimizer step (or a loss-spike rollback); returns why every rank stops after it, or None."""
        t, o = self.cfg.train, self.cfg.optim
        tick = time.perf_counter()
        fault_point("train_step")
        step = self.state.step
        lr = apply_schedule(self.optimizer, step, o, self.budget.plan(self.state).scale(step))
        micro_steps = micro_steps_at(step, t.gradient_accumulation_steps, o.batch_ramp)
        local_steps = micro_steps // self.dist.world_size
        data_step = step + self.state.data_offset
        loss_sum, learned = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        self.model.train()
        for i in range(local_steps):
            # Global micro-step i * world + rank: ranks are disjoint and together equal one process.
            micro_step = i * self.dist.world_size + self.dist.rank
            torch.manual_seed(step_seed(t.seed, step, micro_step))
            x, y = self.train_loader.get_batch(data_step, micro_step)
            with D.no_grad_sync(self.model, self.dist, i == local_steps - 1), nvtx("forward-backward", self.device):
                with self.precision.autocast(self.device):
                    loss = self.model(x, y).loss / local_steps  # the mean over micro-steps, not their sum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
            learned += (y != -1).sum()  # the tokens with a target: all of them, but an instruction's prompt
        self.scaler.unscale_(self.optimizer)
        grad_norm = D.clip_grad_norm(self.raw_model, o.grad_clip if o.grad_clip > 0 else math.inf, self.dist)
        loss_value, norm_value, step_tokens, stop, cooldown_due = self._sync_step_stats(loss_sum, grad_norm, learned)
        if self.spikes.is_spike(loss_value, norm_value, self.scaler.is_enabled()):
            self.rollback(loss_value, norm_value)
            return stop
        with nvtx("optimizer", self.device):
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        self.spikes.append(loss_value)
        self.state.step += 1
        self.state.tokens += step_tokens
        if cooldown_due and (cooldown := self.budget.decide(self.state)):
            self.logger.log({"step": self.state.step, "event": "cooldown", "end_step": cooldown.end})
            if self.dist.is_main:
                print(f"cooldown: {1 - o.cooldown:.0%} of max_minutes={t.max_minutes} gone at step {cooldown.start}; "
                      f"the lr falls to 0 by step {cooldown.end}, the run's end", flush=True)
        if self.state.step % t.log_interval == 0 or self.state.step == 1:
            self._log_train(loss_value, norm_value, lr, time.perf_counter() - tick, step_tokens)
        return stop

    def _sync_step_stats(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor, learned: torch.Tensor
                         ) -> tuple[float, float, int, str | None, bool]:
        """(mean loss over ranks, grad norm, tokens learned by all ranks, why to stop after this step or None,
        whether the clock says to plan the cooldown) on the host: the one host sync of a step. Under torchrun the
        clock's flags ride on the same all-reduce as the loss, so every rank stops (or plans its cooldown) at the
        same step when any rank's clock says so or any rank got SIGTERM / Ctrl-C (a rank that got none stops as for
        SIGTERM)."""
        seconds = self.seconds_trained()
        flags = torch.tensor([float(self.budget.time_up(seconds)), float(self.signals.signum is not None),
                              float(self.budget.cooldown_due(seconds, self.state))])
        sums = torch.stack([loss_sum.float(), grad_norm.float(), learned.float()])
        stats = torch.cat([sums, flags.to(self.device)])
        loss, norm, tokens, time_up, signalled, due = D.all_reduce_sum(stats, self.dist).tolist()
        stop = (self.signals.name or "SIGTERM") if signalled else "max_minutes" if time_up else None
        world = self.dist.world_size  # every rank holds the same global grad norm
        return loss / world, norm / world, round(tokens), stop, due > 0

    def seconds_trained(self) -> float:
        """Wall time in the training loop so far, every attempt of this run included (TrainState.seconds)."""
        return self.state.seconds + time.perf_counter() - self.iteration_started

    def _log_train(self, loss: float, grad_norm: float, lr: float, seconds: float, step_tokens: int) -> None:
        tokens_per_s = step_tokens / seconds
        row = {"step": self.state.step, "tokens": self.state.tokens, "seconds": self.seconds_trained(),
               "train_loss": loss, "lr": lr, "grad_norm": grad_norm, "ms_per_step": 1000 * seconds,
               "tokens_per_s": tokens_per_s}
        line = (f"step {self.state.step:6d} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.2f} | "
                f"{1000 * seconds:.0f} ms/step | {tokens_per_s:,.0f} tok/s")
        if self.peak_flops:
            # tokens_per_s counts the whole step's tokens, all ranks together: against all ranks' peak.
            row["mfu"] = mfu(self.flops_per_token, tokens_per_s, self.peak_flops * self.dist.world_size)
            line += f" | mfu {100 * row['mfu']:.1f}%"
        self.logger.log(row)
        if self.dist.is_main:
            print(line, flush=True)

    # ---- loss spikes (PaLM Section 5.1; nanopalm/spikes.py) ----------------------------------
    def rollback(self, loss: float, grad_norm: float) -> None:
        """Go back to a rollback point before the spike (or the newest checkpoint) and skip the batches
        around it, as PaLM did. Checkpoints and metrics rows after that point are of the abandoned path."""
        spike_step, spike_data_step = self.state.step, self.state.step + self.state.data_offset
        rollbacks = self.state.rollbacks + 1
        if rollbacks > MAX_ROLLBACKS:
            raise UserError(f"training diverged: {rollbacks} loss spikes (last at step {spike_step}, "
                            f"loss {loss}); lower --learning_rate or raise --spike_factor")
        restored = self.rollback_points.restore(spike_step, self.raw_model, self.optimizer, self.scaler)
        if restored is None:
            restored = self.checkpointer.load(self.checkpointer.latest_good(), self.raw_model, self.optimizer,
                                              self.scaler)
        self.checkpointer.discard_after(restored.step)
        # Resume the data stream spike_skip batches past the spike: step s now reads data step s + offset.
        offset = spike_data_step + self.cfg.train.spike_skip - restored.step
        # Time spent stays spent: max_minutes counts the abandoned steps too; a cooldown planned stays planned.
        self.state = dataclasses.replace(restored, rollbacks=rollbacks, data_offset=offset, seconds=self.state.seconds,
                                         cooldown_start=self.state.cooldown_start,
                                         cooldown_end=self.state.cooldown_end)
        self.saved_step = restored.step  # a point at an eval step is kept right after that step's checkpoint
        self.optimizer.zero_grad(set_to_none=True)
        self.spikes.clear()
        self.logger.rewind(restored.step)
        self.logger.log({"step": restored.step, "tokens": self.state.tokens, "event": "loss_spike",
                         "spike_step": spike_step, "loss": loss, "grad_norm": grad_norm, "data_offset": offset,
                         "skipped_data_steps": [restored.step + restored.data_offset, restored.step + offset]})
        if self.dist.is_main:
            print(f"loss spike at step {spike_step} (loss {loss:.4f}, grad norm {grad_norm:.2f}): rolled back "
                  f"to step {restored.step}, skipping to data step {restored.step + offset}", flush=True)

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
            with self.precision.autocast(self.device):
                ce = self.model(x, y).ce
            if i < t.eval_iters:
                total += ce
        return D.all_reduce_sum(total, self.dist).item() / t.eval_iters

    def evaluate_and_checkpoint(self) -> None:
        """Evaluate, log (last_eval too), checkpoint (a finite val loss only) and redraw loss.png."""
        val_loss = self.evaluate()
        val_bpb = val_loss / math.log(2) / self.data_meta["bytes_per_token_val"]
        self.state.best_val = min(self.state.best_val, val_loss)
        row = {"step": self.state.step, "tokens": self.state.tokens, "seconds": self.seconds_trained(),
               "val_loss": val_loss, "val_bpb": val_bpb}
        self.logger.log(row)
        self.last_eval = row
        if self.dist.is_main:
            print(f"step {self.state.step:6d} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}", flush=True)
        if math.isfinite(val_loss):
            self.save(val_loss)
        if self.dist.is_main:
            plot_runs([self.out_dir], self.out_dir / "loss.png")

    def record_val_bpb_full(self) -> dict | None:
        """After training: score the final model on the whole val split and log `val_bpb_full` (with
        val_loss_full, val_tokens_full, val_bytes_full), when the split has at most full_val_tokens tokens (0 =
        never). Under torchrun every rank scores its share of the windows (DDP and FSDP2 alike); rank 0 prints
        and writes. Returns the logged row (None when skipped)."""
        t, info, val_tokens = self.cfg.train, self.dist, self.data_meta["val_tokens"]
        if not t.full_val_tokens or val_tokens > t.full_val_tokens:
            if t.full_val_tokens and info.is_main:
                print(f"whole-val evaluation skipped: the val split has {val_tokens:,} tokens, more than "
                      f"full_val_tokens={t.full_val_tokens:,} (raise it, or run eval.py)", flush=True)
            return None
        started = time.perf_counter()
        if info.is_main:  # tens of seconds on a CPU: say what the wait is for (the bar, on stderr, follows)
            print(f"scoring the whole val split ({val_tokens:,} tokens) for val_bpb_full...", flush=True)
        if self.instructions:  # every val example once, its responses alone
            sums = score_examples(self.model, self.val_loader, self.tokenizer,
                                  lambda: self.precision.autocast(self.device), info.rank, info.world_size)
            nats, tokens, size = D.all_reduce_sum(torch.tensor(sums, dtype=torch.float64), info).tolist()
            score = Score(nats, round(tokens), round(size))
        else:
            scorer = Scorer(self.model, self.cfg.model.block_size, t.batch_size, self.device, self.precision, info=info)
            score = scorer.split(self.tokenizer, self.data_dir, "val", progress=True)
        row = {"step": self.state.step, "tokens": self.state.tokens, "val_loss_full": score.loss,
               "val_bpb_full": score.bits_per_byte, "val_tokens_full": score.tokens, "val_bytes_full": score.bytes}
        self.logger.log(row)
        if info.is_main:
            print(f"step {self.state.step:6d} | {describe('whole val split', score)} | "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
        return row

    def save(self, val_loss: float) -> None:
        meta = {"config": self.cfg.to_dict(), "tokenizer": self.data_meta["tokenizer"],
                "tokenizer_sha256": self.tokenizer_sha256,
                "rng": "derived from (seed, step, micro-step) each micro-step; nothing to restore"}
        if self.lora_base is not None:
            meta["lora_base"] = self.lora_base
        self.checkpointer.save(self.state, val_loss, self.raw_model, self.optimizer, self.scaler, meta)
        self.saved_step = self.state.step

    # ---- the rest ----------------------------------------------------------------------------
    def sample(self, max_new_tokens: int) -> str:
        """The end-of-training sample, as sample.py draws one (temperature 0.8, top-k 200, the run's seed)."""
        self.raw_model.eval()
        with self.precision.autocast(self.device, for_generation=True):
            return generate_text(self.raw_model, self.tokenizer, self.cfg.train.sample_prompt, max_new_tokens,
                                 temperature=0.8, top_k=200, seed=self.cfg.train.seed)


def train(cfg: RunConfig) -> dict:
    """Run training to the end; returns the last evaluation ({step, tokens, val_loss, val_bpb}).
    SIGTERM or Ctrl-C: the step in progress finishes, a checkpoint is saved, then Interrupted is raised."""
    try:
        trainer = Trainer(cfg)
        with trainer.signals:
            stop = trainer.train()
        if stop not in (None, "max_minutes"):
            raise Interrupted(f"stopped by {stop} at step {trainer.state.step}, checkpoint saved: continue with "
                              f"--resume --out_dir={trainer.out_dir}", 128 + signal.Signals[stop].value)
        return trainer.last_eval
    finally:
        D.shutdown_distributed()
