"""Answer one question about one image with a converted (or trained) LaViDa-SHIRG folder: LaViDa's predict.py and
predict_fim.py as one command.

    python predict.py ./lavida-shirg-llada images/dog.png "Describe the image in detail." --max-new-tokens 64
    python predict.py ./lavida-shirg-llada images/dog.png "Describe the image in detail." --max-new-tokens 64 \\
        --steps 32 --schedule shift --temperature 0.1 --history          # predict.py's second call, step by step
    python predict.py ./lavida-shirg-llada-fim images/temple.png "Write a poem about the image." \\
        --draft-file draft.txt --max-new-tokens 256 --block-length 128 --schedule shift --schedule-shift 0.3333
    python predict.py ./lavida-shirg-llada doc.png "What is the total?" --selection-method shirg-fixed --selection-budget 768

Sampler settings left out take the folder's generation_config.json; `--temperature` > 0 samples (`--seed`). The
prompt is the folder's chat template with the image first; `--draft` / `--draft-file` give LaViDa's FIM draft
(fixed text, `<|mdm_mask|>` per position to fill, `<|reserved_token_1|>` markers). `--history` prints the answer
canvas after every step, masks as `*`, as predict.py's verbose mode does. Bad input is one error line, exit status 2.
"""

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from lavida_shirg.generation_lavida_shirg import LavidaShirgGenerationConfig, generation_config_of_call
from shirg_tools.inference import DTYPES, check_device, load_pretrained, model_folder, resolve_dtype

# command-line flag -> generate() keyword (None: the folder's generation config)
SAMPLER_FLAGS = {"max_new_tokens": int, "steps": int, "block_length": int, "schedule": str, "schedule_shift": float,
                 "remasking": str, "alg": str}


def parse_arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a lavida_shirg folder (convert_lavida_checkpoint.py, train.py, publish.py)")
    parser.add_argument("image", help="the image file")
    parser.add_argument("question", help="the question (the user turn's text)")
    for name, kind in SAMPLER_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                            help=f"generate(..., {name}=...) (default: the folder's generation config)")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: sample at this temperature")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling draws")
    parser.add_argument("--selection-method", default=None, help="SHIRG method or baseline (default: the folder's)")
    parser.add_argument("--selection-budget", type=int, default=None, help="tokens kept per image")
    draft = parser.add_mutually_exclusive_group()
    draft.add_argument("--draft", default=None, help="FIM draft text (LaViDa's draft_tokens)")
    draft.add_argument("--draft-file", default=None, help="a file holding the FIM draft text")
    parser.add_argument("--history", action="store_true", help="print the answer canvas after every step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    return parser.parse_args(argv)


def read_image(path: str) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"image {path!r} cannot be read as an image: {error}") from error


def read_draft(args) -> str | None:
    if args.draft_file is None:
        return args.draft
    try:
        return Path(args.draft_file).read_text()
    except OSError as error:
        raise ValueError(f"--draft-file {args.draft_file!r} cannot be read: {error.strerror}") from error


def predict(args) -> tuple:
    """(answer text, history lines): the folder's model and processor, the chat-template prompt, one generate call."""
    device = check_device(args.device, "--device")
    folder = model_folder(Path(args.model), "model")
    image, draft = read_image(args.image), read_draft(args)
    settings = {name: getattr(args, name) for name in SAMPLER_FLAGS if getattr(args, name) is not None}
    if args.temperature > 0:
        settings.update(do_sample=True, temperature=args.temperature)
    if (folder / "generation_config.json").is_file():  # the sampler settings, checked before the weights load
        generation_config_of_call(LavidaShirgGenerationConfig.from_pretrained(folder), **settings)
    model, processor = load_pretrained(folder, resolve_dtype(args.dtype, device, "--dtype"), device)
    prompt = processor.build_prompt(args.question)
    extra = {} if draft is None else {"draft": draft}
    inputs = processor(images=[image], text=[prompt], selection_method=args.selection_method,
                       selection_budget=args.selection_budget, **extra).to(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    output = model.generate(**inputs, **settings, generator=generator, return_dict_in_generate=True,
                            output_history=args.history)
    prompt_length = inputs["input_ids"].shape[1]
    answer = processor.batch_decode(output.sequences[:, prompt_length:], skip_special_tokens=True)[0]
    mask = processor.tokenizer.convert_ids_to_tokens(model.config.mask_token_id)
    history = [processor.batch_decode(canvas, skip_special_tokens=False)[0].replace(mask, "*")
               for canvas in output.history or ()]
    return answer.strip(), history


def main(argv=None) -> int:
    args = parse_arguments(argv)
    try:
        answer, history = predict(args)
    except ValueError as error:
        print(f"predict.py: error: {error}", file=sys.stderr)
        return 2
    for step, canvas in enumerate(history):
        print(f"step {step}: {canvas}")
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
