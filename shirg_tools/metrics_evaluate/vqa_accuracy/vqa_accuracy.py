"""TextVQA / VQA accuracy as a local `evaluate` module: evaluate.load("shirg_tools/metrics_evaluate/vqa_accuracy")
(repository root on sys.path). Scores come from shirg_tools.metrics.vqa_accuracy."""

import datasets
import evaluate

from shirg_tools.metrics import vqa_accuracy


class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="VQA accuracy with EvalAI answer normalisation: mean over the leave-one-out subsets of the "
                        "human answers of min(1, matches / 3).",
            citation="Singh et al., Towards VQA Models That Can Read, CVPR 2019.",
            inputs_description="predictions: list of str; references: list of lists of str (the human answers).",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        return {"vqa_accuracy": sum(vqa_accuracy(p, r) for p, r in zip(predictions, references)) / len(predictions)}
