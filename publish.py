"""Publish a lavida-shirg model (or a LoRA adapter) as a Hub-ready folder, and optionally push it; or write a
Hugging Face Space folder running the Gradio app (app.py) on a model.

    python publish.py --model ./lavida-shirg-llada ./hub-folder --results eval_out/summary.md
    python publish.py --model ./lavida-shirg-llada ./hub-folder --push_to_hub org/lavida-shirg --private
    python publish.py --adapter ./train_out/adapter --base_model org/lavida-shirg-llada ./hub-adapter
    python publish.py --model ./reader_model --space ./space-folder      # then: hf upload --repo-type space ...

The folder holds the weights (safetensors, sharded above --max_shard_size), config.json with auto_map, every
remote-code file, the processor and tokenizer files, and a model card (README.md) made with huggingface_hub's
ModelCard: what SHIRG does, the variants and budgets, the results table when one is given, and a runnable demo.
Every folder (OUT, --space) is written as every command of the project writes one (shirg_tools.output_folder):
aside, then swapped into place atomically (a failure or a kill leaves the old folder or nothing, never half of one); a
second publish.py into the same folder while one runs is refused; folders and files get the modes of the user's
umask.

The Space folder (--space) holds app.py, the project packages it imports (lavida_shirg, shirg_tools), the model
as app.py's default model folder, requirements.txt (the runtime requirements; Gradio comes with the Space's SDK) and
a README.md whose front matter declares a Gradio Space (sdk_version: the installed Gradio's, app_file: app.py).
"""

import argparse
import json
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, SpaceCard, SpaceCardData, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from lavida_shirg.configuration_lavida_shirg import DreamTextConfig, ShirgConfig
from shirg_tools.inference import check_weight_files
from shirg_tools.output_folder import OutputFolderError, write_folder
from shirg_tools.run_record import CONVERSION_RECORD, RUN_RECORD

ROOT = Path(__file__).resolve().parent
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SPACE_PACKAGES = ("lavida_shirg", "shirg_tools")  # the project packages app.py imports, copied whole
TAGS = ["custom_code", "lavida", "shirg", "diffusion", "token-pruning", "multimodal", "ocr"]


# the model a card describes, by its text_config.model_type (a LLaDA decoder otherwise)
BACKBONE_NAMES = {DreamTextConfig.model_type: ("LaViDa-Dream", "Dream-7B")}
LLADA_NAMES = ("LaViDa-LLaDA", "LLaDA-8B")


class PublishError(ValueError):
    """A publication that cannot be done as asked; the message names the argument."""


def check_repo_id(repo_id):
    """Raise PublishError unless `repo_id` is a valid Hub repository id ("namespace/name")."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"--push_to_hub {repo_id!r} is not a valid repository id: {error}") from error
    if "/" not in repo_id:
        raise PublishError(f"--push_to_hub {repo_id!r} must be 'namespace/name'")


def check_model_folder(model):
    """Raise PublishError unless `model` is a saved lavida_shirg model whose config maps AutoModel to remote code."""
    config_path = Path(model) / "config.json"
    if not config_path.is_file():
        raise PublishError(f"--model {str(model)!r} has no config.json (save the model with save_pretrained)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") != "lavida_shirg":
        raise PublishError(f"--model {str(model)!r} is a {config.get('model_type')!r} model, not lavida_shirg")
    auto_map = config.get("auto_map", {})
    if "AutoModel" not in auto_map or "AutoConfig" not in auto_map:
        raise PublishError(
            f"--model {str(model)!r}: config.json lacks auto_map for AutoConfig/AutoModel, so the published folder "
            "could not be loaded with trust_remote_code; save it from a LavidaShirgForMaskedDiffusion"
        )
    try:
        check_weight_files(Path(model), "--model")
    except ValueError as error:
        raise PublishError(str(error)) from error


def demo_snippet(repo_id, method, budget):
    """The model card's demo: the image-text-to-text pipeline, then generate() with a SHIRG budget."""
    return "\n".join([
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline",
        "",
        'image = Image.new("RGB", (640, 480), "white")  # your image: Image.open("page.png")',
        'messages = [{"role": "user", "content": [{"type": "image", "image": image},',
        '                                         {"type": "text", "text": "What is the title?"}]}]',
        f'reader = pipeline("image-text-to-text", model="{repo_id}", trust_remote_code=True)',
        'print(reader(text=messages, max_new_tokens=32, return_full_text=False)[0]["generated_text"])',
        "",
        f'model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True).eval()',
        f'processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,",
        f'                                       return_tensors="pt", selection_method="{method}", selection_budget={budget})',
        "sequences = model.generate(**inputs, max_new_tokens=32)  # the inputs carry their SHIRG settings",
        'print(processor.decode_answers(sequences[:, inputs["input_ids"].shape[1]:])[0])',
    ])


def adapter_snippet(repo_id, base_model):
    """The adapter card's demo: the base model with trust_remote_code, then the PEFT adapter on top."""
    return "\n".join([
        "from peft import PeftModel",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f'base = AutoModelForImageTextToText.from_pretrained("{base_model}", trust_remote_code=True)',
        f'model = PeftModel.from_pretrained(base, "{repo_id}").eval()',
        f'processor = AutoProcessor.from_pretrained("{base_model}", trust_remote_code=True)',
    ])


CITATIONS = """@inproceedings{li2025lavida,
  title = {LaViDa: A Large Diffusion Language Model for Multimodal Understanding},
  author = {Li, Shufan and Kallidromitis, Konstantinos and Bansal, Hritik and Gokul, Akash and Kato, Yusuke and
            Kozuka, Kazuki and Kuen, Jason and Lin, Zhe and Chang, Kai-Wei and Grover, Aditya},
  booktitle = {NeurIPS},
  year = {2025}
}
@article{nie2025llada,
  title = {Large Language Diffusion Models},
  author = {Nie, Shen and Zhu, Fengqi and You, Zebin and Zhang, Xiaolu and Ou, Jingyang and Hu, Jun and Zhou, Jun and
            Lin, Yankai and Wen, Ji-Rong and Li, Chongxuan},
  journal = {arXiv preprint arXiv:2502.09992},
  year = {2025}
}
@inproceedings{zhai2023siglip,
  title = {Sigmoid Loss for Language Image Pre-Training},
  author = {Zhai, Xiaohua and Mustafa, Basil and Kolesnikov, Alexander and Beyer, Lucas},
  booktitle = {ICCV},
  year = {2023}
}"""


def find_record(folder, name):
    """A JSON record (train.py's shirg_run.json, the converter's shirg_conversion.json) in `folder` or its parent (a
    merged model inside the run folder), or None."""
    for candidate in (Path(folder), Path(folder).parent):
        if (candidate / name).is_file():
            return json.loads((candidate / name).read_text())
    return None


def results_section(results_markdown) -> str:
    """eval.py's summary as a part of the card: its headings demoted below the card's '## Results'."""
    if not results_markdown:
        return "No evaluation results were attached to this upload (publish.py --results SUMMARY.md)."
    lines = [("##" + line) if line.startswith("#") else line for line in results_markdown.strip().splitlines()]
    return "\n".join(lines)


def training_section(record, datasets, conversion=None) -> str:
    """Training data and procedure, as the folder proves it: from a train.py run record (shirg_run.json), else the
    converter's record (shirg_conversion.json), else a statement that the weights' origin is unknown."""
    listed = f" Datasets named for this upload: {', '.join(datasets)}." if datasets else ""
    if not record and conversion and "stage1" in conversion:
        parts = conversion["stage1"]
        return (f"Assembled with `{conversion['converter']}` from LaViDa's stage-1 checkpoint "
                f"`{conversion['converted_from']}` (its projector), the language model `{parts['base_lm']}` and the "
                f"vision tower `{parts['vision_tower']}` (its last layer removed), with a random `image_newline` (seed "
                f"{parts['image_newline_seed']}), stored in {conversion['dtype']}: LaViDa's stage-2 starting point, "
                "not fine-tuned; its answers mean nothing until it is trained." + listed)
    if not record and conversion:
        fim = (" It is LaViDa's text-infilling (FIM) checkpoint: pass a draft to the processor (`draft=`)."
               if conversion.get("fim") else "")
        return (f"Weights converted with `{conversion['converter']}` from LaViDa's checkpoint "
                f"`{conversion['converted_from']}` (vision tower, projector and language model as LaViDa trained "
                f"them, stored in {conversion['dtype']}); no further training." + fim + listed)
    if not record:
        return ("This folder carries no record of where its weights came from (neither a train.py run record nor a "
                "converter record): they may be randomly initialised, and results obtained with them say nothing "
                "about LaViDa or SHIRG." + listed)
    data, shirg, lora = record.get("data", {}), record.get("shirg", {}), record.get("resolved", {})
    training = record.get("training", {})
    full = record.get("lora", {}).get("training_mode") == "full"
    model = record.get("model", {})
    source = data.get("data_path") or ""
    if data.get("data_format") == "synthetic-ocr":
        source = f"task {data.get('synthetic_task', 'ocr')!r}, seed {data.get('synthetic_seed')}"
    rows = [
        ("model", model.get("model_name_or_path") or f"preset {model.get('preset')}"),
        ("data", f"{data.get('data_format')} {source}".strip()),
        ("token budgets per step", ", ".join(map(str, lora.get("budgets", [])))),
        ("selection method", shirg.get("selection_method")),
        ("seed", training.get("seed")),
        ("batch per device x accumulation x processes",
         f"{training.get('per_device_train_batch_size')} x {training.get('gradient_accumulation_steps')} x "
         f"{training.get('world_size')}"),
        ("trained parameters",
         "all (--training_mode full)" if full else f"LoRA plan {json.dumps(lora.get('lora_plan'))}"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    kind = "Mixed-budget full training" if full else "Mixed-budget LoRA fine-tuning"
    return (f"{kind} with `train.py` (LaViDa's complementary-mask diffusion loss; each step draws one token budget "
            "from a seeded schedule). From the run record:\n\n| setting | value |\n| --- | --- |\n" + table)


# what each SHIRG detail term measures (config field detail_term), in the card's words
DETAIL_WORDS = {
    "variance": "the variance of a token's features: the seed's term",
    "centered-variance": "the variance of a token's features once its view's mean token is removed",
    "edge-density": "the spatial edge density of the feature map",
    "pixel-contrast": "the luminance contrast of a token's own pixel patch",
    "local-contrast": "the luminance contrast of a token's own pixel patch above its neighbourhood's",
}

# benchmarks/bench_selection_quality.py on two towers trained from scratch through the project's pipeline (README,
# "Selection quality"): why the default detail term is the pixel contrast, not the seed's feature variance
SELECTION_QUALITY = """\
| K = 256 of 1024 tokens | A: AUC | A: text recall | A: answer recall | B: AUC | B: text recall | B: answer recall |
| --- | --- | --- | --- | --- | --- | --- |
| feature variance alone (the seed's detail term) | 0.036 | 0.006 | 0.009 | 0.182 | 0.135 | 0.052 |
| pixel contrast alone | 0.973 | 0.923 | 0.916 | 0.967 | 0.945 | 0.917 |
| relevance alone | 0.683 | 0.628 | 0.800 | 0.430 | 0.356 | 0.444 |
| shirg-fixed, seed formula (0.7 relevance + 0.3 variance) | 0.510 | 0.447 | 0.613 | 0.296 | 0.228 | 0.224 |
| shirg-fixed, 0.7 relevance + 0.3 pixel contrast (previous default) | 0.960 | 0.899 | 0.936 | 0.860 | 0.808 | 0.750 |
| shirg-v2, seed formula | 0.700 | 0.630 | 0.760 | 0.481 | 0.398 | 0.424 |
| shirg-v2, pixel contrast (previous default) | 0.963 | 0.903 | 0.935 | 0.885 | 0.830 | 0.757 |
| shirg-x, seed formula | 0.510 | 0.227 | 0.252 | 0.296 | 0.149 | 0.147 |
| shirg-x, pixel contrast (previous default) | 0.960 | 0.573 | 0.648 | 0.860 | 0.441 | 0.433 |
| random | 0.503 | 0.248 | 0.220 | 0.498 | 0.242 | 0.204 |"""

# the same benchmark on synthetic canvases and on photographs (scikit-image's photos with pasted text, and two photos
# with real text), tower A's geometry untrained (its relevance is at chance): why the weights are 0.3 / 0.7
PHOTO_QUALITY = """\
| K of 1024 tokens | synthetic AUC | synthetic recall@256 | photo AUC | photo @128 | photo @256 | photo @512 |
| --- | --- | --- | --- | --- | --- | --- |
| shirg-fixed, 0.7 relevance + 0.3 pixel contrast (previous default) | 0.888 | 0.821 | 0.819 | 0.518 | 0.708 | 0.871 |
| shirg-fixed, 0.3 relevance + 0.7 pixel contrast (default) | 0.971 | 0.915 | 0.956 | 0.796 | 0.926 | 0.980 |
| shirg-v2, 0.3 relevance + 0.7 pixel contrast + 0.15 edges (default) | 0.974 | 0.918 | 0.957 | 0.799 | 0.926 | 0.979 |
| shirg-x, previous default (suppression 0.5) | 0.888 | 0.422 | 0.819 | 0.335 | 0.551 | 0.831 |
| shirg-x, default (no suppression) | 0.971 | 0.915 | 0.956 | 0.796 | 0.926 | 0.980 |
| DivPrune | - | 0.970 | - | 0.667 | 0.792 | 0.907 |
| random | 0.503 | 0.248 | 0.500 | 0.126 | 0.244 | 0.499 |"""


def card_text(repo_id, config, results_markdown, base_model, adapter, record=None, datasets=None, conversion=None):
    """Markdown body of the card (the YAML header comes from ModelCardData)."""
    budgets = ", ".join(str(b) for b in config["budget_choices"])
    method, budget = "shirg-fixed", config["selection_budget"]
    detail = config.get("detail_term", ShirgConfig.detail_term)  # a config saved before the field: the default
    snippet = adapter_snippet(repo_id, base_model) if adapter else demo_snippet(repo_id, method, budget)
    adapter_line = f"\nThis repository holds a LoRA adapter (PEFT) for the base model `{base_model}`.\n" if adapter else ""
    model_name, lm_name = BACKBONE_NAMES.get(config.get("text_config", {}).get("model_type"), LLADA_NAMES)
    return f"""# {repo_id.split("/")[-1]}

{model_name} (SigLIP-so400m + 2-layer MLP projector + {lm_name} masked-diffusion LM) with **SHIRG**, a
text-conditioned, coverage-guaranteed selection of high-resolution vision tokens. Instead of pooling every 384px
view to 14x14 tokens (which blurs small text), SHIRG looks at the image at high resolution (one
{config["hires_image_size"]}px view through SigLIP with interpolated position embeddings) and keeps only K tokens:
the ones most relevant to the question (cosine similarity with the question in the LM's embedding space) plus a
detail term ({DETAIL_WORDS[detail]}),
with at least one token from every region of the image. The LM prefix, and the KV cache it reuses at every
diffusion step, stays small.
{adapter_line}
## Usage

```python
{snippet}
```

Answers come from LaViDa's masked-diffusion sampler behind `generate()`: every step predicts all masked answer
positions and commits the most confident ones. Its settings (`max_new_tokens`, `steps`, `block_length`,
`schedule="shift"` with LaViDa's a = 3, `do_sample`/`temperature`, `top_k`/`top_p`, `output_history`) live in
`generation_config.json`. Defaults of this upload: `{json.dumps(config["generation"])}`.

## Variants and budgets

Choose per call, once: give `selection_method` / `selection_budget` (and optional `selection_options`) to the
processor (or the pipeline); its output carries them to the model:

| `selection_method` | image tokens the LM receives |
| --- | --- |
| `pooled` | LaViDa's own pooled anyres layout (the baseline) |
| `full` | every high-resolution token |
| `shirg-fixed` | K tokens: every 4x4 region's best, then the top of relevance + detail (`detail_term={detail}`) |
| `shirg-v2` | K tokens from clustered coverage + a summary of the dropped tokens |
| `shirg-x` | LaViDa's global-view tokens as a scaffold + K tokens (neighbour suppression opt-in) |
| `random`, `top-norm`, `visionzip`, `divprune` | comparison baselines at budget K |

Budgets used: {budgets} (default {budget}). Smaller budgets are faster (shorter prefix, smaller KV cache); larger
ones keep more fine text. `processor.image_token_count((height, width), method, budget)` gives the count in advance.

## Selection quality

Does the detail term point at text? On synthetic OCR images, a text token is a high-resolution token whose patch
holds ink; AUC = P(a text token scores above a background token); recall = fraction of the text tokens (answer
recall: of the answer's text) kept at K = 256 of 1024. Two towers trained from scratch on synthetic OCR (A:
96-wide, 4 layers, 6 px patches; B: 64-wide, 3 layers, 4 px patches; 32 x 32 tokens each), 24 held-out images,
measured with `benchmarks/bench_selection_quality.py` of the project repository:

{SELECTION_QUALITY}

The seed's feature variance ranks background above text (as the feature norm does: outlier / register tokens sit
in the background), so the default detail term is the pixel contrast of each token's own patch. Choose the term
per call with `selection_options={{"detail_term": ...}}` (`variance`, `centered-variance`, `edge-density`,
`pixel-contrast`, `local-contrast`); `"variance"` with the weights 0.7 / 0.3 is the seed's formula, which scored below
the default on every tower and budget measured.

On photographs, a question relevance near chance drowned the detail term at the previous weights (0.7 relevance):
the weights are now 0.3 relevance / 0.7 detail (SHIRG-v2: 0.3 / 0.7 + 0.15 edges) and SHIRG-X's neighbour
suppression is off, chosen on both sets at K = 128 / 256 / 512 (48 photos: 46 composites of scikit-image's photos with
pasted text, 2 photos of real text with hand-drawn boxes):

{PHOTO_QUALITY}

`selection_options=SELECTION_PRESETS["seed"]` (the seed's formula) and `SELECTION_PRESETS["synthetic-tuned"]` (the
previous default) keep both reachable. These are small towers and synthetic or composited images, and the real
LM's relevance may deserve more weight: measure the real SigLIP tower with the benchmark before relying on them.

## Results

{results_section(results_markdown)}

## Intended use and limitations

For research on visual question answering over text-heavy images (documents, charts, scene text) and on
token pruning for diffusion vision-language models: comparing SHIRG's variants and budgets with LaViDa's pooled
baseline and other pruning methods, e.g. with lmms-eval (`--model lavida_shirg`). Not for decisions about people
or any use where a wrong answer causes harm: like LaViDa, the model can misread text and state wrong answers
fluently. SHIRG's scores are a plan being measured, not a guarantee that text is kept: check the kept-patch
overlays (`eval.py`) on your own data. English prompts only were evaluated. Inference of the 8B model needs a GPU
with about 17 GB of memory in bf16.

## Training data and procedure

{training_section(record, datasets, conversion)}

## Citation

```bibtex
{CITATIONS}
```
"""


def build_card(repo_id, config, results_markdown=None, base_model=None, datasets=None, license_name="apache-2.0",
               adapter=False, record=None, conversion=None):
    """The ModelCard of a model (or adapter) upload."""
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="image-text-to-text",
        tags=TAGS,
        base_model=base_model,
        datasets=datasets or None,
        license=license_name,
        base_model_relation="adapter" if adapter else None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + card_text(repo_id, config, results_markdown, base_model,
                                                                   adapter, record, datasets, conversion))


def export_model(model_path, out, repo_id, results=None, base_model=None, datasets=None, license_name="apache-2.0",
                 max_shard_size="5GB", overwrite=False):
    """Write the Hub folder of a saved model: weights, config, remote code, processor, card. Returns `out`."""
    from transformers import AutoModel, AutoProcessor

    check_model_folder(model_path)
    results_markdown = Path(results).read_text() if results else None
    with write_folder(out, "OUT", overwrite) as tmp:  # aside, then swapped in (shirg_tools.output_folder)
        model = AutoModel.from_pretrained(model_path, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        processor.save_pretrained(tmp)
        generation = json.loads((tmp / "generation_config.json").read_text())
        config = {**json.loads((tmp / "config.json").read_text()),
                  "generation": {key: value for key, value in generation.items() if not key.startswith("_")
                                 and key != "transformers_version" and value is not None}}
        build_card(repo_id, config, results_markdown, base_model, datasets, license_name,
                   record=find_record(model_path, RUN_RECORD),
                   conversion=find_record(model_path, CONVERSION_RECORD)).save(tmp / "README.md")
    return Path(out)


def export_adapter(adapter_path, out, repo_id, base_model, results=None, datasets=None, license_name="apache-2.0",
                   overwrite=False):
    """Write the Hub folder of a PEFT adapter (its files + a card with base_model_relation adapter)."""
    missing = [name for name in ADAPTER_FILES if not (Path(adapter_path) / name).is_file()]
    if missing:
        raise PublishError(f"--adapter {str(adapter_path)!r} lacks {missing} (save it with PeftModel.save_pretrained)")
    if not base_model:
        raise PublishError("--adapter needs --base_model (the model the adapter was trained on)")
    results_markdown = Path(results).read_text() if results else None
    with write_folder(out, "OUT", overwrite) as tmp:
        for name in os.listdir(adapter_path):
            if name.startswith("adapter_") or name == "training_args.json":
                shutil.copy2(Path(adapter_path) / name, tmp / name)
        build_card(repo_id, DEFAULT_CARD_CONFIG, results_markdown, base_model, datasets, license_name, adapter=True,
                   record=find_record(adapter_path, RUN_RECORD)).save(
            tmp / "README.md"
        )
    return Path(out)


def space_requirements() -> str:
    """requirements.txt of a Space: the project's runtime requirements (requirements-runtime.txt without its
    comments); Gradio itself is installed by the Space's SDK at the README's sdk_version."""
    lines = (ROOT / "requirements-runtime.txt").read_text().splitlines()
    kept = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    return "# the runtime requirements of lavida-shirg; gradio comes with the Space (README sdk_version)\n" + \
        "\n".join(kept) + "\n"


def space_card(model_folder: str, license_name: str) -> SpaceCard:
    """The Space's README.md: Gradio Space front matter (installed Gradio version, app.py) and what the page does."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"  # the interpreter the app ran under here
    data = SpaceCardData(title="LaViDa-SHIRG token selection", sdk="gradio", sdk_version=version("gradio"),
                         python_version=python, app_file="app.py", license=license_name, tags=TAGS,
                         emoji="🔍", colorFrom="indigo", colorTo="yellow", pinned=False,
                         short_description="Which image tokens each LaViDa-SHIRG variant keeps, and its answer")
    body = f"""# LaViDa-SHIRG: which image tokens does each variant keep?

Upload an image (or pick a built-in synthetic example), ask a question, tick variants (LaViDa's pooled layout, all
high-resolution tokens, SHIRG-Fixed / v2 / X and the baselines random, top-norm, VisionZip and DivPrune at the budget
of the slider) and run. Per variant the page shows the answer, the image tokens the language model received, the
latency of the call, the prefix KV cache, and the overlay of the high-resolution patches it kept (bright, orange
outline) and dropped (dim).

The model is the folder `{model_folder}/` of this Space. Run the page locally with `python app.py` (`--help` for the
model folder, device, dtype, host and port).
"""
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n\n" + body)


def export_space(model_path, out, repo_id, license_name="apache-2.0", overwrite=False):
    """Write the Space folder (see the module docstring) running app.py on the saved model `model_path`. Returns
    `out`."""
    import app  # its default model folder is where the Space's model goes

    check_model_folder(model_path)
    with write_folder(out, "--space", overwrite) as tmp:
        shutil.copy2(ROOT / "app.py", tmp / "app.py")
        for package in SPACE_PACKAGES:
            shutil.copytree(ROOT / package, tmp / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        model_name = app.DEFAULT_MODEL.name
        export_model(model_path, tmp / model_name, repo_id, license_name=license_name)
        (tmp / "requirements.txt").write_text(space_requirements())
        space_card(model_name, license_name).save(tmp / "README.md")
    return Path(out)


# what an adapter card shows about the base model's selection settings (the real preset's defaults)
DEFAULT_CARD_CONFIG = {"hires_image_size": 672, "budget_choices": [512, 768, 1024], "selection_budget": 768,
                       "generation": {"max_new_tokens": 32}}


def push_folder(folder, repo_id, private=False, revision=None):
    """Create the Hub repository (if needed) and upload the folder; clear errors for a missing token or a refusal.

    The local folder is never modified.
    """
    check_repo_id(repo_id)
    token = get_token()
    if token is None:
        raise PublishError(
            f"--push_to_hub {repo_id}: no Hugging Face token found (run `hf auth login` or set HF_TOKEN); the "
            f"folder {str(folder)!r} is intact"
        )
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 commit_message="Upload lavida-shirg")
    except HfHubHTTPError as error:
        raise PublishError(f"--push_to_hub {repo_id}: the Hub refused the push ({error}); the folder "
                           f"{str(folder)!r} is intact") from error


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a saved lavida_shirg model folder (save_pretrained output or converted)")
    source.add_argument("--adapter", help="a PEFT adapter folder (train.py's output)")
    parser.add_argument("out", nargs="?", help="the Hub-ready folder to write (optional with --space)")
    parser.add_argument("--space", metavar="FOLDER", help="also (or only) write a Hugging Face Space folder running "
                        "the Gradio app (app.py) on --model")
    parser.add_argument("--repo_id", default=None, help="repository id shown in the card (default: --push_to_hub)")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--results", default=None, help="a Markdown results table (eval.py's summary) for the card")
    parser.add_argument("--base_model", default=None, help="base model id (required with --adapter)")
    parser.add_argument("--datasets", nargs="*", default=None, help="dataset ids for the card metadata")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--max_shard_size", default="5GB")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.out is None and args.space is None:
            raise PublishError("give OUT (the Hub folder to write) or --space FOLDER (a Space folder), or both")
        if args.space and not args.model:
            raise PublishError("--space runs the app on a model: pass --model FOLDER (not --adapter)")
        if args.push_to_hub:
            check_repo_id(args.push_to_hub)
            if args.out is None:
                raise PublishError("--push_to_hub uploads OUT: give the folder to write (the Space folder is "
                                   "uploaded with `hf upload --repo-type space`)")
        repo_id = args.repo_id or args.push_to_hub or "your-namespace/lavida-shirg"
        if args.results and not Path(args.results).is_file():
            raise PublishError(f"--results {args.results!r} is not a file")
        if args.space:
            space = export_space(args.model, args.space, repo_id, args.license, args.overwrite)
            print(f"wrote the Space folder {space}: upload it with `hf upload --repo-type space NAMESPACE/NAME "
                  f"{space}`")
        if args.out is None:
            return 0
        if args.model:
            folder = export_model(args.model, args.out, repo_id, args.results, args.base_model, args.datasets,
                                  args.license, args.max_shard_size, args.overwrite)
        else:
            folder = export_adapter(args.adapter, args.out, repo_id, args.base_model, args.results, args.datasets,
                                    args.license, args.overwrite)
        print(f"wrote {folder} ({len(os.listdir(folder))} files)")
        if args.push_to_hub:
            info = push_folder(folder, args.push_to_hub, args.private, args.revision)
            print(f"pushed to {args.push_to_hub}: {info.commit_url}")
    except (PublishError, OutputFolderError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
