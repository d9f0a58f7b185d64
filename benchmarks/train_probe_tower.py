"""Train a small "probe" model from scratch on synthetic OCR, so that its vision tower's scores mean something.

The selection-quality benchmark (benchmarks/bench_selection_quality.py) asks whether SHIRG's score terms point at
text; on a random tower they measure the pixels, not what a trained tower makes of them. This script trains the
whole model (vision tower, projector, LM: every parameter, no LoRA) with the model's own diffusion loss
`model(**batch, labels=...)`, on the synthetic OCR set rendered on the fly, through the project's data path
(`SampleEncoder` -> `collate_samples` -> `BatchBuilder`), so the result is a normal model folder.

Geometry (default, the issue-14 measurement tower): the tiny preset widened to a 96-wide, 4-layer SigLIP with 6 px
patches on 96 px views, a 192 px high-resolution view (32 x 32 tokens), 192 px canvases, 11-13 px fonts. Every step
uses one budget entry, alternating between "pooled" (LaViDa's anyres views) and "full" (all 1024 high-resolution
tokens go to the LM, so the tower learns to make the high-resolution tokens readable without any selection bias).
AdamW, linear warm-up then cosine decay, gradient clipping at 1; seeded (model init, data order, loss masks).
Checkpoints (model + processor + optimizer state) every `--save_every` steps into `--output`; `--resume` continues
from the last one. 1.3-2.5 s per step of batch 8 on one CPU thread (the README's tower A: 1000 steps, 43 min on a
busy machine, loss 6.35 -> 1.35). `--steps 1 --lr 0` saves the untrained model of the same geometry.

    OMP_NUM_THREADS=1 python benchmarks/train_probe_tower.py --output runs/probe-tower --steps 1000 --warmup 50
"""

import argparse
import json
import math
import os
import time

import torch

from lavida_shirg.configuration_lavida_shirg import PRESETS, ShirgConfig
from lavida_shirg.modeling_lavida_shirg import LavidaShirgForMaskedDiffusion
from lavida_shirg.processing_lavida_shirg import LavidaShirgProcessor
from lavida_shirg.tiny_tokenizer import build_tiny_tokenizer
from shirg_tools.batching import BatchBuilder, SampleEncoder, collate_samples
from shirg_tools.budget_schedule import BudgetEntry
from shirg_tools.synthetic_ocr import SYNTHETIC_OCR_PROMPT_SUFFIX, SyntheticOCRConfig, generate_sample

STATE_FILE = "probe_training_state.pt"
ENTRIES = (BudgetEntry("pooled", "pooled", None, {}), BudgetEntry("full", "full", None, {}))


def probe_config(args) -> ShirgConfig:
    """The tiny preset with the probe geometry of `args` (vision width/depth/patch/view, high-resolution view)."""
    vision = dict(PRESETS["tiny"]["vision_config"], hidden_size=args.vision_width, intermediate_size=2 * args.vision_width,
                  num_hidden_layers=args.vision_layers, image_size=args.view_size, patch_size=args.patch_size)
    side = args.hires_size // args.patch_size
    return ShirgConfig.from_preset("tiny", vision_config=vision, hires_image_size=args.hires_size,
                                   pooled_view_size=args.pooled_view_size, selection_budget=side * side // 4,
                                   budget_choices=[side * side // 8, side * side // 4, side * side // 2])


def learning_rate(step: int, args) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of `lr` at `steps`."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def save(model, processor, optimizer, step, losses, args):
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    torch.save({"optimizer": optimizer.state_dict(), "step": step, "losses": losses,
                "rng": torch.get_rng_state()}, os.path.join(args.output, STATE_FILE))
    with open(os.path.join(args.output, "probe_training.json"), "w") as handle:
        json.dump({"arguments": vars(args), "step": step, "losses_every_50": losses[::50]}, handle, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="model folder (keep it out of git: runs/ or /tmp)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision_width", type=int, default=96)
    parser.add_argument("--vision_layers", type=int, default=4)
    parser.add_argument("--patch_size", type=int, default=6)
    parser.add_argument("--view_size", type=int, default=96)
    parser.add_argument("--hires_size", type=int, default=192)
    parser.add_argument("--pooled_view_size", type=int, default=8)
    parser.add_argument("--canvas_size", type=int, default=192)
    parser.add_argument("--font_min", type=int, default=11)
    parser.add_argument("--font_max", type=int, default=13)
    parser.add_argument("--data_seed", type=int, default=0, help="synthetic OCR seed of the training images")
    parser.add_argument("--save_every", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = build_tiny_tokenizer()
    if args.resume:
        model = LavidaShirgForMaskedDiffusion.from_pretrained(args.output)
        state = torch.load(os.path.join(args.output, STATE_FILE), weights_only=False)
        torch.set_rng_state(state["rng"])
    else:
        torch.manual_seed(args.seed)
        model = LavidaShirgForMaskedDiffusion(probe_config(args))
        state = {"step": 0, "losses": []}
    processor = LavidaShirgProcessor.from_config(model.config, tokenizer)
    data = SyntheticOCRConfig(canvas_size=(args.canvas_size, args.canvas_size),
                              font_size_range=(args.font_min, args.font_max), seed=args.data_seed)
    encoder = SampleEncoder(processor, list(ENTRIES), SYNTHETIC_OCR_PROMPT_SUFFIX)
    builder = BatchBuilder(processor)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
    losses = state["losses"]
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    for step in range(state["step"], args.steps):
        generator.manual_seed(args.seed * 1_000_003 + step)  # resumable: the loss masks depend on the step only
        samples = []
        for index in range(step * args.batch_size, (step + 1) * args.batch_size):
            sample = generate_sample(index, data)
            samples.append({**encoder.encode(sample["image"], sample["question"], sample["answers"][0]),
                            "skipped": []})
        inputs = builder.build(collate_samples(samples), ENTRIES[step % len(ENTRIES)])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        loss = model(**inputs, generator=generator).loss  # inputs carry labels: the diffusion loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(round(loss.item(), 4))
        if step % 50 == 0 or step == args.steps - 1:
            recent = losses[-50:]
            print(f"step {step}: loss {sum(recent) / len(recent):.4f} (mean of last {len(recent)}), "
                  f"lr {learning_rate(step, args):.2e}, {time.time() - started:.0f} s", flush=True)
        if (step + 1) % args.save_every == 0 or step == args.steps - 1:
            save(model, processor, optimizer, step + 1, losses, args)
    print(f"saved to {args.output}", flush=True)


if __name__ == "__main__":
    main()
