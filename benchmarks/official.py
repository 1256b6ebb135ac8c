"""The benchmarks' own scoring rules, re-implemented, so that evaluation reports them beside judge.score_row's accuracy.

Each is written from the benchmark's published scorer (read, not copied; never imports cord):

- VoiceBench MMSU / OpenBookQA (github.com/MatthewCYM/VoiceBench, src/evaluator/mcq.py): the response, lower-cased,
  is searched for a list of answer phrases in order ("the answer is [X]", " [X].", "([X])", ...), each tried with
  a, b, c, d; then a response that is the letter or starts with "x." / "x," / "x:" / "x)". A response with no
  letter gets a random one of A-D there; here it counts as its expected score, 1/4, and is reported by count.
- MMAU (github.com/Sakshi113/MMAU, evaluation.py): the prediction's words must include every word of the right
  option's text and none of the words that only wrong options have. A bare letter matches nothing.
- GSM8K (github.com/openai/grade-school-math, dataset.py): the number after "####", commas dropped, equal to the
  reference; chat models do not write "####", so the last number of the completion stands in (the usual
  "flexible" reading of lm-evaluation-harness).

    from benchmarks.official import official_summary
    official_summary(rows, items)   # rows: manifest rows; items: {"audio_completion", "text_completion"} per row
"""
import re
from decimal import Decimal, InvalidOperation

PUBLISHED = {"voicebench:mmsu": 3074, "voicebench:openbookqa": 455, "gsm8k": 1319, "mmau:test-mini": 1000}
METRIC = {"voicebench:mmsu": "voicebench_mcq", "voicebench:openbookqa": "voicebench_mcq", "gsm8k": "gsm8k_number",
          "mmau:test-mini": "mmau_string_match"}

# ---------------------------------------------------------------------------
# VoiceBench MCQ: letter extraction; [X] stands for the letter, tried as a, b, c, d in that order
_VOICEBENCH_PHRASES = (
    "答案是[X]", "答案是 [X]", "答案是选项[X]", "答案应该是[X]",
    "答案应该是 [X]", "答案就是选项[X]", "答案是‘[X]",
    "是[X]：", "答案选[X]", "[X]是正确", "选项[X]是最合适的", "answer is: **[X]", "answer is **[X]",
    "the answer to the question is: **[X]",
    "the answer to the multiple-choice question is **[X]", "the answer is '[X]'", "[X] is the best answer",
    "the answer is [X]", "the correct answer is [X]", "would select [X]", "would choose [X]", "would select option [X]",
    "would choose option [X]", 'is "[X]"', 'is "[X].', "is: **[X])", "is **[X],", "is **[X]:", "is **[X])",
    "is: **[X].", "is: **[X]:", "is **[X].", "be **[X],", "is: **[X]**", "is therefore option **[X]:",
    "is: \n\n**[X])", "as **[X]:", "be **[X])", "be **[X]:", "is: \n\n**[X]**", "suggests **[X])",
    "be option **[X]:", "with **[X])", 'is typically "[X])', "be to **[X])", "is: \n\n[X])",
    "is likely to be: **[X].", "is **[X] (", "is option **[X]**", "is likely **[X]**", "is:\n**[X].",
    "is:\n\n**[X].", "would be [X]", "would be option [X]", "would be ([X])", "would be option ([X])", "is [X],",
    "is typically [X],", "is typically [X].", "i'd say [X].", "option [X].", "option [X]:", "option [X],",
    "the answer is:\n**[X]", "is [X]:", "is [X].", "is [X],", "is: [X].", "is ([X])", "is:\n**[X])",
    "is likely **[X]:", "is the **[X])", ":\n[X].", ":\n[X])", ":\n[X],", ": \n[X].", ":  \n[X].", ":\n\n[X].",
    ":\n\n[X])", "is most likely **[X]:", ":\n\n[X],", ": \n\n[X].", "is option [X],", "([X]) would be", "is ([X]).",
    "is [X])", "is: [X])", "is:\n\n[X]:", "is: **[X],", "(option [X])", "answer is ([X])", 'select option "[X]"',
    "is: [X]", "is typically **[X],", "is **[X]**", "is likely '[X]'", "is option '[X]'", "is:\n**[X]:",
    "is \\( \\boxed{[X] ", "would be '[X]'", "is the **[X]** ", "question is [X] (", "is:\n\n**[X])",
    "closest to option **[X]**", "is most likely **[X])", "the answer to the question is '[X]'", "question is **[X]**",
    "known as '[X]'", "is '[X])", "is typically **[X]:", "is \\( \\boxed{\\text{[X]}} \\)", "is \\( \\text{[X]) }",
    "is \\( \\text{[X]} \\)", "is \\( \\text{[X]:", "is \\( \\text{[X])", "is \\(\\text{[X].", "is:\n\n**[X]",
    "is \\( \\text{[X].}", "is \\( \\text{[X].", "is \\( \\boxed{[X]}", "is:\n\\[ \\boxed{\\text{[X]}}",
    "is:\n\\[ \\text{[X])", "is:\n\n\\[ \\text{[X])", "is \\( \\textbf{[X])", "is \\( \\text{[X]}",
    "is: \\( \\text{[X].", "corresponds to:\n- **[X]:", "would be: **[X]**.", "is \\( [X] \\)", "is:\n**[X] ",
    "corresponds to option **[X]**", "be **[X]**", "be: \n\n[X])", "is:\n\\[ \\boxed{[X]}", "is:  \n**[X]:",
    "is: \\( \\text{[X])", "is likely: **[X],", "is } \\mathbf{[X].", "is \\( \\boxed{[X])", "is \\( \\textbf{[X]}",
    "is \\([X]\\)", "is:\n  \n**[X]:", "is option **[X] ", "is:\n\\( \\textbf{[X].", "is \\( \\mathbf{[X]}",
    "was option **[X]**", 'is likely "[X])', "option **[X]:", 'is "[X])', "is most likely **[X],",
    "is often **[X]:", "is:  \n[X])", " [X].", " [X],", " [X]:", " [X])", "**[X].", "**[X])", '"[X].', '"[X],',
    '"[X]:', "([X])", '"[X]"',
)
_VOICEBENCH_LAST = ("would be [X].", 'would be "[X].')  # its two special cases for 'a', checked last


def voicebench_letter(response):
    """The letter VoiceBench's MCQ evaluator reads in a response (A-D), or None (there: a random guess).

    >>> voicebench_letter("The answer is C, Pavlov."), voicebench_letter("C - Pavlov"), voicebench_letter("Pavlov")
    ('C', None, None)
    """
    r = str(response or "").lower()
    if r[:3] in ("<1>", "<2>", "<3>"):
        r = r[3:].strip()
    for phrase in _VOICEBENCH_PHRASES:
        for x in "abcd":
            if phrase.replace("[X]", x) in r:
                return x.upper()
    for x in "abcd":
        if r == x or any(r.startswith(x + p) for p in ".,:)"):
            return x.upper()
    if any(p.replace("[X]", "a") in r for p in _VOICEBENCH_LAST):
        return "A"
    return None


# ---------------------------------------------------------------------------
# MMAU: option-text match by word sets
def _words(text):
    return set(re.findall(r"\b\w+\b", str(text).lower()))


def mmau_match(prediction, answer, choices):
    """MMAU's rule: every word of `answer` is in the prediction and no word that only wrong choices have is.

    >>> mmau_match("The speaker is a man.", "Man", ["Man", "Woman", "Child"]), mmau_match("A", "Man", ["Man", "Woman"])
    (True, False)
    """
    said, right = _words(prediction), _words(answer)
    if not said:
        return False
    wrong = set()
    for choice in choices:
        if _words(choice) != right:
            wrong |= _words(choice) - right
    return right <= said and not (said & wrong)


# ---------------------------------------------------------------------------
# GSM8K: the number after '####', else the last number
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gsm8k_number(completion):
    """The number GSM8K reads: after '####' (its own format), else the last number; commas dropped; None if none.

    >>> gsm8k_number("48 + 24 = 72 clips #### 72"), gsm8k_number("It takes 160 minutes, or 2 hours and 40 minutes.")
    ('72', '40')
    """
    text = str(completion or "")
    marked = re.search(r"####\s*(-?[0-9.,]+)", text)
    found = [marked.group(1)] if marked else _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def gsm8k_match(completion, answer):
    """Numeric equality of gsm8k_number(completion) and the reference ('18.00' equals '18').

    >>> gsm8k_match("She pays $18.00 in all.", "18"), gsm8k_match("eighteen", "18")
    (True, False)
    """
    said = gsm8k_number(completion)
    try:
        return said is not None and Decimal(said) == Decimal(str(answer).replace(",", ""))
    except InvalidOperation:
        return False


# ---------------------------------------------------------------------------
# One set's official numbers
def benchmark_of(row):
    """The benchmark a manifest row comes from, by data_gen.py's `source`: 'voicebench:mmsu', 'gsm8k', ... or None.

    >>> benchmark_of({"source": "mmau:mmau-test-mini.json"}), benchmark_of({"source": "builtin:add"})
    ('mmau:test-mini', None)
    """
    source = str(row.get("source") or "")
    if source in ("voicebench:mmsu", "voicebench:openbookqa"):
        return source
    if source.startswith("gsm8k:"):
        return "gsm8k"
    if source.startswith("mmau:") and "test-mini" in source:
        return "mmau:test-mini"
    return None


def _verdict(benchmark, completion, row):
    """(score in [0, 1], whether it was a no-letter guess) of one completion under the benchmark's rule."""
    if benchmark.startswith("voicebench:"):
        letter = voicebench_letter(completion)
        if letter is None:
            return (0.25 if row["answer"] in "ABCD" else 0.0), True  # the expected score of its random A-D guess
        return float(letter == row["answer"]), False
    if benchmark == "gsm8k":
        return float(gsm8k_match(completion, row["answer"])), False
    options = row.get("options") or []
    answer = options[row["choices"].index(row["answer"])] if options else ""
    return float(bool(answer) and mmau_match(completion, answer, options)), False


def official_summary(rows, items):
    """The benchmark's own metric over a set, beside ours: official_metric, official_acc_audio, official_acc_text
    (% ; None when that side has nothing to score), official_no_letter_audio / _text (VoiceBench: responses with no
    letter, each counted at 1/4) and n_published (the benchmark's item count). {} when the rows are no benchmark's.

    >>> rows = [{"source": "voicebench:mmsu", "text": "...", "answer": "B", "choices": list("ABCD")}] * 2
    >>> official_summary(rows, [{"audio_completion": "B.", "text_completion": "Paris"}] * 2)["official_acc_text"]
    25.0
    """
    benchmark = benchmark_of(rows[0]) if rows else None
    if benchmark is None or any(benchmark_of(r) != benchmark for r in rows):
        return {}
    out = {"official_metric": METRIC[benchmark], "n_published": PUBLISHED[benchmark]}
    for side in ("audio", "text"):
        scored = [_verdict(benchmark, it[f"{side}_completion"], r) for r, it in zip(rows, items, strict=True)
                  if r.get("answer") is not None and (side == "audio" or r.get("text"))]
        out[f"official_acc_{side}"] = 100.0 * sum(s for s, _ in scored) / len(scored) if scored else None
        if benchmark.startswith("voicebench:"):
            out[f"official_no_letter_{side}"] = sum(guess for _, guess in scored)
    return out
