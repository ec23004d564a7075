"""How long a run trains, and how its learning rate ends: max_iters, max_minutes and the cooldown.

A run ends at max_iters or once max_minutes of training have passed, whichever comes first. With
`--cooldown=F` the learning rate the schedule gives is multiplied by a factor that falls linearly from 1 to 0
over the last fraction F of the run (warmup-stable-decay, Hägele et al. 2024, "Scaling Laws and
Compute-Optimal Training Beyond Fixed Training Durations"), so the run ends annealed whichever budget ends it.
PaLM's 1/sqrt(k) never anneals (Section 5): cut anywhere, it stops mid-schedule.

Deterministic resume: by steps, the cooldown is the last round(F * max_iters) steps, a function of the config.
By time, the clock decides once: the first step after (1 - F) of max_minutes has passed fixes the cooldown's
first and last step from the speed so far (s steps took (1 - F) T, so the remaining F T is about s F / (1 - F)
steps). Every rank's "the time has come" flag rides the step's one all-reduce, so all ranks decide at the same
step. The two steps go into TrainState, so into every checkpoint: a resumed run replays the decision and never
asks the clock again; the lr is a pure function of (step, recorded state) as before. The clock decides only
where it shortens the run (a run that will reach max_iters in time keeps its step cooldown). max_minutes
still stops a run that slows down in its cooldown, a few steps early, its lr near 0 by then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanopalm.checkpoint import TrainState


@dataclass(frozen=True)
class Cooldown:
    start: int  # the first step whose lr is scaled down
    end: int  # the step the run ends at (the factor would reach 0 there)

    def scale(self, step: int) -> float:
        """The factor on the schedule's lr at `step`: 1 before start, then (end - step) / (end - start)."""
        if step < self.start or self.end == self.start:
            return 1.0
        return max(0.0, (self.end - step) / (self.end - self.start))


@dataclass(frozen=True)
class Budget:
    max_iters: int
    max_minutes: float  # 0: no time budget
    cooldown: float  # the fraction of the run the lr falls over (0: none)

    def plan(self, state: TrainState) -> Cooldown:
        """The cooldown in force: the clock's, once it decided (recorded in state), else the last steps."""
        if state.cooldown_end:
            return Cooldown(state.cooldown_start, state.cooldown_end)
        length = max(1, round(self.cooldown * self.max_iters)) if self.cooldown else 0
        return Cooldown(self.max_iters - length, self.max_iters)

    def end(self, state: TrainState) -> int:
        """The step the run ends at, unless max_minutes stops it first."""
        return self.plan(state).end

    def time_up(self, seconds: float) -> bool:
        return self.max_minutes > 0 and seconds > 60 * self.max_minutes

    def cooldown_due(self, seconds: float, state: TrainState) -> bool:
        """Whether the clock says it is time to plan the cooldown (it has not yet planned one)."""
        timed = self.cooldown > 0 and self.max_minutes > 0 and not state.cooldown_end
        return timed and seconds > (1 - self.cooldown) * 60 * self.max_minutes

    def decide(self, state: TrainState) -> Cooldown | None:
        """At state.step, (1 - F) of the time is gone: record a cooldown over the rest of it, at the speed so
        far, where that ends the run before the step plan does. Returns the recorded cooldown, or None."""
        step, planned = state.step, self.plan(state)
        end = step + max(1, round(step * self.cooldown / (1 - self.cooldown)))
        if end >= planned.end or step >= planned.start:  # max_iters comes first, or its cooldown has begun
            return None
        state.cooldown_start, state.cooldown_end = step, end
        return Cooldown(step, end)
