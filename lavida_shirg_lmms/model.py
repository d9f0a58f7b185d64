"""The lmms-eval model `lavida_shirg`: one LaViDa-SHIRG variant, batched masked-diffusion answers for
`generate_until` tasks and Monte Carlo likelihoods for `loglikelihood` (multiple-choice) tasks, one process or
several (`accelerate launch`).

    lmms_eval --model lavida_shirg --tasks textvqa_val --batch_size 8 \\
        --model_args pretrained=FOLDER,dtype=bfloat16,selection_method=shirg-fixed,selection_budget=768

model_args (anything else is refused, naming the key):

| key | meaning (default) |
| --- | --- |
| pretrained | a lavida_shirg model folder of either backbone (converted checkpoint, or a train.py output folder with merged/) |
| dtype | auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16 |
| device | cpu, cuda, cuda:N (cuda when available); with several processes each takes accelerate's device |
| variant | an eval.py variant string, `METHOD[@BUDGET][:OPTION=VALUE]...` (shirg_tools.variants) |
| selection_method, selection_budget, OPTION | the same variant as separate keys (pooled); OPTION: a SHIRG option (its config field name) |
| gen_length | answer tokens for every task (default: the task's gen_kwargs max_new_tokens, else eval.py's per-task length) |
| block_length, remasking | LLaDA only: semi-autoregressive block (one block of gen_length); remasking (the model's) |
| alg | Dream only: origin, maskgit_plus, topk_margin, entropy (the folder's generation config: topk_margin) |
| step_ratio, schedule, schedule_shift | steps = int(gen_length x step_ratio) (1.0), schedule (LLaDA: shift; Dream: its own timesteps, uniform), shift (LaViDa's 3) |
| temperature | sampler (task's gen_kwargs: greedy unless do_sample) |
| use_prefix_cache, prefix_lm_mask, kv_cache_dtype | prefix handling (true, false, none) |
| mc_num, mc_batch_size, seed | loglikelihood: Monte Carlo masks per continuation (16), rows per forward (mc_num), seed (0) |

A Dream folder samples as LaViDa's Dream evaluation (eval/run_dream.sh: `alg=topk_margin,prefix_lm=True`, Dream's
`top_k` 50 from the folder's generation config): timesteps for one step per answer token, of which
int(gen_length x step_ratio) run (LaViDa's step_ratio), Dream's own counts unless schedule=shift (LaViDa's
run_coco_dream.sh: step_ratio=0.5,schedule=shift,schedule_shift=0.33); a task's gen_kwargs top_p / top_k reach
Dream's filters, which act on the confidences even when greedy (top_p 0 is refused: it would tie every confidence).
LLaDA-only keys on a Dream folder and alg on a LLaDA one are refused, naming the folder's backbone.

`--batch_size N` (any N >= 1) batches the sampler. Answer length per request: model_args gen_length, else the
task's gen_kwargs max_new_tokens, else the length eval.py uses for the task its name starts with
(shirg_tools.eval_tasks.TASKS: textvqa 16, docvqa 32, infovqa 32, chartqa 16). gen_kwargs `until` is ignored,
as LaViDa's own lmms-eval model ignores it (the whole answer is decoded, as in eval.py); `do_sample` with `temperature` samples (Gumbel-max); `num_beams` > 1 is refused, and so are
`top_p` / `top_k` when sampling a LLaDA folder (its sampler has no beams or filtering); other keys are ignored. The prompt is the
task's context in LaViDa's chat template with the document's images first (`processor.build_prompt`).

lmms-eval's command line catches every exception of an evaluation, logs it and exits 0. Under that command line,
this plugin's refusals (bad model_args, a request it cannot run, loglikelihood) end the process instead: SystemExit
with `error: lavida_shirg: ...` on stderr and exit status 1, so a script sees the failure. Called from Python
(`lmms_eval.evaluator.simple_evaluate`, tests), they stay ValueError / NotImplementedError.
"""

import atexit
import functools
import math
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
import lmms_eval
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from lavida_shirg.configuration_lavida_shirg import SELECTION_METHODS
from lavida_shirg.dream_sampler import DREAM_ALGORITHMS
from lavida_shirg.masked_diffusion import LAVIDA_SCHEDULE_SHIFT, REMASKING_STRATEGIES, resolve_sampler_arguments
from lavida_shirg.prefix_cache import STORAGE_DTYPES
from lavida_shirg_lmms import MODEL_NAME
from shirg_tools.eval_tasks import TASKS
from shirg_tools.inference import (DEFAULT_STEP_RATIO, check_device, check_dream_generation, check_sampling,
                                   check_variant, default_schedule, folder_is_dream, generate_answer_ids,
                                   generation_settings, load_pretrained, model_folder, resolve_dtype)
from shirg_tools.variants import OPTION_FIELDS, option_names_help, parse_variant

ARGUMENTS = ("pretrained", "dtype", "device", "batch_size", "variant", "selection_method", "selection_budget",
             "gen_length", "block_length", "step_ratio", "schedule", "schedule_shift", "temperature", "remasking",
             "alg", "use_prefix_cache", "prefix_lm_mask", "kv_cache_dtype", "mc_num", "mc_batch_size", "seed")
# gen_kwargs the sampler cannot honour when sampling (with greedy decoding they change nothing)
SAMPLING_ONLY_GEN_KWARGS = {"top_p": "the sampler draws from the whole distribution (no nucleus filtering)",
                            "top_k": "the sampler draws from the whole distribution (no top-k filtering)"}
# loglikelihood requests: LaViDa's Monte Carlo estimate with its lmms-eval's mc_num
DEFAULT_MC_NUM = 16


def generate_answers(model, processor, images: list, prompts: list, variant, generation: dict) -> list:
    """Decoded answers to `prompts` (images[i]: the list of images of prompt i) under `variant` with the sampler
    arguments `generation`: the one place the plugin calls the model."""
    inputs = processor(images=images, text=prompts, **variant.call_settings()).to(model.device)
    answers = generate_answer_ids(model, {**inputs, **generation})  # the inputs carry their selection settings
    return processor.decode_answers(answers.cpu())


def score_continuation(model, processor, images: list, prompt: str, continuation: str, variant, mc_num: int,
                       batch_size: int, seed: int) -> float:
    """log p(continuation | images, prompt) by the model's Monte Carlo estimate (`log_likelihood`), seeded."""
    inputs = processor(images=[images], text=[prompt], **variant.call_settings()).to(model.device)
    answer = processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
    generator = torch.Generator(device=model.device).manual_seed(seed)
    return float(model.log_likelihood(answer.to(model.device), **inputs, mc_num=mc_num, batch_size=batch_size,
                                      generator=generator)[0])


def destroy_process_group():
    """Destroy the default process group, if any. Registered at exit by multi-process runs: left to interpreter
    teardown, a gloo group's worker threads abort the process about one run in four on 2 busy CPU cores ("terminate
    called without an active exception", pytorch/pytorch#190489); destroyed first, none did in 30 runs."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


LMMS_EVAL_CLI = (os.path.join(os.path.dirname(os.path.abspath(lmms_eval.__file__)), "__main__.py"), "cli_evaluate")


def _under_lmms_eval_cli() -> bool:
    """Whether this call runs inside lmms-eval's command line (its cli_evaluate, which catches and logs every
    exception of an evaluation and exits 0)."""
    frame = sys._getframe(1)
    while frame is not None:
        if (os.path.abspath(frame.f_code.co_filename), frame.f_code.co_name) == LMMS_EVAL_CLI:
            return True
        frame = frame.f_back
    return False


def fails_the_command_line(method):
    """A plugin entry point whose refusal (ValueError, NotImplementedError) ends lmms-eval's command line with exit
    status 1 and the message on stderr (SystemExit, which its catch-all does not catch); from Python the error is
    raised as it is."""

    @functools.wraps(method)
    def entry_point(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (ValueError, NotImplementedError) as error:
            if _under_lmms_eval_cli():
                raise SystemExit(f"error: {error}") from error
            raise

    return entry_point


def _positive_int(name: str, value, allow_none: bool = False):
    """`value` as a positive int (lmms-eval passes model_args as int, float, bool or str); ValueError naming it."""
    if value is None and allow_none:
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) <= 0:
        raise ValueError(f"{MODEL_NAME}: {name} must be a positive integer, got {value!r}")
    return int(text)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{MODEL_NAME}: {name} must be true or false, got {value!r}")
    return value


def _option_text(value) -> str:
    """A model_args value (parsed by lmms-eval) written back as variant-string text."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def variant_of(variant, selection_method, selection_budget, options: dict):
    """The Variant of the model_args: `variant` (an eval.py variant string) or selection_method /
    selection_budget / option keys, parsed by eval.py's parser (same strings accepted and refused)."""
    if variant is not None:
        if selection_method is not None or selection_budget is not None or options:
            raise ValueError(f"{MODEL_NAME}: pass the variant as variant=STRING or as selection_method / "
                             "selection_budget / option keys, not both")
        return parse_variant(str(variant))
    method = "pooled" if selection_method is None else selection_method
    if method not in SELECTION_METHODS:
        raise ValueError(f"{MODEL_NAME}: selection_method must be one of {', '.join(SELECTION_METHODS)}, "
                         f"got {method!r}")
    text = method
    if selection_budget is not None:
        text += f"@{_positive_int('selection_budget', selection_budget)}"
    text += "".join(f":{name}={_option_text(value)}" for name, value in options.items())
    return parse_variant(text)


class LavidaShirgLmms(lmms):
    """LaViDa-SHIRG in lmms-eval (see the module docstring for model_args)."""

    is_simple = True

    @fails_the_command_line
    def __init__(self, pretrained=None, dtype="auto", device=None, batch_size=1, variant=None, selection_method=None,
                 selection_budget=None, gen_length=None, block_length=None, step_ratio=DEFAULT_STEP_RATIO,
                 schedule=None, schedule_shift=LAVIDA_SCHEDULE_SHIFT, temperature=None, remasking=None, alg=None,
                 use_prefix_cache=True, prefix_lm_mask=False, kv_cache_dtype=None, mc_num=DEFAULT_MC_NUM,
                 mc_batch_size=None, seed=0, **options):
        super().__init__()
        unknown = [name for name in options if name not in OPTION_FIELDS]
        if unknown:
            raise ValueError(f"{MODEL_NAME}: unknown model_args key(s) {unknown}; keys: {', '.join(ARGUMENTS)}, and "
                             f"the SHIRG options ({option_names_help()})")
        self._batch_size = _positive_int("batch_size", batch_size)
        self.mc_num = _positive_int("mc_num", mc_num)
        self.mc_batch_size = _positive_int("mc_batch_size", mc_batch_size, allow_none=True) or self.mc_num
        if self.mc_num % self.mc_batch_size:
            raise ValueError(f"{MODEL_NAME}: mc_num ({self.mc_num}) must be a multiple of mc_batch_size "
                             f"({self.mc_batch_size})")
        if isinstance(seed, bool) or not str(seed).strip().isdigit():
            raise ValueError(f"{MODEL_NAME}: seed must be a non-negative integer, got {seed!r}")
        self.seed = int(str(seed).strip())
        self.gen_length = _positive_int("gen_length", gen_length, allow_none=True)
        self.block_length = _positive_int("block_length", block_length, allow_none=True)
        check_sampling(step_ratio, schedule, schedule_shift)
        self.step_ratio, self.schedule_shift = step_ratio, schedule_shift
        if temperature is not None and (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                                        or not math.isfinite(temperature) or temperature < 0):
            raise ValueError(f"{MODEL_NAME}: temperature must be a finite number >= 0, got {temperature!r}")
        if remasking not in (None, *REMASKING_STRATEGIES):
            raise ValueError(f"{MODEL_NAME}: remasking must be one of {', '.join(REMASKING_STRATEGIES)}, "
                             f"got {remasking!r}")
        if alg not in (None, *DREAM_ALGORITHMS):
            raise ValueError(f"{MODEL_NAME}: alg must be one of {', '.join(DREAM_ALGORITHMS)}, got {alg!r}")
        if kv_cache_dtype not in (None, *STORAGE_DTYPES):
            raise ValueError(f"{MODEL_NAME}: kv_cache_dtype must be one of {', '.join(STORAGE_DTYPES)}, "
                             f"got {kv_cache_dtype!r}")
        self.temperature = temperature
        self.sampler = dict(remasking=remasking, use_prefix_cache=_flag("use_prefix_cache", use_prefix_cache),
                            prefix_lm_mask=_flag("prefix_lm_mask", prefix_lm_mask), kv_cache_dtype=kv_cache_dtype)
        self.variant = variant_of(variant, selection_method, selection_budget, options)
        if not pretrained:
            raise ValueError(f"{MODEL_NAME}: pretrained=FOLDER is required (a converted lavida_shirg model folder)")
        folder = model_folder(Path(str(pretrained)), "pretrained")
        self.dream = folder_is_dream(folder)
        other = {"block_length": block_length, "remasking": remasking} if self.dream else {"alg": alg}
        wrong = [name for name, value in other.items() if value is not None]
        if wrong:  # a sampler key of the other backbone
            owner, backbone, keys = (("LLaDA", "Dream", "alg, step_ratio, schedule") if self.dream else
                                     ("Dream", "LLaDA", "block_length, remasking, schedule"))
            verb = "is a setting" if len(wrong) == 1 else "are settings"
            raise ValueError(f"{MODEL_NAME}: {', '.join(wrong)} {verb} of {owner}'s sampler, and {str(folder)!r} "
                             f"holds a {backbone} model (its sampler: {keys})")
        self.schedule, self.alg = schedule or default_schedule(self.dream), alg
        requested = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), "device")
        dtype_name = resolve_dtype(dtype, requested, "dtype")

        self.accelerator = Accelerator(cpu=requested.type == "cpu")
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._device = requested if self._world_size == 1 else self.accelerator.device
        if self._world_size > 1:
            atexit.register(destroy_process_group)  # runs after lmms-eval's last collective
        self.model, self.processor = load_pretrained(folder, dtype_name, self._device)
        check_variant(self.model, self.processor, self.variant)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    # ---- requests ---------------------------------------------------------------------------------------------

    def answer_length(self, task: str, gen_kwargs: dict) -> int:
        """Answer tokens of a request: model_args gen_length, else the task's max_new_tokens, else eval.py's length
        for the task its name starts with (textvqa_val -> textvqa)."""
        if self.gen_length is not None:
            return self.gen_length
        if gen_kwargs.get("max_new_tokens") is not None:
            return _positive_int(f"task {task!r} gen_kwargs max_new_tokens", gen_kwargs["max_new_tokens"])
        spec = TASKS.get(task.split("_")[0])
        if spec is None:
            raise ValueError(f"{MODEL_NAME}: task {task!r} sets no max_new_tokens in its gen_kwargs and its name does "
                             f"not start with one of {', '.join(TASKS)}: pass gen_length=N in --model_args or "
                             "max_new_tokens=N in --gen_kwargs")
        return spec.gen_length

    def sampling_temperature(self, task: str, gen_kwargs: dict, filters: bool = False) -> float:
        """model_args temperature, else the task's: gen_kwargs temperature (1.0) with do_sample, 0 (greedy) without.
        ValueError for beam search, and for top_p / top_k filtering when sampling without `filters` (LLaDA)."""
        if (gen_kwargs.get("num_beams") or 1) != 1:
            raise ValueError(f"{MODEL_NAME}: task {task!r} gen_kwargs num_beams={gen_kwargs['num_beams']!r}: a "
                             "masked-diffusion sampler has no beam search")
        if self.temperature is not None:
            temperature = self.temperature
        elif gen_kwargs.get("do_sample"):
            temperature = 1.0 if gen_kwargs.get("temperature") is None else float(gen_kwargs["temperature"])
        else:
            temperature = 0.0
        for name, reason in SAMPLING_ONLY_GEN_KWARGS.items():
            if temperature > 0 and not filters and gen_kwargs.get(name) not in (None, 0, 1):
                raise ValueError(f"{MODEL_NAME}: task {task!r} gen_kwargs {name}={gen_kwargs[name]!r}: {reason}")
        return temperature

    def call_arguments(self, task: str, gen_kwargs: dict) -> dict:
        """The sampler arguments of a request (the same for every request of a batch), checked as the sampler
        checks them: LLaDA's diffusion_generate arguments (blocks dividing the answer, steps a multiple of the
        blocks), or Dream's generate arguments (`dream_arguments`)."""
        gen_length = self.answer_length(task, gen_kwargs)
        if self.dream:
            return self.dream_arguments(task, gen_kwargs, gen_length)
        generation = generation_settings(gen_length, self.step_ratio, self.schedule, self.schedule_shift,
                                         self.block_length)
        call = dict(generation, temperature=self.sampling_temperature(task, gen_kwargs), **self.sampler)
        sampler = {name: call[name] for name in (*generation, "temperature", "remasking")}
        try:  # remasking None takes the model's: any valid value stands in for the check
            resolve_sampler_arguments(sampler, {**sampler, "remasking": REMASKING_STRATEGIES[0]})
        except ValueError as error:
            raise ValueError(f"{MODEL_NAME}: task {task!r}: {error}") from error
        return call

    def dream_arguments(self, task: str, gen_kwargs: dict, gen_length: int) -> dict:
        """generate()'s arguments of a request on a Dream folder, as LaViDa's Dream evaluation: its step settings
        (generation_settings), model_args alg (else the folder's), the task's top_p / top_k (Dream's filters), the
        temperature of `sampling_temperature`; checked against the model's generation config."""
        temperature = self.sampling_temperature(task, gen_kwargs, filters=True)
        if gen_kwargs.get("top_p") == 0:
            raise ValueError(f"{MODEL_NAME}: task {task!r} gen_kwargs top_p=0: Dream's top-p filter would keep one "
                             "token per position, tying every confidence (LaViDa's order of ties is its device's); "
                             "pass --gen_kwargs top_p=1.0 for no filter")
        filters = {name: gen_kwargs[name] for name in ("top_p", "top_k") if gen_kwargs.get(name) is not None}
        call = dict(generation_settings(gen_length, self.step_ratio, self.schedule, self.schedule_shift, dream=True),
                    do_sample=temperature > 0, temperature=temperature or None, **filters,
                    **({} if self.alg is None else {"alg": self.alg}),
                    **{name: value for name, value in self.sampler.items() if name != "remasking"})
        try:
            check_dream_generation(self.model, call)
        except ValueError as error:
            raise ValueError(f"{MODEL_NAME}: task {task!r}: {error}") from error
        return call

    def visuals(self, request) -> list:
        """The PIL images of a request's document; ValueError naming the task and document when it has none."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = [visuals] if isinstance(visuals, Image.Image) else visuals
        if not visuals or not all(isinstance(visual, Image.Image) for visual in visuals):
            found = visuals if not visuals else [type(visual).__name__ for visual in visuals]
            raise ValueError(f"{MODEL_NAME}: task {task!r} document {doc_id} has no image (doc_to_visual gave "
                             f"{found!r}): {MODEL_NAME} answers questions about images; run image tasks only")
        return [visual.convert("RGB") for visual in visuals]

    @fails_the_command_line
    def generate_until(self, requests) -> list:
        """Answers of generate_until requests, batched `batch_size` at a time among requests with the same sampler
        arguments. Every request's settings and the first document of every task are checked before any sample
        runs."""
        first_of_task = {}
        for request in requests:
            first_of_task.setdefault(request.args[4], request)
        for request in first_of_task.values():
            self.visuals(request)
        calls = [self.call_arguments(request.args[4], request.args[1]) for request in requests]
        groups = {}
        for index, call in enumerate(calls):
            groups.setdefault(tuple(sorted(call.items())), []).append(index)
        answers = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{MODEL_NAME} {self.variant.label}")
        for key, indices in groups.items():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                images = [self.visuals(requests[index]) for index in batch]
                prompts = [self.processor.build_prompt(requests[index].args[0], num_images=len(group))
                           for index, group in zip(batch, images)]
                texts = generate_answers(self.model, self.processor, images, prompts, self.variant, dict(key))
                for index, text in zip(batch, texts):
                    context, gen_kwargs = requests[index].args[:2]
                    answers[index] = text
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                progress.update(len(batch))
        progress.close()
        return answers

    @fails_the_command_line
    def loglikelihood(self, requests) -> list:
        """(log-likelihood, False) of each request's continuation given its images and context: the model's Monte
        Carlo estimate with mc_num masks in forwards of mc_batch_size rows, seeded by `seed` (the same for every
        request, so the choices of a question are scored under the same draws), as LaViDa's lmms-eval scores
        multiple-choice tasks. The greedy flag is False (a masked-diffusion LM has no left-to-right greedy)."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc=f"{MODEL_NAME} loglikelihood"):
            context, target = request.args[:2]
            _, _, _, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images = self.visuals(request)
            prompt = self.processor.build_prompt(context, num_images=len(images))
            score = score_continuation(self.model, self.processor, images, prompt, continuation, self.variant,
                                       self.mc_num, self.mc_batch_size, self.seed)
            results.append((score, False))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (score, False))
        return results

    @fails_the_command_line
    def generate_until_multi_round(self, requests):
        raise NotImplementedError(f"{MODEL_NAME}: multi-round generation is not supported; run generate_until tasks")
