"""ANLS as a local `evaluate` module: evaluate.load("shirg_tools/metrics_evaluate/anls") (repository root on
sys.path). Scores come from shirg_tools.metrics.anls."""

import datasets
import evaluate

from shirg_tools.metrics import anls


class Anls(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Average normalised Levenshtein similarity (DocVQA / InfographicVQA), threshold 0.5.",
            citation="Biten et al., Scene Text Visual Question Answering, ICCV 2019.",
            inputs_description="predictions: list of str; references: list of lists of str (ground truths).",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references):
        return {"anls": sum(anls(p, r) for p, r in zip(predictions, references)) / len(predictions)}
