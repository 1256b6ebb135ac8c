"""Held-out check of judge.score_row (issue 24, "Done when"): a table of realistic completions written blind,
before judge.py was read, and labelled as a careful reader would; >= 98 % must agree."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import judge  # noqa: E402

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heldout_scoring.jsonl")


def load():
    with open(TABLE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def disagreements(cases):
    out = []
    for i, c in enumerate(cases, 1):
        got = bool(judge.score_row(c["completion"], c["row"]))
        if got != c["verdict"]:
            out.append((i, c, got))
    return out


def test_table_is_what_was_asked():
    cases = load()
    assert len(cases) >= 120
    assert {c["set"] for c in cases} == {"mcq", "mmau", "gsm8k"}
    assert all(isinstance(c["verdict"], bool) and c["why"] for c in cases)


def test_row_without_answer_is_none():
    assert judge.score_row("C", {"choices": ["A", "B", "C", "D"]}) is None


def test_heldout_agreement_at_least_98_percent():
    cases = load()
    bad = disagreements(cases)
    for i, c, got in bad:
        print(f"#{i} [{c['set']}] answer={c['row']['answer']!r} judge={got} reader={c['verdict']} "
              f"({c['why']}): {c['completion']!r}")
    agree = len(cases) - len(bad)
    print(f"agreement {agree}/{len(cases)} = {agree / len(cases):.1%}")
    assert agree / len(cases) >= 0.98
