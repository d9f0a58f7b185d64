"""OCR-VQA metrics as pure functions (no I/O, standard library only), computing exactly what lmms-eval computes (the
harness LaViDa's published numbers come from), its quirks included, so that scores compare with LaViDa's.

Each function scores one model output as lmms-eval does: the output stripped of surrounding whitespace (lmms-eval's
`Task.process_results` strips every generate_until output), then lmms-eval's metric of that task:

* `vqa_accuracy` (TextVQA, `lmms_eval.tasks.textvqa.utils.textvqa_process_results`): EvalAI answer normalisation
  (`normalize_vqa_answer`), then acc = statistics.mean over the n leave-one-out subsets of the n human answers of
  min(1, #matches in the subset / 3).
* `anls` (DocVQA, InfographicVQA, `lmms_eval.api.metrics.anls`): max over the ground truths of
  s = 1 - lev(gt', pred') / max(len(gt.upper()), len(pred.upper())), where gt', pred' are lowercased, stripped and
  whitespace-collapsed but the lengths are the raw strings'; s < 0.5 counts 0 (tau = 0.5; s = 0.5 is kept).
* `relaxed_accuracy` (ChartQA, `lmms_eval.tasks.chartqa.utils.relaxed_correctness`): a number within 5% relative
  error of the target (a trailing "%" divides by 100), otherwise a case-insensitive exact match of the output with
  the target as written (not stripped); max over the targets.

Every function returns a float in [0, 1]; a benchmark score is the mean over questions (x 100 in tables).
"""

import re
import statistics

# EvalAI's (pythia/mmf) normalisation tables, as lmms-eval and the official VQA evaluation use them.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# EvalAI's period rule, kept as written there: "(?!<=\d)" is a lookahead that (almost) always holds, so a period
# is dropped unless a digit follows it ("3.5" keeps its period, "e.g." loses both).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
# EvalAI calls PERIOD_STRIP.sub("", text, re.UNICODE): the flag lands in the `count` argument (re.UNICODE == 32),
# so at most 32 periods are removed; kept for identical scores.
PERIOD_STRIP_COUNT = 32


def normalize_vqa_answer(answer: str) -> str:
    """EvalAI's answer normalisation (as lmms-eval's TextVQA/VQAv2 tasks apply it to predictions and answers).

    Lowercase; drop ',' and '?', split "'s" off; newlines/tabs -> spaces; each of PUNCTUATION is removed when it
    touches a space (or the text has a digit,digit comma) and becomes a space otherwise; periods not followed by
    a digit are removed; number words 'none'/'zero'..'ten' -> digits; articles a/an/the dropped; contractions
    written without apostrophe restored ("dont" -> "don't"); words joined by single spaces.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    has_digit_comma = COMMA_STRIP.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if (mark + " " in text or " " + mark in text or has_digit_comma) else " ")
    out = PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)
    words = [NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list) -> float:
    """TextVQA / VQA accuracy of one prediction against the human answers (10 in TextVQA).

    With p and a_i normalised by `normalize_vqa_answer`: acc = (1/n) sum_i min(1, #{j != i : a_j = p} / 3),
    the mean over the n leave-one-out subsets of n - 1 answers. 3 or more matching humans (of 10) give 1.
    The mean is statistics.mean's (an exact sum, rounded once), as lmms-eval's: sum / n can differ in the last bit.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer, got none")
    predicted = normalize_vqa_answer(prediction)
    references = [normalize_vqa_answer(answer) for answer in answers]
    matches = sum(reference == predicted for reference in references)
    # leaving out answer i removes one match exactly when a_i itself matches
    per_subset = [min(1.0, (matches - (reference == predicted)) / 3.0) for reference in references]
    return statistics.mean(per_subset)


def levenshtein(first: str, second: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each cost 1)."""
    if len(first) < len(second):
        first, second = second, first
    previous = list(range(len(second) + 1))
    for i, char in enumerate(first, start=1):
        current = [i]
        for j, other in enumerate(second, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1]


def _anls_normalize(text: str) -> str:
    """Lowercase, strip, and collapse every run of whitespace to one space (the official ANLS preprocessing)."""
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: list, threshold: float = 0.5) -> float:
    """ANLS of one question, as lmms-eval's `anls`: max over the ground truths g of
    s(g) = 1 - lev(g', p') / max(len(g.upper()), len(p.upper())) (p: the stripped output; g', p': normalised by
    `_anls_normalize`; two empty strings give s = 1), and 0 when that best s < threshold."""
    if not answers:
        raise ValueError("anls needs at least one reference answer, got none")
    prediction = prediction.strip()
    predicted = _anls_normalize(prediction)
    best = 0.0
    for answer in answers:
        # lmms-eval divides by the raw strings' lengths (of .upper(): "ß" counts 2), not the normalised ones the
        # distance is taken between, unlike the official ANLS: a reference with extra spaces scores higher; matched
        # for comparable numbers
        length = max(len(answer.upper()), len(prediction.upper()))
        best = max(best, 1.0 if length == 0 else 1.0 - levenshtein(_anls_normalize(answer), predicted) / length)
    return best if best >= threshold else 0.0


def chartqa_number(text: str):
    """lmms-eval's ChartQA number: float(text), or with a trailing '%' float(text.rstrip('%')) / 100 (every trailing
    '%' goes: "5%%" is 0.05); None when float() refuses it."""
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:  # not a number: the caller compares the strings instead
        return None


def relaxed_accuracy(prediction: str, answers: list, max_relative_change: float = 0.05) -> float:
    """ChartQA relaxed accuracy of one prediction, as lmms-eval's `relaxed_correctness` (max over the targets): with
    p the stripped output, 1 if p and a target t parse as numbers (`chartqa_number`) and |p - t| / |t| <= 5%
    (t != 0), or else p.lower() == t.lower(); otherwise 0.

    A target of 0 needs an exact string match (the relative error is undefined), as in ChartQA's definition. The
    target is compared as written: lmms-eval does not strip it, so a non-numeric target with surrounding spaces
    ("Blue ") never matches, which looks like a bug; matched for comparable numbers.
    """
    if not answers:
        raise ValueError("relaxed_accuracy needs at least one reference answer, got none")
    prediction = prediction.strip()
    predicted_value = chartqa_number(prediction)
    for answer in answers:
        target_value = chartqa_number(answer)
        if predicted_value is not None and target_value:
            if abs(predicted_value - target_value) / abs(target_value) <= max_relative_change:
                return 1.0
        elif prediction.lower() == answer.lower():
            return 1.0
    return 0.0


def exact_match(prediction: str, answers: list) -> float:
    """1 if the EvalAI-normalised prediction equals one of the normalised answers, else 0."""
    if not answers:
        raise ValueError("exact_match needs at least one reference answer, got none")
    predicted = normalize_vqa_answer(prediction)
    return float(any(normalize_vqa_answer(answer) == predicted for answer in answers))


METRICS = {"vqa_accuracy": vqa_accuracy, "anls": anls, "relaxed_accuracy": relaxed_accuracy,
           "exact_match": exact_match}
