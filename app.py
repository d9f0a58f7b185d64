"""A web page to compare the token-selection variants of one LaViDa-SHIRG model on one image (Gradio).

    python app.py --model runs/demo/train             # the model `python demo.py` trains, on http://127.0.0.1:7860
    python app.py --model ./lavida-shirg-llada --device cuda --host 0.0.0.0 --port 7860
    python app.py                                     # reader_model/ beside app.py (a publish.py --space folder)

Upload an image or pick a built-in example (held-out samples of the synthetic reading task), ask a question,
tick variants (LaViDa's pooled layout, all high-resolution tokens, SHIRG-Fixed / v2 / X and the baselines at the
budget of the slider) and run: per variant the answer, the image tokens the LM received, the latency of the call,
the prefix KV cache, and the kept/dropped overlay of eval.py. Bad input (no image, an image the processor refuses,
an empty question, a budget above the token count, no variant) gets a message in the page. The model is used
through shirg_tools.demo_backend only.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

import gradio as gr
import pandas as pd
import torch
from PIL import Image

from shirg_tools.demo_backend import DemoBackend
from shirg_tools.demo_examples import demo_examples, example_answer_box
from shirg_tools.inference import DTYPES

DEFAULT_MODEL = ROOT / "reader_model"
METHOD_LABELS = {
    "pooled": "pooled (LaViDa)", "full": "full (every high-res token)", "shirg-fixed": "SHIRG-Fixed",
    "shirg-v2": "SHIRG-v2", "shirg-x": "SHIRG-X", "random": "random (baseline)", "top-norm": "top-norm (baseline)",
    "visionzip": "VisionZip (baseline)", "divprune": "DivPrune (baseline)",
}
DEFAULT_METHODS = ["pooled", "full", "shirg-fixed", "shirg-v2", "shirg-x"]
TABLE_HEADERS = ["variant", "answer", "image tokens", "latency ms", "KV MB"]
CSS = "#image img { width: 100%; height: 100%; object-fit: contain; }"  # small images fill the input's frame
LEGEND = ("Overlays: bright with an orange outline = high-resolution patches the variant kept, dim = dropped; "
          "yellow lines = coverage regions (SHIRG keeps at least one token in each); cyan = the pooled cells "
          "(pooled) or SHIRG-X's scaffold; green = the answer's box (built-in examples only).")


def open_upload(payload) -> Image.Image:
    """The PIL image of the image input's raw payload (a FileData dict: the event runs without Gradio's
    preprocessing, so that the processor sees the file's own mode and its refusals reach the page); ValueError when
    there is none or PIL cannot open it."""
    if payload is None:
        raise ValueError("no image: upload one or pick an example")
    name = payload.get("orig_name") or Path(payload["path"]).name
    try:
        return Image.open(payload["path"])
    except Image.UnidentifiedImageError:
        raise ValueError(f"the upload {name!r} is not an image PIL can read") from None
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"the upload {name!r} could not be opened: {error}") from error


def results_table(results: list) -> pd.DataFrame:
    """One row per variant result: variant, answer, image tokens, latency ms, KV MB."""
    rows = [[r.label, r.answer, r.image_tokens, round(r.latency_ms, 1), round(r.kv_mb, 3)] for r in results]
    return pd.DataFrame(rows, columns=TABLE_HEADERS)


def build_app(backend: DemoBackend, examples: list) -> gr.Blocks:
    """The page: inputs (image, examples, question, variants, budget), the Run button, then a status line, the
    results table and the overlay gallery."""

    def run_query(image, question, variants, budget, progress=gr.Progress()):
        """(results table, overlay gallery, status) of every chosen variant; bad input: empty ones and a message."""
        question = question or ""
        try:
            picture = open_upload(image)
            jobs = backend.prepare(picture, question, backend.variants(variants or [], budget))
        except ValueError as error:
            gr.Warning(str(error))
            return results_table([]), [], f"**Cannot run:** {error}"
        answer_box = example_answer_box(examples, picture, question)
        results = []
        for index, job in enumerate(jobs):
            progress((index, len(jobs)), desc=f"running {job.variant.label}")
            results.append(backend.run(job, answer_box))
        gallery = [(result.panel, result.label) for result in results]
        status = (f"Ran {len(results)} variant(s) on a {picture.width} x {picture.height} image. Latency: one call "
                  "per variant (image encoding, selection, prefill and every diffusion step).")
        return results_table(results), gallery, status

    with gr.Blocks(title="LaViDa-SHIRG variants", analytics_enabled=False) as app:
        gr.Markdown("# LaViDa-SHIRG: which image tokens does each variant keep?\n"
                    f"Model: `{backend.label}`. {LEGEND}")
        question = gr.Textbox(label="question", placeholder="What is written in the red box?", elem_id="question",
                              render=False)
        with gr.Row():
            with gr.Column():
                # the run event reads the file itself (open_upload); examples set into it are saved as PNG
                image = gr.Image(label="image", format="png", sources=["upload", "clipboard"], height=320,
                                 elem_id="image")
                gr.Examples([[example["image"], example["question"]] for example in examples],
                            inputs=[image, question], label="built-in examples (held-out synthetic reading task)",
                            elem_id="examples")
            with gr.Column():
                question.render()
                variants = gr.CheckboxGroup([(label, method) for method, label in METHOD_LABELS.items()],
                                            value=DEFAULT_METHODS, label="variants", elem_id="variants")
                budget = gr.Slider(1, backend.full_tokens, value=backend.default_budget, step=1,
                                   label=f"budget: high-resolution tokens kept (of {backend.full_tokens})",
                                   elem_id="budget")
                run = gr.Button("Run", variant="primary", elem_id="run")
                status = gr.Markdown(label="status", elem_id="status")
        table = gr.Dataframe(headers=TABLE_HEADERS, label="results", interactive=False, elem_id="results")
        gallery = gr.Gallery(label="kept / dropped patches", format="png", columns=5, height="auto",
                             object_fit="contain", elem_id="overlays")
        run.click(run_query, inputs=[image, question, variants, budget], outputs=[table, gallery, status],
                  api_name="run", preprocess=False)
    return app


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a lavida_shirg model folder (converted checkpoint, or a train.py output "
                        f"folder with its merged/ model); default: {DEFAULT_MODEL.name}/ beside app.py, where "
                        "publish.py --space puts the model")
    parser.add_argument("--host", help="address to serve on, e.g. 0.0.0.0 for every interface (default: Gradio's, "
                        "$GRADIO_SERVER_NAME or 127.0.0.1; a Hugging Face Space sets 0.0.0.0)")
    parser.add_argument("--port", type=int, help="port to serve on (default: Gradio's, $GRADIO_SERVER_PORT or the "
                        "first free one from 7860)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="model dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model is None and not DEFAULT_MODEL.is_dir():
        print(f"error: no --model given and no {DEFAULT_MODEL} folder; pass --model FOLDER (`python demo.py` "
              "trains one into runs/demo/train)", file=sys.stderr)
        return 2
    try:
        backend = DemoBackend.from_folder(Path(args.model or DEFAULT_MODEL), args.device, args.dtype)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    build_app(backend, demo_examples()).launch(server_name=args.host, server_port=args.port, show_error=True, css=CSS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
