"""Evaluation tasks: registry, dataset loading through `datasets` (a local folder, or the Hub when online), column
checks, and per-sample decoding that records an unreadable image as that sample's error.

Tasks (lmms-eval's prompts and splits; answer lengths as LaViDa evaluates them):

| task | dataset (config, split) | metric | answer tokens | LaViDa-LLaDA reported |
| --- | --- | --- | --- | --- |
| textvqa | lmms-lab/textvqa (validation) | VQA accuracy | 16 | 56.3 (val) |
| docvqa | lmms-lab/DocVQA (DocVQA, validation) | ANLS | 32 | 59.0 (test, server-scored) |
| infovqa | lmms-lab/DocVQA (InfographicVQA, validation) | ANLS | 32 | 34.2 (test, server-scored) |
| chartqa | lmms-lab/ChartQA (test) | relaxed accuracy | 16 | 64.6 (test) |
| synthetic-ocr | shirg_tools.synthetic_ocr, fixed evaluation seed | ANLS | 16 | - |

The model sees the image and the task's prompt (`TaskSpec.prompt`), lmms-eval's doc_to_text with its default
lmms_eval_specific_kwargs: pre_prompt (empty for all four) + question + post_prompt, the TextVQA question through
str.capitalize() ("What is the BRAND?" -> "What is the brand?"); OCR tokens are never added (textvqa's `ocr: false`).
"""

import dataclasses
import io
import os
from pathlib import Path

from PIL import Image

from shirg_tools.synthetic_ocr import SYNTHETIC_OCR_PROMPT_SUFFIX

# the seed of the synthetic evaluation set (training draws its samples from other seeds)
SYNTHETIC_EVAL_SEED = 20250917
SYNTHETIC_DEFAULT_SIZE = 32

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


class TaskError(ValueError):
    """A task that cannot run: unknown name, unloadable data, missing columns."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How to read one benchmark: columns, metric, answer length, prompt (suffix; whether lmms-eval capitalises the
    question) and the LaViDa reference."""

    name: str
    hub_path: str | None
    hub_config: str | None
    split: str
    metric: str
    gen_length: int
    post_prompt: str
    question_column: str = "question"
    answers_column: str = "answers"
    id_column: str | None = None
    image_column: str = "image"
    extra_columns: tuple = ()
    reference: str = "-"
    capitalize_question: bool = False

    def required_columns(self) -> list:
        """The columns a dataset of this task must have."""
        columns = [self.image_column, self.question_column, self.answers_column, *self.extra_columns]
        return columns + ([self.id_column] if self.id_column else [])

    def prompt(self, question: str) -> str:
        """The text of the user turn for `question`, as lmms-eval's doc_to_text of the task writes it."""
        return (question.capitalize() if self.capitalize_question else question) + self.post_prompt

    def prompt_template(self) -> str:
        """The user turn the model sees ({question} replaced; the image comes first, as LaViDa's template puts it)."""
        question = "{question.capitalize()}" if self.capitalize_question else "{question}"
        return "<image>\n" + question + self.post_prompt


TASKS = {
    "textvqa": TaskSpec("textvqa", "lmms-lab/textvqa", None, "validation", "vqa_accuracy", 16, SHORT_ANSWER,
                        id_column="question_id", reference="56.3 (val)", capitalize_question=True),
    "docvqa": TaskSpec("docvqa", "lmms-lab/DocVQA", "DocVQA", "validation", "anls", 32, SHORT_ANSWER,
                       id_column="questionId", reference="59.0 (test, server-scored)"),
    "infovqa": TaskSpec("infovqa", "lmms-lab/DocVQA", "InfographicVQA", "validation", "anls", 32, SHORT_ANSWER,
                        id_column="questionId", reference="34.2 (test, server-scored)"),
    "chartqa": TaskSpec("chartqa", "lmms-lab/ChartQA", None, "test", "relaxed_accuracy", 16,
                        "\nAnswer the question with a single word.", answers_column="answer", reference="64.6 (test)"),
    "synthetic-ocr": TaskSpec("synthetic-ocr", None, None, "eval", "anls", 16, SYNTHETIC_OCR_PROMPT_SUFFIX,
                              extra_columns=("text_boxes", "answer_box")),
}


@dataclasses.dataclass
class EvalSample:
    """One question: id (str), question, reference answers, the RGB image (None when it could not be read, then
    `error` says why), and for the synthetic set the pixel boxes of its texts and the index of the answer's box."""

    id: str
    question: str
    answers: list
    image: Image.Image | None
    error: str | None = None
    text_boxes: list | None = None
    answer_box: int | None = None


def parse_task_names(text: str) -> list:
    """A comma-separated task list -> names, in order; unknown names raise TaskError listing the valid ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise TaskError(f"unknown task(s) {unknown or [text]}; tasks: {', '.join(TASKS)}")
    return names


def synthetic_config(overrides: dict):
    """The synthetic OCR generator's config with the evaluation seed and `overrides` (field -> text, parsed by the
    type of the field's default) on the settings of the named task (option "task", default "ocr"; see
    synthetic_ocr.SYNTHETIC_TASKS); unknown fields or tasks raise TaskError listing the valid ones."""
    from shirg_tools.synthetic_ocr import SYNTHETIC_TASKS, SyntheticOCRConfig

    overrides = dict(overrides)
    task = overrides.pop("task", "ocr")
    if task not in SYNTHETIC_TASKS:
        raise TaskError(f"--synthetic task={task}: unknown task; tasks: {', '.join(sorted(SYNTHETIC_TASKS))}")
    fields = {field.name: field for field in dataclasses.fields(SyntheticOCRConfig)}
    defaults = SYNTHETIC_TASKS[task]
    values = {"seed": SYNTHETIC_EVAL_SEED}
    for name, text in overrides.items():
        if name not in fields:
            raise TaskError(f"unknown --synthetic option {name!r}; options: task (one of "
                            f"{', '.join(sorted(SYNTHETIC_TASKS))}) and the SyntheticOCRConfig fields "
                            f"{', '.join(fields)}")
        values[name] = _parse_like(getattr(defaults, name), text, name)
    return dataclasses.replace(defaults, **values)


def _parse_like(default, text: str, name: str):
    """`text` parsed as the type of `default` (bool, int, float, str, or a tuple/list of ints or strings written
    a/b)."""
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise TaskError(f"--synthetic {name} takes true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, (tuple, list)):
        parts = [part.strip() for part in text.split("/")]
        if default and all(isinstance(item, str) for item in default):
            return type(default)(parts)
        if not all(part.lstrip("-").isdigit() for part in parts):
            raise TaskError(f"--synthetic {name} takes integers separated by '/', got {text!r}")
        return type(default)(int(part) for part in parts)
    if isinstance(default, (int, float)):
        if not text.replace(".", "", 1).lstrip("-").isdigit():
            raise TaskError(f"--synthetic {name} takes a number, got {text!r}")
        return type(default)(float(text)) if isinstance(default, float) else int(text)
    return text


def load_task_dataset(spec: TaskSpec, data_path: str | None, limit: int | None, synthetic_options: dict):
    """The task's `datasets.Dataset` (first `limit` rows), its columns checked; images left undecoded.

    data_path: a `save_to_disk` folder (a DatasetDict gives its `split`), a folder of data files (parquet, json,
    ...; a Hub snapshot folder included: for a config, its subfolder named like the config is used when present),
    or a single data file. None: the Hub (refused when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set). The
    synthetic task generates `limit` (default SYNTHETIC_DEFAULT_SIZE) samples with the evaluation seed.
    """
    if spec.name == "synthetic-ocr":
        from shirg_tools.synthetic_ocr import synthetic_ocr_dataset

        dataset = synthetic_ocr_dataset(limit or SYNTHETIC_DEFAULT_SIZE, synthetic_config(synthetic_options))
    elif data_path is not None:
        dataset = _load_local(spec, Path(data_path))
    else:
        offline = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
                   if os.environ.get(name, "").lower() in ("1", "true", "yes", "on")]
        if offline:
            raise TaskError(f"task {spec.name}: no --data {spec.name}=PATH given and the Hub is offline "
                            f"({offline[0]} is set): download {spec.hub_path} and pass its folder")
        from datasets import load_dataset

        dataset = load_dataset(spec.hub_path, spec.hub_config, split=spec.split)
    check_columns(spec, dataset.column_names)
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return _without_image_decoding(dataset, spec.image_column)


def _load_local(spec: TaskSpec, path: Path):
    """A local copy of the task's split (see `load_task_dataset`)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if not path.exists():
        raise TaskError(f"task {spec.name}: --data path {str(path)!r} does not exist")
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if spec.split not in data:
                raise TaskError(f"task {spec.name}: {str(path)!r} has splits {list(data)}, not {spec.split!r}")
            data = data[spec.split]
        return data
    if path.is_file():
        return load_dataset(path.suffix.lstrip(".").replace("jsonl", "json"), data_files=str(path), split="train")
    if spec.hub_config and (path / spec.hub_config).is_dir():
        path = path / spec.hub_config
    return load_dataset(str(path), split=spec.split)


def check_columns(spec: TaskSpec, columns: list):
    """TaskError naming the missing columns (and the ones present) when the dataset lacks a required column."""
    missing = [column for column in spec.required_columns() if column not in columns]
    if missing:
        raise TaskError(f"task {spec.name}: the dataset lacks column(s) {missing}; it has {list(columns)}; "
                        f"{spec.name} needs {spec.required_columns()}")


def _without_image_decoding(dataset, column: str):
    """The dataset with its image column left as bytes/paths (decoded per sample by `decode_image`), when it is an
    `Image` feature."""
    from datasets import Image as ImageFeature

    if isinstance(dataset.features.get(column), ImageFeature):
        return dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def decode_image(value) -> Image.Image:
    """An RGB PIL image from a dataset value: a PIL image, {"bytes": ..., "path": ...} or a path. Raises the PIL /
    OS error of an unreadable image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    elif isinstance(value, dict) and value.get("path"):
        image = Image.open(value["path"])
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise TypeError(f"cannot read an image from a {type(value).__name__}")
    image.load()
    return image.convert("RGB")


def answer_list(value) -> list:
    """Reference answers as a list of strings (a single string becomes a one-element list)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value:
        return [str(item) for item in value]
    raise TypeError(f"answers must be a string or a non-empty list of strings, got {value!r}")


# what decoding one row can raise: unreadable or truncated images (OSError covers PIL's UnidentifiedImageError),
# bad values (TypeError/ValueError), oversized images (DecompressionBombError); they become the sample's error
SAMPLE_ERRORS = (OSError, TypeError, ValueError, Image.DecompressionBombError, SyntaxError)


def make_sample(spec: TaskSpec, row: dict, index: int) -> EvalSample:
    """The EvalSample of dataset row `index`; an image or answer that cannot be read is recorded as its error."""
    sample_id = str(row[spec.id_column]) if spec.id_column else str(index)
    sample = EvalSample(sample_id, str(row[spec.question_column]), [], None)
    if spec.name == "synthetic-ocr":
        sample.text_boxes = [list(map(float, box)) for box in row["text_boxes"]]
        sample.answer_box = int(row["answer_box"])
    try:
        sample.answers = answer_list(row[spec.answers_column])
        sample.image = decode_image(row[spec.image_column])
    except SAMPLE_ERRORS as error:
        sample.error = f"{type(error).__name__}: {error}"
    return sample
