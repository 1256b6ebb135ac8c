"""benchmarks/official.py: the benchmarks' own scorers, where they and judge.score_row differ and why, set summaries."""
import itertools

import pytest

from benchmarks.official import (PUBLISHED, benchmark_of, gsm8k_match, gsm8k_number, mmau_match, official_summary,
                                 voicebench_letter)
from judge import score_row

ABCD = list("ABCD")
PAVLOV = {"answer": "C", "choices": ABCD, "options": ["B. F. Skinner", "John Watson", "Ivan Pavlov", "Sigmund Freud"],
          "source": "voicebench:mmsu", "text": "Who described classical conditioning? A. B. F. Skinner. B. ..."}
SPEAKER = {"answer": "A", "choices": ABCD, "options": ["Man", "Woman", "Child", "Robot"],
           "source": "mmau:mmau-test-mini.json"}
GSM = {"answer": "18", "source": "gsm8k:test.jsonl", "text": "..."}


def official(completion, row):
    """The benchmark's own verdict on one completion: 1, 0, or VoiceBench's 'guess' (no letter: 1/4 expected)."""
    if row is GSM:
        return gsm8k_match(completion, row["answer"])
    if row is SPEAKER:
        return mmau_match(completion, row["options"][0], row["options"])
    letter = voicebench_letter(completion)
    return "guess" if letter is None else letter == row["answer"]


# (completion, row, ours = judge.score_row, theirs = the benchmark's rule, why they differ or agree)
DIFFER = [
    # VoiceBench MCQ: letter phrases only
    ("The answer is C, Pavlov.", PAVLOV, True, True, "both read the letter"),
    ("C - Pavlov", PAVLOV, True, "guess", "a dash after the letter is none of its phrases"),
    ("It is C (Pavlov).", PAVLOV, True, "guess", "'is c (' is none of its phrases"),
    ("Answer: C", PAVLOV, True, "guess", "'answer: c' with nothing after is none of its phrases"),
    ("**C**", PAVLOV, True, "guess", "bold alone is none of its phrases"),
    ("I think the closest is C", PAVLOV, True, "guess", "no punctuation after the final letter"),
    ("Ivan Pavlov.", PAVLOV, True, "guess", "the option's words: it reads letters only"),
    ("The answer is A or C.", PAVLOV, False, False, "a hedge: it takes the letter after 'the answer is', A"),
    ("The answer is B or C.", PAVLOV, False, False, "a hedge: it takes B"),
    ("The answer is C or B.", PAVLOV, False, True, "a hedge: it takes C, the letter after 'the answer is'"),
    ("B. F. Skinner did not; Ivan Pavlov did.", PAVLOV, True, False, "it reads the option text's 'B.' as the letter"),
    ("It is not A, it is C.", PAVLOV, True, True, "both: it finds ' c.'"),
    ("c", PAVLOV, True, True, "both read a lone letter"),
    # MMAU: words of the right option, none of the wrong ones'
    ("The speaker is a man.", SPEAKER, True, True, "both: the option's word"),
    ("A", SPEAKER, True, False, "a letter alone: it reads words only"),
    ("The answer is A.", SPEAKER, True, False, "a letter: it reads words only"),
    ("A man is speaking, not a woman.", SPEAKER, True, False, "a wrong option's word, negated, still counts there"),
    ("It could be a man or a woman.", SPEAKER, False, False, "a hedge: both wrong"),
    ("Male voice.", SPEAKER, False, False, "a synonym: neither reads it"),
    # GSM8K: the last number
    ("The answer is 18.", GSM, True, True, "both"),
    ("The answer is 18. (I used 20 - 2.)", GSM, True, False, "its last number is 2"),
    ("It costs 18 dollars, which is 1800 cents.", GSM, True, False, "a restatement in other units ends it"),
    ("The answer is eighteen.", GSM, True, False, "a number in words: it reads digits only"),
    ("\\boxed{18}", GSM, True, True, "both"),
]


@pytest.mark.parametrize("completion, row, ours, theirs, why", DIFFER)
def test_ours_and_the_benchmarks_rule(completion, row, ours, theirs, why):
    assert score_row(completion, row) is ours, why
    assert official(completion, row) == theirs, why


def test_voicebench_phrases_are_tried_in_order_with_a_to_d_inside():
    """A slow reading of its rule by hand: the first phrase any letter fits wins; within a phrase, a before d."""
    assert voicebench_letter("The answer is D. Also option A: no.") == "D"  # 'the answer is [X]' before 'option [X]:'
    assert voicebench_letter("<2>b") == "B" and voicebench_letter("d) wood") == "D" and voicebench_letter("e.") is None
    assert voicebench_letter(None) is None and voicebench_letter("The answer would be a.") == "A"


def test_mmau_words_rule_by_hand():
    choices = ["Implies an absurd improvement.", "Praises the idea genuinely.", "References an actual possibility."]
    assert mmau_match("It implies an absurd improvement", choices[0], choices)
    assert not mmau_match("It implies an absurd improvement and praises it", choices[0], choices)  # 'praises': wrong
    assert mmau_match("An absurd improvement is implied... implies", choices[0], choices)  # words, in any order
    assert not mmau_match("", choices[0], choices) and not mmau_match("absurd", choices[0], choices)


def test_gsm8k_number():
    assert gsm8k_number("so 1,200 in all #### 1,200") == "1200" and gsm8k_number("no number") is None
    assert gsm8k_match("She paid $18.00.", "18") and not gsm8k_match("She paid 18.5", "18")


def _slow_voicebench(rows, completions):
    """VoiceBench's accuracy averaged over every way its random guesses can fall (4^k draws for k guesses)."""
    guesses = [i for i, c in enumerate(completions) if voicebench_letter(c) is None]
    total = 0.0
    for draw in itertools.product("ABCD", repeat=len(guesses)):
        picks = [voicebench_letter(c) for c in completions]
        for i, g in zip(guesses, draw):
            picks[i] = g
        total += sum(p == r["answer"] for p, r in zip(picks, rows)) / len(rows)
    return 100 * total / 4 ** len(guesses)


def test_official_summary_voicebench_is_the_expected_score_of_its_guesses():
    rows = [PAVLOV, {**PAVLOV, "answer": "A"}, PAVLOV, {**PAVLOV, "answer": "B"}, PAVLOV]
    audio = ["The answer is C.", "Pavlov", "C - Pavlov", "The answer is A.", "no idea"]  # 3 with no letter
    text = ["C", "B", "C", "B", "C"]
    s = official_summary(rows, [{"audio_completion": a, "text_completion": t} for a, t in zip(audio, text)])
    assert s["official_acc_audio"] == pytest.approx(_slow_voicebench(rows, audio)) == pytest.approx(100 * 1.75 / 5)
    assert s["official_acc_text"] == pytest.approx(_slow_voicebench(rows, text)) == 80.0
    assert (s["official_no_letter_audio"], s["official_no_letter_text"]) == (3, 0)
    assert (s["official_metric"], s["n_published"]) == ("voicebench_mcq", 3074)


def test_official_summary_mmau_gsm8k_and_others():
    items = [{"audio_completion": "A man.", "text_completion": "x"}, {"audio_completion": "A", "text_completion": "x"}]
    s = official_summary([SPEAKER, SPEAKER], items)  # audio-only rows: no text side
    assert s == {"official_metric": "mmau_string_match", "n_published": 1000, "official_acc_audio": 50.0,
                 "official_acc_text": None}
    g = official_summary([GSM], [{"audio_completion": "20 then 18", "text_completion": "18 then 20"}])
    assert (g["official_acc_audio"], g["official_acc_text"], g["n_published"]) == (100.0, 0.0, 1319)
    assert official_summary([{"source": "builtin:add", "answer": "3"}], [{}]) == {}  # not a benchmark: nothing
    assert official_summary([GSM, SPEAKER], [{}, {}]) == {}  # a mixed set has no one official metric
    assert benchmark_of({"source": "voicebench:openbookqa"}) == "voicebench:openbookqa" and len(PUBLISHED) == 4
