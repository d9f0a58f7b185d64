"""Training sources read through `datasets`, each giving (image, question, answer) per index.

- `LlavaJsonSource`: LLaVA-format JSON (e.g. LCS-558K `blip_laion_cc_sbu_558k.json`) + an image folder; one
  user/assistant round per sample, drawn from (seed, index) as LaViDa draws one per conversation.
- `VQASource`: image / question / answers (or answer) columns, in the schemas of lmms-lab/textvqa,
  lmms-lab/DocVQA and lmms-lab/ChartQA, from a `save_to_disk` folder, parquet files or the Hub.
- `SyntheticOCRSource`: `shirg_tools.synthetic_ocr.generate_sample`, rendered on the fly.
- `FimAnswers`: any source with its answers turned into LaViDa's FIM training data (`insert_infill_markers`).

`TrainingSamples` turns a source into a torch Dataset of encoded samples (see `batching.SampleEncoder`): a sample
whose image is missing or corrupt, or that is otherwise unusable, is replaced by another index drawn from
(seed, index, attempt), and every replacement is recorded in the sample's "skipped" list so that the trainer
counts it and reports it (never silently, never a crash mid-epoch).
"""

import collections
import io
import os
import re

import datasets
import numpy as np
import torch
from PIL import Image

from .batching import SkippedSample
from .synthetic_ocr import generate_sample

IMAGE_PLACEHOLDER = "<image>"
REPLACEMENT_ATTEMPTS = 64  # distinct random replacements tried before a sample is declared unreplaceable
PROBE_RECORDS = 100  # LLaVA records whose image files are checked before training
# Hub parquet shards: <split>-00000-of-00003[-<hash>].parquet
SHARD_NAME = re.compile(r"(.+?)-\d{5}-of-\d{5}.*\.parquet$")


def open_image(source, what: str) -> Image.Image:
    """An RGB PIL image, fully decoded, from a path or bytes; SkippedSample("missing image" / "corrupt image")."""
    if isinstance(source, str) and not os.path.isfile(source):
        raise SkippedSample("missing image", f"{what}: {source} does not exist")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # PIL's decoding errors
        raise SkippedSample("corrupt image", f"{what}: {error}") from error


class LlavaJsonSource:
    """Records {"image": relative path, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}."""

    def __init__(self, json_path: str, image_folder: str, seed: int):
        if not os.path.isfile(json_path):
            raise ValueError(f"--data_path {json_path} does not exist (expected a LLaVA-format JSON file)")
        if not image_folder or not os.path.isdir(image_folder):
            raise ValueError(f"--image_folder {image_folder!r} is not a folder (LLaVA JSON records name images "
                             "relative to it)")
        records = datasets.load_dataset("json", data_files=json_path, split="train")
        for column in ("conversations", "image"):
            if column not in records.column_names:
                raise ValueError(f"--data_path {json_path}: the records have no {column!r} field (found "
                                 f"{records.column_names}); LLaVA-format records need 'image' and 'conversations'")
            missing = records.data.column(column).null_count
            if missing:
                raise ValueError(f"--data_path {json_path}: {missing} of {len(records)} records lack {column!r}")
        probe = [os.path.join(image_folder, name) for name in records[:PROBE_RECORDS]["image"]]
        if not any(os.path.isfile(path) for path in probe):
            raise ValueError(f"--image_folder {image_folder}: none of the first {len(probe)} images exists "
                             f"(e.g. {probe[0]})")
        self.records = records
        self.image_folder = image_folder
        self.seed = seed

    def __len__(self):
        return len(self.records)

    def load(self, index: int):
        """(image, question, answer) of one random user/assistant round of record `index`."""
        record = self.records[index]
        rounds = [(first["value"], second["value"]) for first, second in
                  zip(record["conversations"][::2], record["conversations"][1::2])
                  if first["from"] == "human" and second["from"] == "gpt"]
        if not rounds:
            raise SkippedSample("malformed conversation", f"record {index} has no human/gpt round")
        question, answer = rounds[int(np.random.default_rng([self.seed, index]).integers(len(rounds)))]
        image = open_image(os.path.join(self.image_folder, record["image"]), f"record {index}")
        return image, question.replace(IMAGE_PLACEHOLDER, "").strip(), answer.strip()


def majority_answer(answers: list) -> str:
    """The most frequent answer (ties: the first to appear), as VQA training sets use for their 10 answers."""
    counts = collections.Counter(answers)
    return max(answers, key=lambda answer: (counts[answer], -answers.index(answer)))


def load_vqa_table(data_path: str, hub_dataset: str, hub_config: str, split: str) -> datasets.Dataset:
    """The split of a VQA dataset: a `save_to_disk` folder, a parquet file, a folder of parquet files (only the
    shards of `split` when they are named "<split>-00000-of-00003*.parquet", as in Hub snapshots), or a Hub id."""
    if data_path:
        if not os.path.exists(data_path):
            raise ValueError(f"--data_path {data_path} does not exist")
        if os.path.isfile(os.path.join(data_path, "dataset_info.json")) or os.path.isfile(
                os.path.join(data_path, "dataset_dict.json")):
            table = datasets.load_from_disk(data_path)
            if isinstance(table, datasets.DatasetDict):
                if split not in table:
                    raise ValueError(f"--split {split!r} is not in --data_path {data_path} (splits: {list(table)})")
                table = table[split]
            return table
        if data_path.endswith(".parquet"):
            files = [data_path]
        else:
            files = sorted(os.path.join(root, name) for root, _, names in os.walk(data_path)
                           for name in names if name.endswith(".parquet"))
            if not files:
                raise ValueError(f"--data_path {data_path} holds neither a save_to_disk dataset nor parquet files")
            splits = {match.group(1) for match in map(SHARD_NAME.match, map(os.path.basename, files)) if match}
            if splits:  # Hub-style shards "<split>-00000-of-00003*.parquet": keep those of --split
                if split not in splits:
                    raise ValueError(f"--split {split!r} has no parquet shards in --data_path {data_path} "
                                     f"(splits found: {sorted(splits)})")
                files = [f for f in files if os.path.basename(f).startswith(f"{split}-")]
        return datasets.load_dataset("parquet", data_files=files, split="train")
    if not hub_dataset:
        raise ValueError("--data_format vqa needs --data_path (a local dataset) or --hub_dataset (a Hub id)")
    return datasets.load_dataset(hub_dataset, hub_config, split=split)


class VQASource:
    """Rows with an `image` (datasets Image feature), a `question` and `answers` (list) or `answer` (str)."""

    def __init__(self, table: datasets.Dataset, argument: str):
        columns = table.column_names
        answer_column = "answers" if "answers" in columns else "answer" if "answer" in columns else None
        if "image" not in columns or "question" not in columns or answer_column is None:
            raise ValueError(f"{argument}: a VQA dataset needs columns image, question and answers (or answer); "
                             f"found {columns}")
        self.table = table.select_columns(["image", "question", answer_column]).cast_column(
            "image", datasets.Image(decode=False))
        self.answer_column = answer_column

    def __len__(self):
        return len(self.table)

    def load(self, index: int):
        row = self.table[index]
        answers = row[self.answer_column]
        answers = [answers] if isinstance(answers, str) else [a for a in answers or [] if a and a.strip()]
        if not answers:
            raise SkippedSample("no answer", f"row {index} has no answer")
        image = row["image"]
        if image is None:
            raise SkippedSample("missing image", f"row {index} has no image")
        source = image["bytes"] if image.get("bytes") is not None else image.get("path")
        if source is None:
            raise SkippedSample("missing image", f"row {index} has neither image bytes nor a path")
        return open_image(source, f"row {index}"), row["question"] or "", majority_answer(answers)


class SyntheticOCRSource:
    """`num_samples` synthetic OCR samples of `config`, rendered when read."""

    def __init__(self, num_samples: int, config):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"--synthetic_num_samples must be a positive integer, got {num_samples!r}")
        self.num_samples = num_samples
        self.config = config

    def __len__(self):
        return self.num_samples

    def load(self, index: int):
        sample = generate_sample(index, self.config)
        return sample["image"], sample["question"], sample["answers"][0]


FIM_ANSWER_PROBABILITY = 0.8  # LaViDa's train.py: answers of more than 3 words get FIM markers 80% of the time
FIM_MAX_FILL = 5  # K: filler tokens before a marker, k ~ U{0..K}


def insert_infill_markers(answer: str, rng: np.random.RandomState, fim_token: str, fill_token: str) -> str:
    """LaViDa's FIM training answer (train.py with IS_INFILLE_MODEL, infill_utils.insert_infill_substrings).

    An answer of n > 3 words (str.split) is changed with probability 0.8: n_insert ~ U{1..N}, N = min(max(5,
    floor(0.1 n)), 10); min(n_insert, n - 1) distinct word boundaries 1..n-1 each get k ~ U{0..K} (K =
    FIM_MAX_FILL) `fill_token`s and one `fim_token`, as one more word; the words are joined by single spaces.
    Other answers come back unchanged. The draws are LaViDa's, in its order (rand, randint, choice, one randint per
    boundary), from `rng`."""
    words = answer.split()
    if len(words) <= 3 or rng.rand() >= FIM_ANSWER_PROBABILITY:
        return answer
    most = min(max(5, int(len(words) * 0.1)), 10)
    count = rng.randint(1, most + 1)
    boundaries = set(rng.choice(range(1, len(words)), size=min(count, len(words) - 1), replace=False).tolist())
    pieces = []
    for index, word in enumerate(words, start=1):
        pieces.append(word)
        if index in boundaries:
            pieces.append(fill_token * rng.randint(0, FIM_MAX_FILL + 1) + fim_token)
    return " ".join(pieces)


class FimAnswers:
    """A source whose answers are LaViDa's FIM training data: `insert_infill_markers` with a RandomState seeded by
    (seed, index), so a sample is the same in every epoch, process and resumed run."""

    def __init__(self, source, seed: int, fim_token: str, fill_token: str):
        self.source, self.seed, self.fim_token, self.fill_token = source, seed, fim_token, fill_token

    def __len__(self):
        return len(self.source)

    def load(self, index: int):
        image, question, answer = self.source.load(index)
        rng = np.random.RandomState([self.seed, index, 2])
        return image, question, insert_infill_markers(answer, rng, self.fim_token, self.fill_token)


class TrainingSamples(torch.utils.data.Dataset):
    """Encoded samples of the first `max_samples` (default: all) indices of a source; unusable ones replaced by
    seeded random others (see the module docstring).

    Item: the `SampleEncoder.encode` dict plus "skipped": [(index, reason, detail), ...] of the indices tried and
    rejected before it. Raises RuntimeError, naming the reasons, if REPLACEMENT_ATTEMPTS tries all fail.
    """

    def __init__(self, source, encoder, seed: int, max_samples: int | None = None):
        self.source = source
        self.encoder = encoder
        self.seed = seed
        self.length = len(source) if max_samples is None else min(len(source), max_samples)

    def __len__(self):
        return self.length

    def __getitem__(self, index: int) -> dict:
        skipped = []
        replacements = np.random.default_rng([self.seed, index, 1]).integers(self.length, size=REPLACEMENT_ATTEMPTS)
        for candidate in [int(index), *replacements.tolist()]:
            try:
                image, question, answer = self.source.load(candidate)
                return {**self.encoder.encode(image, question, answer), "skipped": skipped}
            except SkippedSample as problem:
                skipped.append((candidate, problem.reason, problem.detail))
        reasons = collections.Counter(reason for _, reason, _ in skipped)
        raise RuntimeError(f"sample {index} and {REPLACEMENT_ATTEMPTS} random replacements are all unusable "
                           f"({dict(reasons)}; e.g. {skipped[0][2]}): check the dataset and --image_folder")
