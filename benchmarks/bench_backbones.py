"""The LLaDA and Dream backbones side by side, in one run: CPU time of one diffusion step with the prefix cache, and
the cost of scoring one answer choice with `log_likelihood`.

    python benchmarks/bench_backbones.py                  # tiny presets (tiny, tiny-dream)
    python benchmarks/bench_backbones.py --real-width     # real widths, heads and vocabularies, --layers 2 LM layers

Per backbone, on random weights and a random text prefix (the images do not enter a step: they are part of the
cached prefix):
  step      one `generate` step against the prefix cache: the LM on the answer canvas + the backbone's commit rule
            (LLaDA low-confidence remasking, Dream topk_margin with top_k 50: each folder's default sampler), timed
            between the LM forwards' starts (a forward pre-hook), median over every step of every run; split into
            the decoder (layers + final norm, to the forward hook) and the rest (LM head + commit);
  prefill   from the call to the first step: embedding the prefix, filling the cache (Dream: + its first token);
  choice    `log_likelihood` of one --choice-length answer at mc_num 16 (batch_size 16: one forward of 16 rows over
            prefix + answer; no cache, as LLaDA's estimator runs the whole sequence).
Medians of --repeats runs after one warm-up (per step: of every step of those runs), the two backbones run in
turn within each repeat (a shared CPU's load falls on both alike); Dream's numbers also as a ratio to LLaDA's.

--real-width: LLaDA-8B's decoder widths (hidden 4096, intermediate 12288, 32 heads, 32 KV heads, vocabulary 126464)
and Dream-7B's (hidden 3584, intermediate 18944, 28 heads, 4 KV heads, vocabulary 152064) with --layers layers
each, one SigLIP layer, bf16 (about 3 GB per model; both are held, about 6 GB).
"""

import argparse
import statistics
import time

import torch

from lavida_shirg import ShirgConfig
from lavida_shirg.configuration_lavida_shirg import PRESETS
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion

BACKBONES = {"tiny": ("LLaDA", "tiny"), "tiny-dream": ("Dream", "tiny-dream"),
             "real-llada": ("LLaDA", "lavida-llada"), "real-dream": ("Dream", "lavida-dream")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-width", action="store_true", help="real widths and vocabularies, --layers LM layers")
    parser.add_argument("--layers", type=int, default=2, help="LM layers of --real-width (default 2)")
    parser.add_argument("--prefix-length", type=int, help="prefix tokens (default 256; --real-width 128)")
    parser.add_argument("--gen-length", type=int, default=32, help="answer tokens of generate")
    parser.add_argument("--steps", type=int, default=16, help="diffusion steps of each generate call")
    parser.add_argument("--choice-length", type=int, default=8, help="tokens of the scored answer choice")
    parser.add_argument("--mc-num", type=int, default=16)
    parser.add_argument("--repeats", type=int, help="timed runs (default 5; --real-width 3)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default float32; --real-width bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: steadier on a shared CPU)")
    args = parser.parse_args(argv)
    args.prefix_length = args.prefix_length or (128 if args.real_width else 256)
    args.repeats = args.repeats or (3 if args.real_width else 5)
    args.dtype = args.dtype or ("bfloat16" if args.real_width else "float32")
    return args


def backbone_config(preset: str, layers=None) -> ShirgConfig:
    """The preset; with `layers`, that many LM layers and one SigLIP layer (the vision tower does not enter a step)."""
    if layers is None:
        return ShirgConfig.from_preset(preset)
    base = PRESETS[preset]
    text = {**ShirgConfig.from_preset(preset).text_config.to_dict(), "num_hidden_layers": layers}
    return ShirgConfig.from_preset(preset, vision_config={**base["vision_config"], "num_hidden_layers": 1},
                                   text_config=text)


def build_model(config: ShirgConfig, dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        model = LavidaShirgForMaskedDiffusion(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def timed_generate(model, input_ids, args) -> tuple:
    """(prefill seconds, [seconds of each step], [seconds of each step's LM forward]) of one `generate` call: the
    LM forwards are timestamped by hooks; the prefill runs from the call to the first step's forward, step k from
    its forward's start to the next one's (or to the end of the call), so each step holds its LM forward (the decoder
    layers and the final norm; the LM head follows) and the rest: the head and the commit."""
    language_model, starts, ends = model.model.language_model, [], []
    clock = device_clock(model.device)
    hooks = (language_model.register_forward_pre_hook(lambda *_: starts.append(clock())),
             language_model.register_forward_hook(lambda *_: ends.append(clock())))
    try:
        begin = clock()
        model.generate(input_ids, max_new_tokens=args.gen_length, steps=args.steps, use_prefix_cache=True)
        end = clock()
    finally:
        for hook in hooks:
            hook.remove()
    marks = starts[1:] + [end]  # starts[0] is the prefill's forward
    steps = [after - before for before, after in zip(marks, marks[1:])]
    return marks[0] - begin, steps, [stop - start for start, stop in zip(starts[1:], ends[1:])]


def device_clock(device: torch.device):
    """time.perf_counter, after the device's queued work has finished (a CUDA synchronize) on a GPU."""
    if device.type != "cuda":
        return time.perf_counter

    def synchronized():
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return synchronized


def timed_likelihood(model, input_ids, choice, args) -> float:
    clock = device_clock(model.device)
    start = clock()
    model.log_likelihood(choice, input_ids, mc_num=args.mc_num, batch_size=args.mc_num,
                         generator=torch.Generator(model.device).manual_seed(0))
    return clock() - start


def measure(models: dict, args) -> dict:
    """{backbone: {"step", "decoder", "prefill", "choice": seconds, "steps": n}}: medians over --repeats generate
    calls (every step of them) and --repeats likelihood calls after one warm-up each, the backbones taken in turn
    within each repeat so that a shared CPU's load falls on both alike."""
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for backbone, model in models.items():
        vocab = min(model.config.text_config.vocab_size, 30000)
        inputs[backbone] = (torch.randint(10, vocab, (1, args.prefix_length), generator=generator).to(model.device),
                            torch.randint(10, vocab, (1, args.choice_length), generator=generator).to(model.device))
    timings = {backbone: {"prefill": [], "step": [], "decoder": [], "choice": []} for backbone in models}
    for repeat in range(args.repeats + 1):  # the first is the warm-up
        for backbone, model in models.items():
            input_ids, choice = inputs[backbone]
            prefill, steps, decoder = timed_generate(model, input_ids, args)
            seconds = timed_likelihood(model, input_ids, choice, args)
            if repeat:
                timing = timings[backbone]
                timing["prefill"].append(prefill)
                timing["step"] += steps
                timing["decoder"] += decoder
                timing["choice"].append(seconds)
    return {backbone: {**{name: statistics.median(values) for name, values in timing.items()},
                       "steps": len(timing["step"]) // args.repeats} for backbone, timing in timings.items()}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    names = ("real-llada", "real-dream") if args.real_width else ("tiny", "tiny-dream")
    models = {BACKBONES[name][0]: build_model(backbone_config(BACKBONES[name][1],
                                                              args.layers if args.real_width else None), dtype)
              for name in names}
    results = measure(models, args)
    print(f"{'real-width' if args.real_width else 'tiny presets'}: dtype={args.dtype} threads={args.threads} "
          f"prefix={args.prefix_length} gen_length={args.gen_length} steps={args.steps} "
          f"choice={args.choice_length} tokens mc_num={args.mc_num} repeats={args.repeats} (medians)")
    llada = results["LLaDA"]
    for backbone, result in results.items():
        text = models[backbone].config.text_config
        sizes = (f"hidden {text.hidden_size}, intermediate {text.intermediate_size}, heads "
                 f"{text.num_attention_heads}/{text.num_key_value_heads}, layers {text.num_hidden_layers}, vocab "
                 f"{text.vocab_size}")
        print(f"  {backbone:5s} ({sizes}); {result['steps']} steps timed per generate")
        rest = result["step"] - result["decoder"]
        print(f"        step {result['step'] * 1000:9.2f} ms  x{result['step'] / llada['step']:5.2f} vs LLaDA  "
              f"(decoder {result['decoder'] * 1000:.2f} ms, head + commit {rest * 1000:.2f} ms)")
        print(f"        prefill {result['prefill'] * 1000:9.2f} ms   choice @mc_num {args.mc_num} "
              f"{result['choice'] * 1000:9.2f} ms  x{result['choice'] / llada['choice']:5.2f} vs LLaDA")


if __name__ == "__main__":
    main()
