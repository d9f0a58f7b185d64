"""ChartQA relaxed accuracy as a local `evaluate` module:
evaluate.load("shirg_tools/metrics_evaluate/relaxed_accuracy") (repository root on sys.path). Scores come from
shirg_tools.metrics.relaxed_accuracy."""

import datasets
import evaluate

from shirg_tools.metrics import relaxed_accuracy


class RelaxedAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ChartQA relaxed accuracy: numbers within 5% relative error ('%' handled), otherwise a "
                        "case-insensitive exact match.",
            citation="Masry et al., ChartQA, Findings of ACL 2022.",
            inputs_description="predictions: list of str; references: list of lists of str (targets).",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        scores = [relaxed_accuracy(p, r) for p, r in zip(predictions, references)]
        return {"relaxed_accuracy": sum(scores) / len(scores)}
