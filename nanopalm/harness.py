"""The lm-evaluation-harness (PyPI `lm-eval`) on a nanoPALM model: an `lm_eval.api.model.LM` registered
under the name `nanopalm`.

    python eval.py --out_dir=RUN --tasks=lambada_openai,hellaswag --num_fewshot=0 --limit=200  # simple_evaluate
    python -m nanopalm.harness run --model nanopalm --model_args run=RUN --tasks hellaswag   # the harness's CLI

The second line is the harness's own command line (every flag of `lm-eval run`), with this module imported
first so that `--model nanopalm` is known: lm-eval 0.4.13 finds models only in its own registry, and its
`--include_path` loads tasks, not models. Importing this module registers the model.

The three request types, on the run's tokenizer, on any device:
  loglikelihood          log P(continuation | context), summed over the continuation's tokens, and whether
                         greedy decoding would produce it: batched, longest first, from the logits in fp32;
  loglikelihood_rolling  log P(text) of a whole document, every token scored once: evaluate.py's windows
                         (stride=N in --model_args for sliding windows), the same number as `eval.py --stride`;
  generate_until         nanopalm.sampling.generate with its KV cache, stopped by the stop strings, the end-
                         of-document token or max_gen_toks; greedy unless do_sample. Prompts of equal length
                         and equal settings are generated as one batch.
An empty context is the end-of-document token: the start of a document.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import lm_eval.models  # noqa: F401  (the harness's own models first: its lookup imports them only into an empty registry)
import numpy as np
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from tqdm import tqdm

from nanopalm.checkpoint import load_model_and_tokenizer
from nanopalm.device import inference_precision, pick_device
from nanopalm.errors import UserError, run_cli
from nanopalm.evaluate import Scorer
from nanopalm.model import PaLM
from nanopalm.sampling import check_sampling_args, generate
from nanopalm.tokenizer import Tokenizer

MODEL_NAME = "nanopalm"
MAX_GEN_TOKS = 256  # the harness's default for generate_until
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


class NanoPalmLM(TemplateLM):
    """A nanoPALM model for the harness. From a run (`run=DIR`, its best checkpoint, as sample.py) or from a
    model and tokenizer in memory. batch_size: sequences per forward; stride: loglikelihood_rolling's
    sliding-window stride (default: disjoint windows of block_size); dtype: auto = bf16 autocast on CUDA,
    fp32 elsewhere."""

    def __init__(self, run: str | None = None, model: PaLM | None = None, tokenizer: Tokenizer | None = None,
                 device: str | None = "auto", dtype: str = "auto", batch_size: int | str | None = 16,
                 stride: int | None = None, seed: int = 1234, max_batch_size: int | None = None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise UserError(f"unknown nanopalm model argument(s) {', '.join(sorted(unknown))}: it takes run, device, "
                            "dtype, batch_size, stride, seed")
        if (run is None) == (model is None) or (model is None) != (tokenizer is None):
            raise ValueError("give either run= (a run directory) or both model= and tokenizer=")
        self._device = pick_device(device or "auto")
        if run is not None:
            model, tokenizer, checkpoint = load_model_and_tokenizer(run, self._device)
            self.source = {"run": str(checkpoint.run_dir), "checkpoint": str(checkpoint.path), "step": checkpoint.step}
        else:
            self.source = {"run": None}
        self.model, self.tokenizer = model.eval(), tokenizer
        self.precision = inference_precision(dtype, self._device)
        self.batch_size = positive_int("batch_size", 16 if batch_size in (None, "auto") else batch_size)
        self.max_length = model.config.block_size
        self.scorer = Scorer(self.model, self.max_length, self.batch_size, self._device, self.precision,
                             None if stride is None else positive_int("stride", stride))
        self.seed = int(seed)

    # ---- what TemplateLM asks for ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def get_model_info(self) -> dict:
        """Added to the results' config by simple_evaluate."""
        dtype = str(self.precision.dtype).removeprefix("torch.")
        return {**self.source, "parameters": self.model.num_params(), "block_size": self.max_length,
                "dtype": dtype, "device": str(self._device), "stride": self.scorer.stride or self.max_length}

    # ---- loglikelihood -----------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context tokens, continuation tokens). The context is cut from
        the left to fit block_size; a continuation longer than block_size cannot be scored."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        for first in range(0, len(order), self.batch_size):
            batch = order[first:first + self.batch_size]
            inputs, targets = [], []
            for i in batch:
                (context, continuation), context_ids, continuation_ids = requests[i]
                if len(continuation_ids) > self.max_length:
                    raise UserError(f"a continuation of {len(continuation_ids)} tokens is longer than the model's "
                                    f"block_size {self.max_length}: this task needs a longer context")
                inputs.append((context_ids + continuation_ids)[-(self.max_length + 1):-1])
                targets.append(continuation_ids)
            width = max(len(row) for row in inputs)
            x = torch.tensor([row + [self.eot_token_id] * (width - len(row)) for row in inputs], device=self._device)
            with self.precision.autocast(self._device):
                logits = self.model(x).logits
            # Only the continuations' positions, in fp32: the log-softmax of bf16 logits would lose digits.
            rows = torch.cat([logits[r, len(inputs[r]) - len(t):len(inputs[r])] for r, t in enumerate(targets)])
            logprobs = rows.float().log_softmax(-1)
            target = torch.tensor([t for ts in targets for t in ts], device=self._device)
            picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
            greedy = logprobs.argmax(-1) == target
            sizes = [len(t) for t in targets]
            sums = [float(v) for v in torch.stack([p.sum() for p in picked.split(sizes)]).cpu()] if sizes else []
            all_greedy = [bool(g.all()) for g in greedy.cpu().split(sizes)]
            for r, i in enumerate(batch):
                results[i] = (sums[r], all_greedy[r])
                self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(batch))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log P(text) of each whole text, every token scored once after an end-of-document token."""
        results = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = request.args
            nats, _ = self.scorer.score(np.array(self.tok_encode(text), dtype=np.int64), self.eot_token_id)
            results.append(-nats)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), -nats)
        return results

    # ---- generation --------------------------------------------------------------------------------
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = defaultdict(list)  # same prompt length, same settings: one batch
        prompts = []
        for i, request in enumerate(requests):
            context, kwargs = request.args
            prompts.append(self.tok_encode(context) or [self.eot_token_id])
            groups[len(prompts[i]), json.dumps(kwargs, sort_keys=True, default=str)].append(i)
        generator = torch.Generator(self._device).manual_seed(self.seed)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for members in groups.values():
            until, settings = generation_settings(requests[members[0]].args[1])
            for first in range(0, len(members), self.batch_size):
                batch = members[first:first + self.batch_size]
                texts = self._generate([prompts[i] for i in batch], until, settings, generator)
                for i, text in zip(batch, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def _generate(self, prompts: list[list[int]], until: list[str], settings: dict,
                  generator: torch.Generator) -> list[str]:
        """Continue prompts of one length until each has a stop string or the end-of-document token."""
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)

        def on_token(tokens: torch.Tensor) -> bool:
            for r, token in enumerate(tokens.tolist()):
                if not done[r]:
                    if token == self.eot_token_id:
                        done[r] = True
                    else:
                        new[r].append(token)
                        text = self.tokenizer.decode(new[r])
                        done[r] = any(stop in text for stop in until)
            return all(done)

        x = torch.tensor(prompts, device=self._device)
        with self.precision.autocast(self._device, for_generation=True):
            generate(self.model, x, eot_id=self.eot_token_id, generator=generator, on_token=on_token,
                     vocab_size=self.tokenizer.vocab_size, **settings)
        return [cut_at_stop(self.tokenizer.decode(tokens), until) for tokens in new]


def positive_int(name: str, value: int | str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise UserError(f"{name}={value!r} must be a positive integer")
    return number


def generation_settings(kwargs: dict) -> tuple[list[str], dict]:
    """A task's generation_kwargs -> (stop strings, keyword arguments of sampling.generate)."""
    unknown = sorted(set(kwargs) - set(GENERATION_KEYS))
    if unknown:
        raise UserError(f"generation setting(s) {', '.join(unknown)} are not supported by the nanopalm model: it "
                        f"takes {', '.join(GENERATION_KEYS)}")
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    sampling = bool(kwargs.get("do_sample", False))
    temperature = kwargs.get("temperature")
    temperature = (1.0 if temperature is None else float(temperature)) if sampling else 0.0  # greedy unless do_sample
    top_k, top_p = kwargs.get("top_k"), kwargs.get("top_p")
    check_sampling_args(temperature, top_k, top_p)
    settings = {"max_new_tokens": positive_int("max_gen_toks", kwargs.get("max_gen_toks", MAX_GEN_TOKS)),
                "temperature": temperature, "top_k": top_k, "top_p": top_p}
    return until, settings


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text before the first stop string (what the harness scores)."""
    for stop in until:
        text = text.split(stop)[0]
    return text


if MODEL_NAME not in model_registry:  # once, whether imported or run as `python -m nanopalm.harness`
    register_model(MODEL_NAME)(NanoPalmLM)


# ---- tasks ---------------------------------------------------------------------------------------------
def task_manager(names: list[str], include_path: str | None = None):
    """The harness's TaskManager that knows every task of `names`; an unknown one is a UserError. Indexing
    the harness's own ~15k task files takes seconds: tasks that are all in include_path skip it."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include_path {include_path} is not a directory: give a directory of task YAML files")
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or set(names) - set(manager.all_tasks):
        manager = TaskManager(include_path=include_path)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}: `lm-eval ls tasks` lists the harness's tasks, "
                        "--include_path DIR adds your own YAML tasks")
    return manager


def run_tasks(lm: NanoPalmLM, names: list[str], manager, num_fewshot: int | None = None,
              limit: int | None = None) -> dict:
    """simple_evaluate on `lm`: the harness's results as plain JSON data (per-sample records left out), its
    table printed."""
    from huggingface_hub.errors import LocalEntryNotFoundError
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    try:
        results = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                                  log_samples=False, batch_size=lm.batch_size, device=str(lm.device))
    except (ConnectionError, LocalEntryNotFoundError) as e:  # datasets' and the hub client's "cannot reach"
        raise UserError(f"a task's data is on the Hugging Face Hub, which cannot be reached from here "
                        f"({str(e).splitlines()[0]}): connect (or fill the datasets cache), or run tasks whose data "
                        "is local, e.g. the built-in ones: python -m nanopalm.shakespeare_tasks DIR, then "
                        "--include_path DIR") from None
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return json.loads(json.dumps(results, default=handle_non_serializable))


def main(argv: list[str]) -> None:
    """The harness's own command line (it reads sys.argv itself), with `--model nanopalm` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
