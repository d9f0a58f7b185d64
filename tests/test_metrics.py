"""The OCR-VQA metrics on hand-made cases with exact expected values, and equal to lmms-eval's own functions."""

import pytest
from lmms_eval.api.metrics import anls as lmms_eval_anls
from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor
from PIL import ImageFile

from shirg_tools.metrics import anls, exact_match, levenshtein, normalize_vqa_answer, relaxed_accuracy, vqa_accuracy

STRICT_PIL = ImageFile.LOAD_TRUNCATED_IMAGES
# importing an lmms-eval task module sets PIL's LOAD_TRUNCATED_IMAGES = True for the process (lmms_eval.api.task)
from lmms_eval.tasks.chartqa.utils import relaxed_correctness  # noqa: E402
from lmms_eval.tasks.textvqa.utils import textvqa_process_results  # noqa: E402

ImageFile.LOAD_TRUNCATED_IMAGES = STRICT_PIL


@pytest.mark.parametrize("raw,expected", [
    ("The Coca-Cola.", "coca cola"),  # article dropped, '-' not next to a space -> space, final period removed
    ("Ten dollars", "10 dollars"),
    ("dont", "don't"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("e.g.", "eg"),
    ("hello, world?", "hello world"),
    ("yes!", "yes"),
    ("a/b", "b"),  # '/' -> space, then the article 'a' goes
    ("12,000", "12000"),
    ("it's", "it 's"),
    ("left - right", "left right"),  # '-' touching a space is removed, not replaced
    ("  Line\tbreak\nhere ", "line break here"),
    ("None", "0"),
])
def test_evalai_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected == EvalAIAnswerProcessor()(raw)


@pytest.mark.parametrize("matching,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(matching, expected):
    """m of 10 humans agree: subsets without a matching answer see m matches, the m others see m - 1."""
    answers = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("Two", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_both_sides():
    answers = ["coca cola"] * 2 + ["Coca-Cola"] * 2 + ["pepsi"] * 6
    assert vqa_accuracy("The Coca-Cola.", answers) == pytest.approx(1.0)
    assert vqa_accuracy("pepsi", ["Pepsi"]) == 0.0  # one answer: its only leave-one-out subset is empty
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("x", [])


@pytest.mark.parametrize("first,second,distance", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "abc", 0),
                                                   ("flaw", "lawn", 2)])
def test_levenshtein(first, second, distance):
    assert levenshtein(first, second) == distance == levenshtein(second, first)


@pytest.mark.parametrize("prediction,answers,expected", [
    ("Hello  World ", ["hello world"], 1.0),  # case and whitespace do not count
    ("helo world", ["hello world"], 10 / 11),  # one deletion over 11 characters
    ("abcd", ["abxy"], 0.5),  # exactly at the threshold: kept
    ("abcde", ["axyze"], 0.0),  # 1 - 3/5 = 0.4 < 0.5: zero
    ("hello world", ["wrong", "Hello World"], 1.0),  # max over the ground truths
    ("", [""], 1.0),
    ("12 May", ["12 may 2020"], 1 - 5 / 11),
    ("helo world", ["hello  world"], 1 - 1 / 12),  # lmms-eval: one edit over the raw length 12, not 11
    ("strasse", ["Straße"], 1 - 2 / 7),  # lev("straße", "strasse") = 2 over len("STRASSE") = 7
])
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("prediction,answers,expected", [
    ("12.5", ["12"], 1.0),  # 4.2% off
    ("12.7", ["12"], 0.0),  # 5.8% off
    ("12.6", ["12"], 1.0),  # exactly 5%
    ("45%", ["0.45"], 1.0),  # percent on either side becomes a fraction
    ("45", ["45%"], 0.0),
    ("Yes", ["yes"], 1.0),
    ("0", ["0"], 1.0),  # target 0: string comparison
    ("0.01", ["0"], 0.0),
    ("1,000", ["1000"], 0.0),  # not parsed as a number: strings differ
    ("blue", ["Red", "BLUE"], 1.0),
    ("blue", [" BLUE "], 0.0),  # lmms-eval compares the target unstripped
    (" 45% ", ["0.45"], 1.0),  # the output is stripped (lmms-eval strips every output)
    ("5%%", ["0.05"], 1.0),  # rstrip("%"): every trailing '%' goes
])
def test_relaxed_accuracy(prediction, answers, expected):
    assert relaxed_accuracy(prediction, answers) == expected


# (prediction, answers) of every metric above, and a few more, for the comparison with lmms-eval
LMMS_EVAL_CASES = [
    ("Hello  World ", ["hello world"]), ("helo world", ["hello world"]), ("helo world", ["hello  world"]),
    ("abcd", ["abxy"]), ("abcde", ["axyze"]), ("hello world", ["wrong", "Hello World"]), ("", [""]),
    ("12 May", ["12 may 2020"]), ("strasse", ["Straße"]), ("ßx", ["ßy"]), ("  1 May ", [" 1  May"]), ("x", ["y"]),
    ("12.5", ["12"]), ("12.7", ["12"]), ("12.6", ["12"]), ("45%", ["0.45"]), ("45", ["45%"]), ("Yes", ["yes"]),
    ("0", ["0"]), ("0.01", ["0"]), ("1,000", ["1000"]), ("blue", ["Red", " BLUE "]), (" 45% ", ["0.45"]),
    ("5%%", ["0.05"]), ("50 %", ["0.5"]), ("12", [" 12 "]), ("nan", ["nan"]), ("1e3", ["1000"]),
    ("Two", ["2"] * 3 + ["3"] * 7), ("Two", ["2"] * 3 + ["3"] * 2), ("The Coca-Cola.", ["coca cola"] * 2 + ["x"] * 4),
    ("pepsi", ["Pepsi"]), (" no ", ["no"] * 10),
]


@pytest.mark.parametrize("prediction,answers", LMMS_EVAL_CASES)
def test_metrics_equal_lmms_evals_own_functions(prediction, answers):
    """Each metric == lmms-eval's function of its task on the output lmms-eval scores (Task.process_results strips
    it first); exactly, to the last bit."""
    output = prediction.strip()
    assert anls(prediction, answers) == lmms_eval_anls(answers, [output])["anls"]
    assert relaxed_accuracy(prediction, answers) == float(any(relaxed_correctness(output, t) for t in answers))
    doc = {"question_id": 0, "answers": list(answers)}
    assert vqa_accuracy(prediction, answers) == textvqa_process_results(doc, [output])["exact_match"]


def test_exact_match():
    assert exact_match("The answer.", ["answer"]) == 1.0
    assert exact_match("answers", ["answer"]) == 0.0


def test_local_evaluate_modules_match_the_functions(tmp_path, monkeypatch):
    import os

    import evaluate

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path))
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shirg_tools", "metrics_evaluate")
    cases = {"anls": (["helo world", "x"], [["hello world"], ["y"]], (10 / 11 + 0) / 2),
             "vqa_accuracy": (["Two", "no"], [["2"] * 3 + ["3"] * 7, ["no"] * 10], (0.9 + 1.0) / 2),
             "relaxed_accuracy": (["12.5", "45%", "blue"], [["12"], ["0.45"], ["red"]], 2 / 3)}
    for name, (predictions, references, expected) in cases.items():
        metric = evaluate.load(os.path.join(root, name))
        result = metric.compute(predictions=predictions, references=references)
        assert result == {name: pytest.approx(expected, abs=1e-12)}
