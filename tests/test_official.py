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


# ----------------------------------------------------------------------------------------------
# cord.py: per-row instruction, score_row in evaluate and in the rewards, both metrics in summary.json and eval.md

def _benchmark_sets(tmp_path):
    """A VoiceBench-shaped export (audio array, prompt, reference) and an MMAU test-mini JSON (id, audio_id, question,
    choices, answer, task, ...) with their clips, converted by data_gen.py."""
    import json

    import numpy as np
    import soundfile as sf

    from data_gen import main as data_gen_main
    tone = lambda s: (0.3 * np.sin(np.arange(int(s * 16000)) * 0.07)).astype(np.float32)
    vb = [{"audio": {"array": tone(4.0).tolist(), "sampling_rate": 16000}, "reference": r,
           "prompt": f"Who described classical conditioning? A. Skinner. B. Watson. C. Pavlov. D. Freud. ({i})"}
          for i, r in enumerate("CCA")]
    (tmp_path / "mmsu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vb))
    (tmp_path / "test-mini-audios").mkdir()
    items = []
    for i, answer in enumerate(["Man", "Woman"]):
        sf.write(tmp_path / f"test-mini-audios/s{i}.wav", tone(1.0), 16000)
        items.append({"id": f"s{i}", "audio_id": f"./test-mini-audios/s{i}.wav", "question": "Who is speaking?",
                      "choices": ["Man", "Woman", "Child"], "answer": answer, "task": "speech", "difficulty": "easy",
                      "dataset": "x", "split": "test-mini", "category": "Reasoning", "sub-category": "y"})
    (tmp_path / "mmau-test-mini.json").write_text(json.dumps(items))
    for source, given, out in (("voicebench:mmsu", "mmsu.jsonl", "mmsu"), ("mmau", "mmau-test-mini.json", "mmau")):
        data_gen_main(["--source", source, "--input", str(tmp_path / given), "--out", str(tmp_path / out),
                       "--workers", "1"])
    return tmp_path / "mmsu" / "manifest.jsonl", tmp_path / "mmau" / "manifest.jsonl"


def test_eval_reports_our_accuracy_and_the_official_metric(tmp_path, qwen2_audio_dir, monkeypatch, capsys):
    """`cord.py --eval true` on an MCQ set and an MMAU set: every completion reads 'C - Pavlov' (MCQ) or 'A man is
    speaking.' (MMAU); ours and the official rule score them as the table above says, side by side."""
    import json

    import cord
    mmsu, mmau = _benchmark_sets(tmp_path)
    said = {"mmsu": "C - Pavlov", "mmau": "A man is speaking."}
    for name, manifest in (("mmsu", mmsu), ("mmau", mmau)):
        monkeypatch.setattr(cord, "decode", lambda lalm, y, m, s=said[name]: [s] * len(y))
        cord.main(["--eval", "true", "--model", str(qwen2_audio_dir), "--data", str(manifest), "--output",
                   str(tmp_path / f"run_{name}"), "--max_new_tokens", "2", "--long_audio", "cut"])
        printed = capsys.readouterr().out
        s = json.loads((tmp_path / f"run_{name}" / "summary.json").read_text())
        assert '"official_acc_audio"' in printed and '"acc_audio"' in printed  # printed side by side
        if name == "mmsu":  # answers C, C, A; 'C - Pavlov': ours C; VoiceBench: no letter, a 1/4 guess each
            assert (s["acc_audio"], s["acc_text"]) == pytest.approx((200 / 3, 200 / 3))
            assert (s["official_acc_audio"], s["official_no_letter_audio"], s["n_published"]) == (25.0, 3, 3074)
        else:  # answers Man, Woman: both read 'man'; text side: none (audio-only)
            both = (s["acc_audio"], s["official_acc_audio"], s["acc_text"], s["official_acc_text"])
            assert both == (50, 50, None, None)
            assert (s["official_metric"], s["n_published"]) == ("mmau_string_match", 1000)


def test_a_rows_instruction_replaces_the_flag(tmp_path, qwen2_audio_dir):
    """VoiceBench rows (instruction "") hear the audio alone; a row without one gets --instruction."""
    import cord
    from cordkit.manifest import load_manifest
    mmsu, _ = _benchmark_sets(tmp_path)
    rows = load_manifest(str(mmsu))[:2]
    rows[1] = {k: v for k, v in rows[1].items() if k != "instruction"}
    lalm = cord.load_lalm(str(qwen2_audio_dir))
    P = cord.build_prompts(lalm, rows, "Say the letter.")
    x_a = [lalm.tokenizer.decode(P["audio_ids"][i][P["audio_mask"][i].bool()]) for i in range(2)]
    x_t = [lalm.tokenizer.decode(P["text_ids"][i][P["text_mask"][i].bool()]) for i in range(2)]
    assert "Say the letter." not in x_a[0] + x_t[0] and "Say the letter." in x_a[1] and "Say the letter." in x_t[1]
    assert rows[0]["text"] in x_t[0] and rows[0]["text"] not in x_a[0]


def test_rewards_with_the_ground_truth_read_the_row_as_evaluation_does():
    """--reward_ref answer with the rule judge scores a rollout by judge.score_row on its row (letters in any form,
    option texts); the bare-answer path (no rows: a custom judge) is unchanged."""
    import cord
    from judge import RuleJudge
    judges = (RuleJudge(), RuleJudge(ground_truth=True))
    completions = ["The answer is C, Pavlov.", "Ivan Pavlov", "A or C", "The answer is B."]
    rows = [PAVLOV] * 4
    r = cord.rewards_for(judges, completions, [None] * 4, ["C"] * 4, "answer", rows)
    assert r.tolist() == [1, 1, 0, 0] == [float(score_row(c, row)) for c, row in zip(completions, rows)]
    assert cord.rewards_for(judges, completions, completions, ["C"] * 4, "both", rows).tolist() == [1, 1, 0, 0]
    assert cord.rewards_for(judges, completions, [None] * 4, ["C"] * 4, "answer").tolist()[1] == 0  # no rows
