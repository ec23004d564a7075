"""The standing mutation check: small, named breaks of the code that matters most, each of which the tests that
cover it must catch. For each mutant it edits one file in place, runs only its tests (pytest -x), and restores the
file; a mutant is killed when a test fails. How a change to a core file is checked (not in .ci/run: it takes
minutes); docs/RELIABILITY.md keeps the list and the last result.

    python scripts/mutation_check.py                         # every mutant; writes docs/results/mutation_check.txt
    python scripts/mutation_check.py --only=causal_mask,z_loss_in_forward

A script rather than mutmut or cosmic-ray: those generate thousands of random mutants and run the suite (or what
coverage selects) for each, hours on 2 cores; these are the ~30 breaks the suite promises to catch, each with the
tests that should, in minutes. It refuses to run over uncommitted changes to the files it mutates (so that a file it
restores is the committed one), and restores each file even when interrupted.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or "file -k expr"


def t(*ids: str) -> tuple[str, ...]:
    return ids


MUTANTS = [
    # the model (PaLM Section 2)
    Mutant("causal_mask", "nanopalm/model.py", "is_causal=mask is None and T > 1", "is_causal=False",
           t("tests/test_model.py::test_causality")),
    Mutant("rope_pairing", "nanopalm/model.py", "a, b = x.chunk(2, dim=-1)", "a, b = x[..., ::2], x[..., 1::2]",
           t("tests/test_model.py::test_rope_is_the_complex_rotation_of_each_pair", "tests/test_fused.py")),
    Mutant("rope_angle_sign", "nanopalm/model.py", "torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)",
           "torch.cat([a * cos - b * sin, b * cos - a * sin], dim=-1)",
           t("tests/test_model.py::test_rope_preserves_norm_and_is_relative")),
    Mutant("kv_cache_position", "nanopalm/model.py", "rope = (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T])",
           "rope = (self.rope_cos[:T], self.rope_sin[:T])", t("tests/test_generate.py -k cached")),
    Mutant("logit_scaling", "nanopalm/model.py", "x = x * c.d_model ** -0.5", "x = x",
           t("tests/test_model.py::test_logits_are_scaled_by_inverse_sqrt_d_model")),
    Mutant("z_loss_in_forward", "nanopalm/model.py",
           "loss, ce = linear_cross_entropy(x, self.output_weight(), targets, c.z_loss)",
           "loss, ce = linear_cross_entropy(x, self.output_weight(), targets, 0.0)",
           t("tests/test_model.py::test_the_models_loss_is_torchs_cross_entropy_plus_the_z_loss")),
    Mutant("dropout_in_eval", "nanopalm/model.py", "dropout_p=self.dropout if self.training else 0.0",
           "dropout_p=self.dropout", t("tests/test_model.py::test_eval_mode_turns_dropout_off")),
    Mutant("parallel_sum", "nanopalm/model.py", "return x + self.drop(self.attn(q, k, v, pos) + self.mlp(hidden))",
           "return x + self.drop(self.mlp(hidden))", t("tests/test_hf.py -k reproduces")),
    # the optimizer (PaLM Section 5, T5X)
    Mutant("adafactor_layouts_wired", "nanopalm/optim.py", "layouts=matrix_layouts(model))", "layouts=None)",
           t("tests/test_distributed.py::test_fsdp2_trains_with_palms_adafactor_like_one_process",
             "tests/test_optim.py::test_build_optimizer_gives_adafactor_each_palm_matrix_its_own_statistics")),
    Mutant("update_clipping", "nanopalm/optim.py", '(ru / group["clip_threshold"]).clamp(min=1.0)',
           '(ru / group["clip_threshold"]).clamp(min=1.0) ** 0', t("tests/test_optim.py -k adafactor")),
    Mutant("parameter_scaling", "nanopalm/optim.py", 'lr * rp.clamp(min=group["eps2"])', "lr",
           t("tests/test_optim.py -k adafactor")),
    Mutant("beta2_ramp", "nanopalm/optim.py", 'beta2 = 1.0 - k ** -group["beta2_decay"]', "beta2 = 0.999",
           t("tests/test_optim.py -k adafactor")),
    Mutant("lr_squared_decay", "nanopalm/optim.py", 'group["weight_decay"] = lr', 'group["weight_decay"] = lr * lr',
           t("tests/test_optim.py -k decay")),
    Mutant("decay_only_matrices", "nanopalm/optim.py", '{"params": [p for p in params if p.dim() >= 2]',
           '{"params": [p for p in params if p.dim() >= 1]', t("tests/test_optim.py -k groups")),
    Mutant("batch_ramp", "nanopalm/optim.py", "        if step >= start:\n            mult = m",
           "        if step > start:\n            mult = m", t("tests/test_optim.py -k ramp")),
    Mutant("palm_schedule", "nanopalm/optim.py",
           "math.sqrt(cfg.palm_constant_steps / max(step, cfg.palm_constant_steps))",
           "(cfg.palm_constant_steps / max(step, cfg.palm_constant_steps))", t("tests/test_optim.py -k schedule")),
    # the loop
    Mutant("accumulation_scaling", "nanopalm/trainer.py", "loss = self.model(x, y).loss / local_steps",
           "loss = self.model(x, y).loss",
           t("tests/test_trainer.py::test_gradient_accumulation_gives_the_same_gradient")),
    Mutant("resume_data_offset", "nanopalm/trainer.py", "data_step = step + self.state.data_offset", "data_step = step",
           t("tests/test_trainer.py::test_a_loss_spike_rolls_back_and_skips_batches")),
    Mutant("rollback_distance", "nanopalm/spikes.py", "if p.state.step <= spike_step - self.distance]",
           "if p.state.step <= spike_step]",
           t("tests/test_trainer.py::test_rollback_points_go_back_about_distance_steps_as_palm_did")),
    Mutant("spike_skip", "nanopalm/trainer.py", "offset = spike_data_step + self.cfg.train.spike_skip - restored.step",
           "offset = spike_data_step - restored.step", t("tests/test_trainer.py -k spike")),
    # checkpoints and data
    Mutant("checksum_verification", "nanopalm/checkpoint.py",
           "if i % share[1] == share[0] and atomic.sha256(file) != expected:",
           "if i % share[1] == share[0] and False:", t("tests/test_checkpoint.py -k corrupt")),
    Mutant("non_finite_refused", "nanopalm/checkpoint.py",
           'problem = non_finite(step, {"model": model_state, "trainer": trainer_state})', "problem = None",
           t("tests/test_checkpoint.py -k non_finite")),
    Mutant("batch_offsets", "nanopalm/data.py", "return np.random.Philox(key).random_raw(self.batch_size)",
           "return np.random.Philox(key).random_raw(self.batch_size) * 0", t("tests/test_data.py")),
    # evaluation
    Mutant("eval_byte_counting", "nanopalm/evaluate.py", "        start = end + 1\n    return total",
           "        start = end\n    return total", t("tests/test_eval.py -k bytes")),
    Mutant("greedy_is_all_tokens", "nanopalm/harness.py", "all_greedy = [bool(g.all())", "all_greedy = [bool(g.any())",
           t("tests/test_eval_harness.py::test_a_continuation_is_greedy_only_if_every_one_of_its_tokens_is")),
    Mutant("scored_counts", "nanopalm/evaluate.py", "scored += counted", "scored += size * self.block_size",
           t("tests/test_eval.py::test_eval_py_scores_the_whole_val_split")),
    # errors
    Mutant("oom_message", "nanopalm/errors.py", 'return f"out of {where}{f', 'return f"error {where}{f',
           t("tests/test_reliability.py::test_each_allocators_out_of_memory_error_is_recognised")),
    # finetuning
    Mutant("lora_b_starts_at_zero", "nanopalm/model.py", "nn.init.zeros_(module.B[name])",
           "nn.init.normal_(module.B[name])",
           t("tests/test_lora.py::test_step_zero_of_a_lora_run_gives_the_base_models_logits_exactly")),
    Mutant("lora_base_frozen", "nanopalm/model.py", "param.requires_grad_(is_adapter(name))",
           "param.requires_grad_(True)",
           t("tests/test_lora.py::test_lora_accumulation_gives_the_same_adapter_gradient")),
    Mutant("lora_merge_scale", "nanopalm/lora.py", "[self.scale * self.B[n] @ self.A[n]", "[self.B[n] @ self.A[n]",
           t("tests/test_lora.py::test_merged_weights_give_the_unmerged_models_logits")),
    Mutant("instruct_mask", "nanopalm/instruct.py", "np.where(learned[1:], ids[1:], -1)",
           "np.where(learned[:-1], ids[1:], -1)", t("tests/test_instruct.py -k padded")),
]


def committed(paths: set[str]) -> None:
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *sorted(paths)], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.strip()
    if dirty:
        sys.exit(f"error: commit (or stash) your changes to the files this check mutates first:\n{dirty}")


def pytest_args(tests: tuple[str, ...]) -> list[str]:
    args = []
    for spec in tests:
        args += spec.split(" ", 2) if " -k " in spec else [spec]
    return args


def run(mutant: Mutant, timeout: int) -> tuple[str, float, str]:
    """('killed' | 'SURVIVED' | an error, seconds, the first failing test)."""
    path = REPO / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        return f"STALE: its snippet occurs {original.count(mutant.old)} times in {mutant.path}", 0.0, ""
    started = time.perf_counter()
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                                 *pytest_args(mutant.tests)], cwd=REPO, capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timed out)", time.perf_counter() - started, ""
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - started
    if result.returncode == 5:
        return "ERROR: its tests select nothing", seconds, ""
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.M)
    return ("killed" if result.returncode else "SURVIVED"), seconds, failed[0] if failed else ""


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per mutant's tests")
    p.add_argument("--output", type=Path, default=REPO / "docs" / "results" / "mutation_check.txt")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        sys.exit(f"error: no mutant {', '.join(sorted(unknown))}; known: {', '.join(m.name for m in MUTANTS)}")
    chosen = [m for m in MUTANTS if not names or m.name in names]
    committed({m.path for m in chosen})
    lines = [f"$ python scripts/mutation_check.py{' --only=' + args.only if args.only else ''}",
             f"{len(chosen)} mutants; a mutant is killed when one of its tests fails", ""]
    print("\n".join(lines), flush=True)
    survived = 0
    for mutant in chosen:
        verdict, seconds, test = run(mutant, args.timeout)
        survived += verdict != "killed" and not verdict.startswith("killed")
        line = f"{mutant.name:<28} {verdict:<10} {seconds:6.1f} s  {test}"
        print(line, flush=True)
        lines.append(line)
    lines += ["", f"{len(chosen) - survived} of {len(chosen)} killed"]
    print(lines[-1])
    if not names:
        args.output.write_text("\n".join(lines) + "\n")
    if survived:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
