"""Time the SHIRG selection methods and the baselines against the SigLIP-so400m vision tower on the same batch.

Sizes come from the lavida-llada config: one 672 x 672 view (hires_image_size) through SigLIP-patch14 = a 48 x 48
grid = N = 2304 tokens of D = 1152, projected to E = 4096. Rows: the vision tower (random weights; LaViDa's 26
layers of so400m, `interpolate_pos_encoding=True`), the projector applied to all N tokens (its own row: SHIRG
projects every token once), and every selection method at budget K (the SHIRG methods once per detail term,
`detail_term`). Medians over `--repeats` timed runs after one warm-up; CUDA runs are synchronised.

On CPU the full tower is slow, so `--vision-layers` (default on CPU: 2) runs a reduced tower and the 26-layer time
is extrapolated as (measured time / measured layers) * 26; the output says so. Example:

    python benchmarks/bench_selection.py --batch-sizes 1 8 --repeats 3
"""

import argparse
import copy
import statistics
import time

import torch
from transformers import SiglipVisionModel

from lavida_shirg import ShirgConfig
from lavida_shirg.shirg_selection import DETAIL_TERMS, METHODS, select_tokens

SELECTIONS = [name for name, method in METHODS.items() if method.function is not None]  # not pooled / full
QUESTION_LENGTH = 32  # question tokens (half of them template / padding)
TARGET_FRACTION = 0.05  # the slowest SHIRG method should cost at most 5% of the full tower


def timed(fn, device, repeats):
    """Median wall time of fn() in seconds (one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help="vision layers actually run (default: all on CUDA, 2 on CPU); fewer extrapolates the "
                             "tower time per layer")
    parser.add_argument("--budget", type=int, default=None, help="K (default: the config's selection_budget)")
    parser.add_argument("--methods", nargs="+", default=SELECTIONS, choices=SELECTIONS)
    return parser, parser.parse_args(argv)


def resolve(args, config: ShirgConfig, parser=None):
    """(device, dtype, measured layers, budget) of the parsed arguments; an error names a bad --vision-layers."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    full_layers = config.vision_config.num_hidden_layers
    layers = args.vision_layers or (full_layers if device.type == "cuda" else min(2, full_layers))
    if not 1 <= layers <= full_layers:
        message = f"--vision-layers must be in [1, {full_layers}], got {layers}"
        if parser is None:
            raise ValueError(message)
        parser.error(message)
    return device, dtype, layers, args.budget or config.selection_budget


def measure_selection(config: ShirgConfig, device, dtype, layers: int, batch_sizes, repeats: int, budget: int,
                      methods) -> dict:
    """Per batch size: rows [(name, median seconds)] (the measured tower, the extrapolated full tower when fewer
    layers ran, the projector, each method and detail term) and the full tower's seconds."""
    full_layers = config.vision_config.num_hidden_layers
    vision = copy.deepcopy(config.vision_config)
    vision.num_hidden_layers = layers
    torch.manual_seed(0)
    tower = SiglipVisionModel(vision).to(device, dtype).eval()
    width, embed = config.vision_config.hidden_size, config.text_config.hidden_size
    projector = torch.nn.Sequential(torch.nn.Linear(width, embed), torch.nn.GELU(),
                                    torch.nn.Linear(embed, embed)).to(device, dtype).eval()
    view, patch = config.hires_image_size, config.vision_config.patch_size
    grid = (view // patch, view // patch)
    num = grid[0] * grid[1]
    results = {}
    for batch in batch_sizes:
        with torch.inference_mode():
            pixels = torch.randn(batch, 3, view, view, device=device, dtype=dtype)
            measured = timed(lambda: tower(pixel_values=pixels, interpolate_pos_encoding=True), device, repeats)
            features = tower(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
            assert features.shape == (batch, num, width), features.shape
            tower_time = measured / layers * full_layers
            projection_time = timed(lambda: projector(features), device, repeats)
            projected = projector(features)
            question = torch.randn(batch, QUESTION_LENGTH, embed, device=device, dtype=dtype)
            mask = torch.ones(batch, QUESTION_LENGTH, dtype=torch.bool, device=device)
            mask[:, QUESTION_LENGTH // 2:] = False  # template / padding
            attention = torch.rand(batch, num, device=device)

            rows = [(f"vision tower ({layers} layers measured)", measured)]
            if layers < full_layers:
                rows.append((f"vision tower ({full_layers} layers, extrapolated)", tower_time))
            rows.append(("projector on all N tokens", projection_time))
            for method in methods:
                options = {"attention_received": attention} if method == "visionzip" else {}
                # SHIRG: one row per detail term (the pixel contrasts read the view's own pixels)
                details = DETAIL_TERMS if method.startswith("shirg") else (None,)
                for detail in details:
                    if detail is not None:
                        options = dict(detail_term=detail, pixels=pixels, patch_size=patch)
                    rows.append((method if detail is None else f"{method} detail={detail}",
                                 timed(lambda: select_tokens(method, features, projected, grid, budget, question,
                                                             mask, **options), device, repeats)))
        results[batch] = {"rows": rows, "tower_s": tower_time}
    return results


def main(argv=None):
    parser, args = parse_args(argv)
    config = ShirgConfig.from_preset("lavida-llada")
    device, dtype, layers, budget = resolve(args, config, parser)
    full_layers = config.vision_config.num_hidden_layers
    view, patch = config.hires_image_size, config.vision_config.patch_size
    grid = (view // patch, view // patch)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU, ' + str(torch.get_num_threads()) + ' threads'})"
          f" dtype={dtype} torch={torch.__version__} view={view}px grid={grid} N={grid[0] * grid[1]} "
          f"D={config.vision_config.hidden_size} E={config.text_config.hidden_size} K={budget} "
          f"repeats={args.repeats} (median)")
    if layers < full_layers:
        print(f"NOTE: vision tower REDUCED to {layers} of {full_layers} layers; its {full_layers}-layer time is "
              f"EXTRAPOLATED as measured_time / {layers} * {full_layers} (the patch embedding is counted in the "
              f"per-layer cost, so the estimate is slightly high), and ratios are method / that estimate")
    results = measure_selection(config, device, dtype, layers, args.batch_sizes, args.repeats, budget, args.methods)
    for batch, result in results.items():
        tower_time = result["tower_s"]
        print(f"\nB={batch}")
        print(f"  {'row':44s} {'median ms':>11s} {f'/ tower({full_layers})':>12s}")
        for name, seconds in result["rows"]:
            print(f"  {name:44s} {seconds * 1e3:11.2f} {seconds / tower_time:11.2%}")
        worst = max((s for n, s in result["rows"] if n.startswith("shirg")), default=None)
        if worst is not None:
            verdict = "OK" if worst <= TARGET_FRACTION * tower_time else "ABOVE TARGET"
            print(f"  slowest SHIRG method = {worst / tower_time:.2%} of the {full_layers}-layer tower "
                  f"(target <= {TARGET_FRACTION:.0%}): {verdict}")


if __name__ == "__main__":
    main()
