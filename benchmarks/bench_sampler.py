"""Answer sampling with and without the prefix KV cache on the same model, in one run.

    python benchmarks/bench_sampler.py                       # small config, CPU, prefix 1000, gen 32, 16 steps
    python benchmarks/bench_sampler.py --device cuda --dtype bfloat16 --preset lavida-llada --layers 4

Prints the median seconds per answer of each mode and its ratio to the prefix cache (mode / cache).
Both modes produce the same tokens under the Prefix-DLM mask; the script checks that too.
"""

import argparse
import statistics
import time

import torch


from lavida_shirg import ShirgConfig
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion

SMALL_TEXT = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4)
MODES = {
    "prefix cache": dict(use_prefix_cache=True),
    "no cache (prefix-DLM mask)": dict(use_prefix_cache=False, prefix_lm_mask=True),
    "no cache (bidirectional, LaViDa)": dict(use_prefix_cache=False),
}
BASELINE = "prefix cache"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["small", "lavida-llada"],
                        help="small: a 4-layer 256-wide LM (CPU); lavida-llada: the real LM sizes")
    parser.add_argument("--layers", type=int, default=None, help="override the number of LM layers")
    parser.add_argument("--prefix-length", type=int, default=1000)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser.parse_args(argv)


def build_model(args):
    text = dict(SMALL_TEXT) if args.preset == "small" else {}
    if args.layers is not None:
        text["num_hidden_layers"] = args.layers
    text["max_position_embeddings"] = max(4096, args.prefix_length + args.gen_length)
    preset = "tiny" if args.preset == "small" else "lavida-llada"
    config = ShirgConfig.from_preset(preset, text_config={**ShirgConfig.from_preset(preset).text_config.to_dict(), **text})
    with torch.device(args.device):
        model = LavidaShirgForMaskedDiffusion(config)
    return model.to(getattr(torch, args.dtype)).eval()


def timed(function, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def compare_modes(model, prefix_length: int, gen_length: int, steps: int, batch_size: int, repeats: int) -> dict:
    """Median seconds per answer of each of MODES (after one warm-up each) on a random text prefix, and whether the
    cached answer equals the uncached Prefix-DLM one: {"seconds": {mode: s}, "cache_equals_prefix_dlm": bool}."""
    device = str(model.device)
    vocab = model.config.text_config.vocab_size
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, vocab, (batch_size, prefix_length), generator=generator).to(device)
    settings = dict(gen_length=gen_length, steps=steps)
    times, answers = {}, {}
    for name, mode in MODES.items():
        model.diffusion_generate(input_ids, **settings, **mode)  # warm-up
        runs = [timed(lambda: model.diffusion_generate(input_ids, **settings, **mode), device)
                for _ in range(repeats)]
        times[name] = statistics.median(t for t, _ in runs)
        answers[name] = runs[0][1]
    same = torch.equal(answers[BASELINE], answers["no cache (prefix-DLM mask)"])
    return {"seconds": times, "cache_equals_prefix_dlm": same}


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    model = build_model(args)
    result = compare_modes(model, args.prefix_length, args.gen_length, args.steps, args.batch_size, args.repeats)
    text = model.config.text_config
    print(f"device={args.device} dtype={args.dtype} LM layers={text.num_hidden_layers} hidden={text.hidden_size} "
          f"prefix={args.prefix_length} gen_length={args.gen_length} steps={args.steps} batch={args.batch_size} "
          f"repeats={args.repeats} (medians)")
    cached = result["seconds"][BASELINE]
    for name, seconds in result["seconds"].items():
        print(f"  {name:34s} {seconds * 1000:9.1f} ms/answer   x{seconds / cached:5.2f} vs {BASELINE}")
    print(f"  cached answer == uncached prefix-DLM answer: {result['cache_equals_prefix_dlm']}")


if __name__ == "__main__":
    main()
