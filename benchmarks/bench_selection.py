"""Time the SHIRG selection methods and the baselines against the SigLIP-so400m vision tower on the same batch.

One 672 x 672 view through SigLIP-patch14 = a 48 x 48 grid = N = 2304 tokens of D = 1152, projected to E = 4096.
Rows: the vision tower (random weights; LaViDa's 26 layers of so400m, `interpolate_pos_encoding=True`), the
projector applied to all N tokens (its own row: SHIRG projects every token once), and every selection method at
budget K (the SHIRG methods once per detail term, `detail_term`). Medians over `--repeats` timed runs after one
warm-up; CUDA runs are synchronised.

On CPU the full tower is slow, so `--vision-layers` (default on CPU: 2) runs a reduced tower and the 26-layer time
is extrapolated as (measured time / measured layers) * 26; the output says so. Example:

    python benchmarks/bench_selection.py --batch-sizes 1 8 --repeats 3
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lavida_shirg.shirg_selection import DETAIL_TERMS, METHODS, select_tokens  # noqa: E402

FULL_LAYERS = 26  # LaViDa drops the last of so400m's 27 layers
VISION = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=384, patch_size=14,
              num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
VIEW, PATCH, EMBED, QUESTION_LENGTH = 672, 14, 4096, 32


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--vision-layers", type=int, default=None,
                        help=f"vision layers actually run (default: {FULL_LAYERS} on CUDA, 2 on CPU); fewer than "
                             f"{FULL_LAYERS} extrapolates the tower time per layer")
    parser.add_argument("--budget", type=int, default=768)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    layers = args.vision_layers or (FULL_LAYERS if device.type == "cuda" else 2)
    if not 1 <= layers <= FULL_LAYERS:
        parser.error(f"--vision-layers must be in [1, {FULL_LAYERS}]")
    torch.manual_seed(0)

    tower = SiglipVisionModel(SiglipVisionConfig(num_hidden_layers=layers, **VISION)).to(device, dtype).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(1152, EMBED), torch.nn.GELU(),
                                    torch.nn.Linear(EMBED, EMBED)).to(device, dtype).eval()
    grid = (VIEW // PATCH, VIEW // PATCH)
    num = grid[0] * grid[1]

    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU, ' + str(torch.get_num_threads()) + ' threads'})"
          f" dtype={dtype} torch={torch.__version__} view={VIEW}px grid={grid} N={num} D=1152 E={EMBED} "
          f"K={args.budget} repeats={args.repeats} (median)")
    if layers < FULL_LAYERS:
        print(f"NOTE: vision tower REDUCED to {layers} of {FULL_LAYERS} layers; its {FULL_LAYERS}-layer time is "
              f"EXTRAPOLATED as measured_time / {layers} * {FULL_LAYERS} (the patch embedding is counted in the "
              f"per-layer cost, so the estimate is slightly high), and ratios are method / that estimate")

    for batch in args.batch_sizes:
        with torch.inference_mode():
            pixels = torch.randn(batch, 3, VIEW, VIEW, device=device, dtype=dtype)
            measured = timed(lambda: tower(pixel_values=pixels, interpolate_pos_encoding=True), device,
                             args.repeats)
            features = tower(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
            assert features.shape == (batch, num, 1152), features.shape
            tower_time = measured / layers * FULL_LAYERS
            projection_time = timed(lambda: projector(features), device, args.repeats)
            projected = projector(features)
            question = torch.randn(batch, QUESTION_LENGTH, EMBED, device=device, dtype=dtype)
            mask = torch.ones(batch, QUESTION_LENGTH, dtype=torch.bool, device=device)
            mask[:, QUESTION_LENGTH // 2:] = False  # template / padding
            attention = torch.rand(batch, num, device=device)

            rows = [(f"vision tower ({layers} layers measured)", measured)]
            if layers < FULL_LAYERS:
                rows.append((f"vision tower ({FULL_LAYERS} layers, extrapolated)", tower_time))
            rows.append(("projector on all N tokens", projection_time))
            for method in args.methods:
                options = {"attention_received": attention} if method == "visionzip" else {}
                # SHIRG: one row per detail term (the pixel contrast reads the view's own pixels); the question
                # mask is validated once by the caller
                details = DETAIL_TERMS if method.startswith("shirg") else (None,)
                for detail in details:
                    if detail is not None:
                        options = dict(validate=False, detail=detail, pixels=pixels, patch_size=PATCH)
                    rows.append((method if detail is None else f"{method} detail={detail}",
                                 timed(lambda: select_tokens(method, features, projected, grid, args.budget, question,
                                                             mask, **options), device, args.repeats)))
        print(f"\nB={batch}")
        print(f"  {'row':44s} {'median ms':>11s} {'/ tower(26)':>12s}")
        for name, seconds in rows:
            print(f"  {name:44s} {seconds * 1e3:11.2f} {seconds / tower_time:11.2%}")
        worst = max((s for n, s in rows if n.startswith("shirg")), default=None)
        if worst is not None:
            verdict = "OK" if worst <= 0.05 * tower_time else "ABOVE TARGET"
            print(f"  slowest SHIRG method = {worst / tower_time:.2%} of the {FULL_LAYERS}-layer tower "
                  f"(target <= 5%): {verdict}")


if __name__ == "__main__":
    main()
