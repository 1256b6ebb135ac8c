"""judge.py (Eq. 8): answer extraction, the hand-written verdict table, garbage in, ModelJudge mechanics."""
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from judge import ModelJudge, RuleJudge, answers_match, extract_answer, main as judge_main


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
    assert capsys.readouterr().out.split("\n")[:3] == ["answer a: '\\\\frac{1}{2}'", "answer b: 'It is 0.5'", "rule judge: 1"]
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
    ("The correct option is A.", "A", True), ("The right choice is C", "C", True), ("The correct option is A.", "B", False),
    ("The correct answer is (B).", "B", True), ("Answer: B) London", "B", True),
    ("so \\boxed{\\text{(C)}}", "C", True), ("\\boxed{\\textbf{(D)}}", "D", True), ("\\boxed{\\text{B}}", "B", True),
    ("\\boxed{\\text{(C)}}", "D", False),
    ("She ate ½ of the pie.", "1/2", True), ("the answer is ¾", "0.75", True), ("It is 1½ hours", "1.5", True),
    ("½", "0.25", False),
    ("I would choose option B.", "B", True), ("I'd pick C", "C", True), ("I would select (D).", "D", True),
    ("I would choose option B.", "C", False), ("b", "B", True), ("(c)", "C", True), ("a", "B", False), ("b", "4", False),
]


@pytest.mark.parametrize("completion,answer,expected", SHAPES)
def test_judge_answer_shapes_of_real_completions(completion, answer, expected):
    assert RuleJudge(ground_truth=True)([completion], [answer]) == [float(expected)]
