"""The Gradio app's built-in examples: the first held-out samples of the synthetic reading task (the evaluation
seed, so no example was seen in training), and the answer box of an example the user has not changed."""

import numpy as np

from shirg_tools.eval_tasks import SYNTHETIC_EVAL_SEED
from shirg_tools.synthetic_ocr import generate_sample, synthetic_task

EXAMPLE_TASK = "reading"
NUM_EXAMPLES = 6


def demo_examples(count: int = NUM_EXAMPLES) -> list:
    """Samples 0 .. count - 1 of the reading task at the evaluation seed (synthetic_ocr.generate_sample dicts:
    image, question, answers, text_boxes, answer_box, ...)."""
    config = synthetic_task(EXAMPLE_TASK, seed=SYNTHETIC_EVAL_SEED)
    return [generate_sample(index, config) for index in range(count)]


def example_answer_box(examples: list, image, question: str):
    """The (x0, y0, x1, y1) pixel box of the answer when `image` and `question` are those of one of `examples`
    unchanged (same size, RGB pixels and question text), else None (an uploaded image has no known answer)."""
    for example in examples:
        reference = example["image"]
        if (question.strip() == example["question"] and image.mode == reference.mode
                and image.size == reference.size and np.array_equal(np.asarray(image), np.asarray(reference))):
            return example["text_boxes"][example["answer_box"]]
    return None
