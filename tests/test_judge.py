"""judge.py (Eq. 8): answer extraction, the hand-written verdict table, garbage in, ModelJudge mechanics."""
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from judge import ModelJudge, RuleJudge, answers_match, extract_answer, main as judge_main, pick_option, score_row


# ----------------------------------------------------------------------------------------------
# judge.py (Eq. 8): extraction, the hand-written verdict table, garbage in, ModelJudge mechanics

# (completion a, completion b, same final answer?)
JUDGE_TABLE = [
    # \boxed{}, nested braces
    (r"so x = \boxed{\frac{1}{2}}", r"The answer is $\frac{1}{2}$.", True),
    (r"Thus \boxed{\frac{\sqrt{3}}{2}}", r"\boxed{\frac{\sqrt{3}}{4}}", False),
    (r"First \boxed{3}, then corrected: \boxed{4}", "4", True),  # the last box counts
    (r"\boxed{{2}^{3}}", "8", True),
    # "the answer is" / "Answer:"
    ("We add them. The final answer is 42.", "Answer: 42", True),
    ("**Answer:** 17", "the answer is 71", False),
    ("The answer is: 3.5 hours.", "Answer: 3.50", True),
    # multiple-choice letters, with and without the option text
    ("Comparing options, the answer is (B).", "B", True),
    ("The answer is option C.", "(C)", True),
    ("The answer is (B) Paris.", "Paris", True),  # option text vs bare text
    ("B. Paris", "(B) Paris", True),
    ("Option D: 12", "12", True),
    ("The answer is (A).", "B", False),
    ("The answer is (B) Paris.", "London", False),
    ("B", "42", False),  # a bare letter says nothing about 42
    # last number
    ("She had 5 apples and bought 7 more, so 12", "12", True),
    ("He runs 3 miles a day for 4 days: 12 miles in total", "13", False),
    # LaTeX fractions vs decimals, \sqrt
    (r"\frac{3}{4}", "0.75", True),
    (r"\dfrac{1}{3}", "0.333333", True),
    ("1/2", "0.5", True),
    ("3/4 cup", r"\frac{3}{4}", True),
    (r"\frac{1}{3}", "0.3", False),
    (r"\sqrt{2}", r"2^{1/2}", True),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\sqrt{3}", r"\sqrt{2}", False),
    # thousands separators
    ("The answer is 1,234.", "1234", True),
    ("It costs $1,250,000", "1250000", True),
    ("1,234", "1243", False),
    # units and words
    ("She has 7 dollars left.", "7", True),
    ("The answer is $7.", "7 dollars", True),
    ("68 apples", "The answer is 68.", True),
    ("50%", "50 percent", True),
    ("68 apples", "86 apples", False),
    # number words
    ("twenty-three", "23", True),
    ("The answer is seven dollars.", "$7", True),
    ("one hundred and five", "105", True),
    ("three thousand two hundred", "3,200", True),
    ("twenty-three", "32", False),
    ("five", "six", False),
    # yes / no
    ("Yes.", "The answer is yes", True),
    ("No, it is not.", "no", True),
    ("Yes", "No", False),
    # simple algebra (math-verify)
    ("x^2+2x+1", "(x+1)^2", True),
    ("x = 5", "5", True),
    ("x^2+1", "(x+1)^2", False),
    # plain words are compared as words, not as products of symbols
    ("Paris", "paris", True),
    ("Paris", "Parsi", False),
    # missing answers never match
    (None, None, False),
    ("", "", False),
    ("The answer is", "The answer is", False),
    (None, "7", False),
    ("I don't know", "7", False),
]


@pytest.mark.parametrize("a, b, expected", JUDGE_TABLE)
def test_judge_table(a, b, expected):
    assert answers_match(a, b) is expected
    assert answers_match(b, a) is expected  # the verdict does not depend on the order


# (completion, extracted answer)
EXTRACT_CASES = [
    (r"Hence \boxed{\frac{\sqrt{3}}{2}} is the result.", r"\frac{\sqrt{3}}{2}"),  # nested braces
    (r"\boxed{1} then \boxed{\{1, 2\}}", r"\{1, 2\}"),  # the last box
    (r"\boxed{5 and then the text stops without closing it", "5"),  # unbalanced: fall back to the last number
    ("Adding up, the final answer is 7 dollars. Hope it helps", "7 dollars"),
    ("**Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("The answer is 3.5.", "3.5"),
    (r"The answer is \(\frac{1}{2}\).", r"\frac{1}{2}"),
    ("Answer:\n\n42", "42"),
    ("The answer is (B).", "(B)"),
    ("A is wrong and so is option B; the right one is option C", "C"),
    ("(D)", "(D)"),
    ("B. Because the sky scatters blue light more than red light.", "B"),
    ("P(A) is 0.3 and P(B) is 0.4, so the chance is 0.7 in this long sentence", "0.7"),  # not a letter
    ("I think it costs 3 dollars, in total 12.", "12"),
    ("There were 1,234 people.\nSo about 1,250 now, after some long reasoning", "1,250"),
    ("He has twenty-three marbles in his bag after the long day", "twenty-three"),
    ("Yes.", "Yes"),
    ("twenty-three", "twenty-three"),
    ("", None),
    ("   \n ", None),
    (None, None),
    ("I have no idea what the question is asking for here, sorry.", None),
]


@pytest.mark.parametrize("completion, expected", EXTRACT_CASES)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_judge_rule_judge_lists_and_ground_truth():
    preds = ["so the answer is \\boxed{12}", "I get 7.5 hours.", "The answer is (C).", None]
    refs = ["Total: twelve.", "The answer is 7.50", "B", "7"]
    assert RuleJudge()(preds, refs) == [1.0, 1.0, 0.0, 0.0]
    # ground truth: refs are bare answers, used as they are (a long LaTeX answer is not searched for a number)
    gt = RuleJudge(ground_truth=True)
    long_answer = r"\frac{\sqrt{3}}{2} + \frac{1}{2}\sqrt{2} - \frac{\pi}{12}"
    assert gt([f"so \\boxed{{{long_answer}}}", "so 12", "so 12"], [long_answer, 12, None]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        RuleJudge()(["a"], [])


GARBAGE = [
    "",
    None,
    12345,
    "ab" * 5000,
    "{" * 10000,
    "\\boxed{" * 2000,
    "\\boxed{" + "(" * 60 + "}",
    "The answer is " * 700,
    "答案是 ٣ ☃ \u0000 \ud800 ü",
    "\\boxed{x^x^x^x^x^x^x^x^x^x^x^x^y}",
    "\\boxed{9^{9^{9^{9^{9}}}}}",
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_judge_garbage_never_raises_and_is_fast(garbage):
    answers_match("\\frac{1}{2}", "0.5")  # warm up math-verify's lazy imports
    for other in ["2", "Answer: B"]:
        for a, b in [(garbage, other), (other, garbage)]:
            start = time.perf_counter()
            assert answers_match(a, b) is False
            assert time.perf_counter() - start < 2.0  # math-verify times out at 1 s; parsing and load add a little
    answers_match(garbage, garbage)  # no raise; identical garbage may or may not match


def test_judge_works_off_the_main_thread():
    # math-verify's signal-based timeout only works in the main thread; the judge must not crash elsewhere
    out = []
    worker = threading.Thread(target=lambda: out.append(RuleJudge()(["\\boxed{\\sqrt{8}}", "x"], ["2\\sqrt{2}", "y"])))
    worker.start()
    worker.join()
    assert out == [[1.0, 0.0]]


def test_judge_cli(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["judge.py", "so the answer is \\boxed{\\frac{1}{2}}", "It is 0.5."])
    judge_main()
    assert capsys.readouterr().out.split("\n")[:3] == ["answer a: '\\\\frac{1}{2}'", "answer b: 'It is 0.5'",
                                                       "rule judge: 1"]
    monkeypatch.setattr("sys.argv", ["judge.py", "--gt", "She pays seven dollars.", "8"])
    judge_main()
    assert "rule judge: 0" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# ModelJudge on a tiny, randomly initialised Qwen2 and a word-level tokenizer built here
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judge_lm():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [ModelJudge.PROMPT, "yes no the answer is so 42 7 12 B C Paris London boxed frac"]
    words.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.5,
    )  # a large init spreads P(yes) away from 0.5
    return Qwen2ForCausalLM(config).eval(), tokenizer


PREDS = ["the answer is 42", "so B", "Paris", "", "the answer is 7 so 7 so 7 so 7 so 7", None]
REFS = ["42", "C", "London", "12", "7", "the answer is B"]


def test_judge_model_batching_matches_one_by_one(judge_lm):
    model, tokenizer = judge_lm
    batched = ModelJudge(model, tokenizer, batch_size=4).scores(PREDS, REFS)  # a batch of 4 then of 2
    single = ModelJudge(model, tokenizer, batch_size=1).scores(PREDS, REFS)
    assert batched == pytest.approx(single, abs=1e-5)
    assert all(0.0 <= s <= 1.0 for s in batched) and len(set(batched)) > 1


def test_judge_model_reads_yes_no_from_next_token_logits(judge_lm):
    model, tokenizer = judge_lm
    judge = ModelJudge(model, tokenizer)
    ids = torch.tensor([tokenizer.encode(judge.prompt(PREDS[0], REFS[0]))])  # (1, T)
    p = model(input_ids=ids).logits[0, -1].softmax(-1)  # (V,) next-token distribution
    p_yes, p_no = p[tokenizer.convert_tokens_to_ids("yes")], p[tokenizer.convert_tokens_to_ids("no")]
    assert judge.scores(PREDS[:1], REFS[:1])[0] == pytest.approx((p_yes / (p_yes + p_no)).item(), abs=1e-6)


def test_judge_model_threshold_gives_0_1_floats(judge_lm):
    model, tokenizer = judge_lm
    scores = ModelJudge(model, tokenizer).scores(PREDS, REFS)
    middle = sorted(scores)[len(scores) // 2]
    verdicts = ModelJudge(model, tokenizer, threshold=middle)(PREDS, REFS)
    assert verdicts == [float(s >= middle) for s in scores] and set(verdicts) == {0.0, 1.0}
    assert all(type(v) is float for v in verdicts)
    assert ModelJudge(model, tokenizer, threshold=0.0)(PREDS, REFS) == [1.0] * len(PREDS)
    assert ModelJudge(model, tokenizer, threshold=1.01)(PREDS, REFS) == [0.0] * len(PREDS)
    assert ModelJudge(model, tokenizer)([], []) == []


def test_judge_model_accepts_an_adapter_and_reads_the_last_real_token(judge_lm):
    _, tokenizer = judge_lm
    colon, yes, no = (tokenizer.convert_tokens_to_ids(t) for t in (":", "yes", "no"))

    def lm(input_ids, attention_mask):  # says "yes" after ":" (every prompt's last token), "no" elsewhere
        logits = torch.zeros(*input_ids.shape, len(tokenizer))  # (B, T, V)
        logits[..., yes] = torch.where(input_ids == colon, 5.0, -5.0)
        logits[..., no] = -logits[..., yes]
        return SimpleNamespace(logits=logits)

    judge = ModelJudge(lm, tokenizer, batch_size=len(PREDS))  # prompts of different lengths, padded
    assert judge(PREDS, REFS) == [1.0] * len(PREDS)


def test_judge_model_uses_the_chat_template(judge_lm):
    model, tokenizer = judge_lm
    chat = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]", pad_token="[PAD]")
    chat.chat_template = "{% for m in messages %}user {{ m['content'] }} {% endfor %}assistant :"
    judge = ModelJudge(model, chat)
    assert judge.prompt("a", "b").startswith("user Two responses") and judge.prompt("a", "b").endswith("assistant :")
    assert len(judge(PREDS, REFS)) == len(PREDS)


# Answer shapes of real completions (completion, ground-truth answer, same?): a final equation, a letter said in
# words or wrapped in LaTeX, unicode fractions; each with a near miss that must stay a mismatch.
SHAPES = [
    ("First 2x = 6, so x = 3", "3", True), ("Solving, we get x = 3.", "3", True), ("so x = 3", "4", False),
    ("Thus y=-4", "-4", True),
    ("The correct option is A.", "A", True), ("The right choice is C", "C", True),
    ("The correct option is A.", "B", False),
    ("The correct answer is (B).", "B", True), ("Answer: B) London", "B", True),
    ("so \\boxed{\\text{(C)}}", "C", True), ("\\boxed{\\textbf{(D)}}", "D", True), ("\\boxed{\\text{B}}", "B", True),
    ("\\boxed{\\text{(C)}}", "D", False),
    ("She ate ½ of the pie.", "1/2", True), ("the answer is ¾", "0.75", True), ("It is 1½ hours", "1.5", True),
    ("½", "0.25", False),
    ("I would choose option B.", "B", True), ("I'd pick C", "C", True), ("I would select (D).", "D", True),
    ("I would choose option B.", "C", False), ("b", "B", True), ("(c)", "C", True), ("a", "B", False),
    ("b", "4", False),
]


@pytest.mark.parametrize("completion,answer,expected", SHAPES)
def test_judge_answer_shapes_of_real_completions(completion, answer, expected):
    assert RuleJudge(ground_truth=True)([completion], [answer]) == [float(expected)]


# ----------------------------------------------------------------------------------------------
# score_row: the verdict of evaluation and --reward_ref answer, against a careful reader's labels

ABCD = list("ABCD")
PAVLOV = {"answer": "C", "choices": ABCD, "options": ["B. F. Skinner", "John Watson", "Ivan Pavlov", "Sigmund Freud"]}
SPOON = {"answer": "B", "choices": ABCD, "options": ["wool", "a steel spoon", "air", "wood"]}
LETTERS = {"answer": "C", "choices": ABCD}  # an old manifest: letters, no option texts
SPEAKER = {"answer": "A", "choices": ABCD, "options": ["Man", "Woman", "Child", "Robot"]}  # MMAU-style rows
LION = {"answer": "C", "choices": ABCD, "options": ["Tiger", "Dog", "Lion", "Horse"]}
BEATS = {"answer": "B", "choices": list("ABC"), "options": ["four", "nine", "fourteen"]}
KEY = {"answer": "A", "choices": ABCD, "options": ["C major", "G major", "A minor", "D minor"]}
HONK = {"answer": "A", "choices": ABCD, "options": ["Car", "Bicycle", "Train", "Boat"]}
NONE_OF = {"answer": "D", "choices": ABCD, "options": ["Joy", "Anger", "Sadness", "None of the above"]}
GSM = {"answer": "18"}
MINUTES = {"answer": "160"}

# (completion, row, a careful reader's verdict)
SCORE_TABLE = [
    # a letter, in the ordinary ways of naming it
    ("The answer is C, Pavlov.", PAVLOV, True),
    ("The answer is C - Pavlov.", PAVLOV, True),
    ("The answer is C (Pavlov).", PAVLOV, True),
    ("The answer is option C, Pavlov.", PAVLOV, True),
    ("Answer: C, Pavlov", PAVLOV, True),
    ("It is C, Pavlov.", PAVLOV, True),
    ("So the answer is C, which is Pavlov.", PAVLOV, True),
    ("The answer is **C**.", PAVLOV, True),
    ("**C. Ivan Pavlov**", PAVLOV, True),
    ("C", PAVLOV, True),
    ("c", PAVLOV, True),
    ("(C)", PAVLOV, True),
    ("The correct answer is C.", PAVLOV, True),
    ("I would choose option C.", PAVLOV, True),
    ("The answer is \\boxed{C}", PAVLOV, True),
    ("Answer:\n\nC", PAVLOV, True),
    ("The answer is c.", PAVLOV, True),
    ("Classical conditioning was described by Pavlov with his dogs, so C.", PAVLOV, True),
    ("None of the options is entirely right, but the closest is C.", PAVLOV, True),
    ("The answer is C, Pavlov.", LETTERS, True),
    ("The answer is B, Watson.", PAVLOV, False),
    ("B", PAVLOV, False),
    ("The answer is A.", LETTERS, False),
    # an option by its words alone (MMAU's way), exactly one option named
    ("Ivan Pavlov", PAVLOV, True),
    ("It was Ivan Pavlov who described it.", PAVLOV, True),
    ("John Watson", PAVLOV, False),
    ("The speaker is a man.", SPEAKER, True),
    ("A man is speaking.", SPEAKER, True),
    ("The speaker is a woman.", SPEAKER, False),
    ("Lion", LION, True),
    ("The animal roaring is a lion.", LION, True),
    ("nine", BEATS, True),
    ("There are 9 beats.", BEATS, True),
    ("There are fourteen beats.", BEATS, False),
    ("C major", KEY, True),
    ("The piece is in C major.", KEY, True),
    ("The piece is in G major.", KEY, False),
    ("The honk comes from a car.", HONK, True),
    ("A steel spoon conducts heat best.", SPOON, True),
    ("Steel spoon", SPOON, True),
    ("Wool.", SPOON, False),
    ("None of the above.", NONE_OF, True),
    ("The speaker shows no clear emotion: none of the above.", NONE_OF, True),
    # hedges: two options, or a letter with another option's words
    ("A or C", PAVLOV, False),
    ("The answer is either B or C.", PAVLOV, False),
    ("It could be a man or a woman.", SPEAKER, False),
    ("The answer is C, Lion.", {**LION, "answer": "A"}, False),
    ("The answer is A, Lion.", LION, False),
    ("C. John Watson", PAVLOV, False),
    ("B. Watson. C. Pavlov.", PAVLOV, False),
    # negations name what the answer is not
    ("Not C. The answer is D.", {**PAVLOV, "answer": "D"}, True),
    ("Not C. The answer is D.", PAVLOV, False),
    ("It is not A, it is C.", PAVLOV, True),
    ("The answer is C, not B.", PAVLOV, True),
    ("It is not a car, it is a train.", HONK, False),
    ("It is not a train, it is a car.", HONK, True),
    ("A is wrong and B is incorrect; the answer is C.", PAVLOV, True),
    ("The speaker is not a man.", SPEAKER, False),
    # articles and pronouns are not letters
    ("A dog barks, then a man speaks: a man.", SPEAKER, True),
    ("I think it is C.", PAVLOV, True),
    ("I don't know.", PAVLOV, False),
    ("", PAVLOV, False),
    # numbers as GSM8K writes them
    ("She pays $18.", GSM, True),
    ("18 dollars", GSM, True),
    ("So the total is \\boxed{18}.", GSM, True),
    ("The answer is 18.", GSM, True),
    ("The answer is eighteen.", GSM, True),
    ("The answer is 81.", GSM, False),
    ("It takes 160 minutes, which is 2 hours and 40 minutes.", MINUTES, True),
    ("So 2 times 80, which is 160.", MINUTES, True),
    ("So 2 times 80, which is 160.", {"answer": "80"}, False),
    ("The total time is 160 minutes.", MINUTES, True),
    ("The total time is 2 hours and 40 minutes.", MINUTES, False),  # 160 only by conversion: not what was asked
]


@pytest.mark.parametrize("completion, row, expected", SCORE_TABLE)
def test_score_row_table(completion, row, expected):
    assert score_row(completion, row) is expected


def test_score_row_table_size_and_no_answer():
    assert len(SCORE_TABLE) >= 60
    assert score_row("The answer is C.", {"choices": ABCD}) is None and score_row("7", {}) is None


# Realistic completions written apart from SCORE_TABLE (after the rules), labelled as a careful reader would; the
# rules must agree on >= 98 %. Known disagreement: 'birds chirping' for the option 'Bird chirping' (plural: no match).
_MM = {"answer": "B", "choices": ABCD, "options": ["Increase in supply", "Decrease in demand", "Increase in demand",
                                                   "Price ceiling"]}
_OB = {"answer": "D", "choices": ABCD, "options": ["a rock", "a cloud", "a shadow", "a plant"]}
_SND = {"answer": "C", "choices": ABCD, "options": ["Dog barking", "Cat meowing", "Bird chirping", "Cow mooing"]}
_MUS = {"answer": "A", "choices": ABCD, "options": ["Piano", "Violin", "Guitar", "Drums"]}
_EMO = {"answer": "B", "choices": ABCD, "options": ["Happy", "Angry", "Sad", "Neutral"]}
_CNT = {"answer": "C", "choices": ABCD, "options": ["1", "2", "3", "4"]}
REALISTIC = [
    ("The correct answer is B. Decrease in demand.", _MM, True), ("B) Decrease in demand", _MM, True),
    ("The answer is B: a decrease in demand shifts the curve left.", _MM, True),
    ("A decrease in demand would cause the price to fall, so the answer is B.", _MM, True),
    ("Option B, decrease in demand.", _MM, True), ("I believe the answer is (B).", _MM, True),
    ("The answer is A, increase in supply.", _MM, False), ("Both B and C are plausible.", _MM, False),
    ("Decrease in demand.", _MM, True), ("An increase in demand.", _MM, False),
    ("The answer is B or D.", _MM, False), ("I'm not sure, but I think it's B.", _MM, True),
    ("Answer: D", _OB, True), ("D. a plant", _OB, True), ("A plant is a living thing, so the answer is D.", _OB, True),
    ("The answer is D, a plant, because it makes its own food.", _OB, True), ("a plant", _OB, True),
    ("A rock is not alive; a plant is. D.", _OB, True), ("The answer is (A) a rock.", _OB, False),
    ("Among the options, a cloud and a shadow are not living, so the answer is d.", _OB, True),
    ("The sound is a bird chirping.", _SND, True), ("Bird chirping", _SND, True),
    ("I hear birds chirping in the background.", _SND, True), ("It sounds like a dog barking.", _SND, False),
    ("C. Bird chirping", _SND, True),
    ("The instrument is a piano.", _MUS, True), ("Piano", _MUS, True),
    ("The melody is played on the violin.", _MUS, False),
    ("A piano plays the melody while drums keep time.", _MUS, False),
    ("The speaker sounds angry.", _EMO, True), ("Angry.", _EMO, True),
    ("The speaker is not happy; they sound angry.", _EMO, True), ("The emotion is sad.", _EMO, False),
    ("There are 3 people speaking.", _CNT, True), ("three", _CNT, True), ("The answer is C.", _CNT, True),
    ("I count two speakers.", _CNT, False),
    ("Natalia sold 48 clips in April and 24 in May, so she sold 48 + 24 = 72 clips.", {"answer": "72"}, True),
    ("The answer is 72.", {"answer": "72"}, True), ("72 clips", {"answer": "72"}, True),
    ("She sold seventy-two clips altogether.", {"answer": "72"}, True), ("The answer is 48.", {"answer": "72"}, False),
    ("He needs $5 more.", {"answer": "5"}, True), ("So the answer is \\boxed{5}.", {"answer": "5"}, True),
    ("Five dollars.", {"answer": "5"}, True), ("He needs 5 dollars, which is 500 cents.", {"answer": "5"}, True),
    ("The total is $1,200.", {"answer": "1200"}, True), ("1200", {"answer": "1200"}, True),
    ("It costs 1,200 dollars in total.", {"answer": "1200"}, True), ("The answer is 120.", {"answer": "1200"}, False),
]


def test_score_row_agrees_with_a_careful_reader_on_realistic_completions():
    disagree = [(c, r["answer"]) for c, r, want in REALISTIC if score_row(c, r) is not want]
    assert len(REALISTIC) == 50 and len(disagree) <= 1, disagree  # >= 98 %


def test_text_reference_reward_reads_multiple_choice_rows_as_evaluation_does():
    """--reward_ref text (the default) on a multiple-choice row: r_i = 1 when y_i and y_hat pick the same option,
    however each names it; the old free-text comparison read 'C, Pavlov' as no letter and gave 0."""
    import cord
    from judge import RuleJudge, judge_pairs

    row = {"answer": "C", "choices": list("ABCD"), "options": ["Thorndike", "Skinner", "Pavlov", "Watson"]}
    completions = ["The answer is C, Pavlov.", "Pavlov", "B, Skinner.", "A or C", "I cannot hear the audio."]
    refs = ["C."] * 5  # y_hat picks C
    expected = [1.0, 1.0, 0.0, 0.0, 0.0]  # C named by letter; C by its words; another option; a hedge; no pick
    assert RuleJudge()(completions[:1], refs[:1]) == [0.0]  # what the free-text comparison said
    assert judge_pairs(RuleJudge(), completions, refs, [row] * 5) == expected
    judges = (RuleJudge(), RuleJudge(ground_truth=True))
    r = cord.rewards_for(judges, completions, refs, ["C"] * 5, "text", [row] * 5)
    assert r.tolist() == expected
    r_both = cord.rewards_for(judges, completions, refs, ["C"] * 5, "both", [row] * 5)
    assert r_both.tolist() == expected  # ground truth C agrees with y_hat here
    math_row = {"answer": "18"}
    assert judge_pairs(RuleJudge(), ["It is $18."], ["18"], [math_row]) == RuleJudge()(["It is $18."], ["18"])
