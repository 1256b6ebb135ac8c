"""The sequence-level judge J(y, ŷ) of CORD's Eq. 8: do two completions reach the same final answer?

CORD rewards each audio rollout y^(i) with r_i = J(y^(i), ŷ) ∈ {0, 1}, where ŷ is
the model's own answer to the text version of the question (Eq. 8) or, in
ground-truth mode, the dataset's reference answer. Two judges, one call:

    judge = RuleJudge()                        # default: rules + math-verify
    judge = ModelJudge(model, tokenizer)       # the paper's setting: an LM says yes/no
    rewards = judge(preds, refs)               # list[float] of 0.0 / 1.0
    score_row(completion, row)                 # evaluation: right for this manifest row? (letters, option texts,
                                               # numbers; None when the row has no answer)

By hand (rule judge; --gt takes the second argument as a bare reference answer):

    python judge.py "so the answer is \\boxed{\\frac{1}{2}}" "The answer is 0.5."
    python judge.py --gt "She pays seven dollars." "7"

Departures from the paper:
  1. The paper's judge is an internal distilled model (> 99% agreement with its
     labels). Ours is rule-based by default; ModelJudge takes any causal LM as is.
  2. ModelJudge reads P(yes) vs P(no) from one forward pass; it never generates.
"""
import argparse
import re
import threading
import unicodedata
from decimal import Decimal
from fractions import Fraction
from functools import lru_cache

import torch
from math_verify import parse, verify
from math_verify.errors import TimeoutException

SHORT_CHARS = 40  # a one-line completion this short is taken as the answer itself
MATH_CHARS = 100  # longer answers are compared as strings only: bounds math-verify's time
TIMEOUT_S = 1  # math-verify's timeout per parse/verify (signal.alarm: whole seconds, main thread only)

# ---------------------------------------------------------------------------
# Extraction: completion -> final answer
# ---------------------------------------------------------------------------
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "the answer is", "**Answer:**", "the correct option is"
_MARKER = re.compile(r"(?:answer|option|choice)[\s*]*(?:is\b(?!')|:)[\s:*]*", re.I)
_EQUATION = re.compile(r"(?:^|[\s,;:(])[A-Za-z]\w{0,15}\s*=\s*([^=\n]+?)\s*$")  # "... so x = 3" at the very end
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf)\s*\{([^{}]*)\}")  # \text{(C)} -> (C)
_VULGAR = re.compile(r"(?:(\d+)\s?)?([\u00bc-\u00be\u2150-\u215e])")  # 1½, ¾
# "option B", "I'd pick B", "(B)"
_CHOICE = re.compile(r"\b(?i:option|choice|choose|select|pick)\s*\(?([A-J])\b\)?|(?<!\w)\(([A-J])\)")
_CHOICE_START = re.compile(r"\s*\(?([A-J])[.):](?:\s|$)")  # "B. Paris ..." at the very start
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9}
_WORD_VALUE = {w: i for i, w in enumerate(_UNITS)} | {w: 20 + 10 * i for i, w in enumerate(_TENS)}
_WORD = "|".join(sorted([*_WORD_VALUE, *_SCALES], key=len, reverse=True))  # "seventeen" before "seven"
_NUMBER_WORDS = re.compile(rf"\b(?:{_WORD})(?:(?:\s+and\s+|[\s-]+)(?:{_WORD}))*\b", re.I)


def _clean(span):
    """Trim markdown, `$`/`\\(` wrappers, \\text{} and a final full stop: '**$\\frac12$.**' -> '\\frac12'."""
    s = _TEXT_WRAP.sub(r"\1", span).strip().strip("*").strip()
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip().strip("$").strip()
    return s[:-1].strip() if s.endswith(".") else s


def _boxed(text):
    """Content of the last \\boxed{...}, nested braces allowed; None if absent or unbalanced."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth = 1
    for k in range(starts[-1], len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[starts[-1] : k]
    return None


def _after_marker(text):
    """'... so the answer is 7 dollars. Done' -> '7 dollars' (last marker, to the end of its sentence)."""
    last = None
    for last in _MARKER.finditer(text):
        pass
    if last is None:
        return None
    line = text[last.end() :].strip().split("\n")[0]
    return _clean(re.split(r"\.(?=\s|$)", line)[0])


def _equation(text):
    """A completion ending in an equation gives its right side: '2x = 6, so x = 3.' -> '3'."""
    m = _EQUATION.search(re.sub(r"\.\s*$", "", text))
    return _clean(m.group(1)) if m else None


def _vulgar_fractions(text):
    """Unicode fractions as a/b: '1½' -> '3/2', '¾' -> '3/4'."""
    def as_fraction(m):
        f = Fraction(unicodedata.numeric(m.group(2))).limit_denominator(16) + int(m.group(1) or 0)
        return f"{f.numerator}/{f.denominator}"
    return _VULGAR.sub(as_fraction, text)


def _short(text):
    """A short one-line completion is itself the answer ('7', 'B. Paris', '\\frac{1}{2}'),
    unless it is prose with several numbers ('it costs 3, in total 12')."""
    if len(text) > SHORT_CHARS or "\n" in text or _MARKER.search(text):  # 'The answer is' is no answer
        return None
    if _CHOICE.search(text) and not _LETTER.fullmatch(text):  # 'I would choose option B.': the letter (_choice)
        return None
    if len(_NUMBER.findall(text)) > 1 and re.search(r"[^\W\d_]{2,}\s+[^\W\d_]{2,}", text):
        return None
    return _clean(text)


def _choice(text):
    """Last 'option B' / '(B)' in the text, else a leading 'B.'; None if there is none."""
    last = None
    for last in _CHOICE.finditer(text):
        pass
    if last is not None:
        return last.group(1) or last.group(2)
    start = _CHOICE_START.match(text)
    return start.group(1) if start else None


def _last_number(text):
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _last_number_words(text):
    runs = _NUMBER_WORDS.findall(text)
    return runs[-1] if runs else None


def extract_answer(completion):
    """The final answer of a free-form completion, or None. Rules in order, first hit wins:
    \\boxed{}, 'the answer is'/'Answer:'/'the correct option is', a final equation's right side,
    a short completion itself, a multiple-choice letter, the last number, the last number in words.
    Unicode fractions are read as a/b ('1½' -> '3/2') and \\text{} wrappers dropped.

    >>> extract_answer("x = 2, so the answer is \\\\boxed{\\\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> extract_answer("I think it costs 3 dollars, in total 12.")
    '12'
    >>> extract_answer("no idea") is None, extract_answer(None) is None
    (False, True)
    """
    if not isinstance(completion, str) or not completion.strip():
        return None
    text = _vulgar_fractions(completion.strip())
    for rule in (_boxed, _after_marker, _equation, _short, _choice, _last_number, _last_number_words):
        answer = rule(text)
        if answer:
            return _clean(answer) if rule is _boxed else answer.strip()
    return None


# ---------------------------------------------------------------------------
# Comparison: answer vs answer
# ---------------------------------------------------------------------------
_LETTER = re.compile(r"(?i:option|choice)?\s*(?:\(([A-J])\)|([A-J])(?:[.:)]|$))\s*(.*)", re.S)
_LONE_LETTER = re.compile(r"\(?[a-j][.):]?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # "1,234,567" -> "1234567"
_MATHY = re.compile(r"[\\^/*+=(){}\[\]<>|_]")  # LaTeX or operators: leave it to math-verify
_PLAIN = re.compile(r"-?\d+(?:\.\d+)?")


def _words_to_int(run):
    """'one hundred and twenty-three' -> 123."""
    total, current = 0, 0
    for word in re.findall(r"[a-z]+", run.lower()):
        if word == "hundred":
            current = max(current, 1) * 100
        elif word in _SCALES:
            total, current = total + max(current, 1) * _SCALES[word], 0
        elif word in _WORD_VALUE:
            current += _WORD_VALUE[word]
    return total + current


def _normalise(answer):
    """Spoken-answer normal form: '1,234' -> '1234', 'Seven dollars' -> '7', '50%' -> '50', 'Yes.' -> 'yes'."""
    s = answer.replace("{,}", ",").replace("\u2212", "-").strip().strip("$").strip()
    s = _THOUSANDS.sub("", s)
    if "\\" not in s:
        s = s.casefold()
    yes_no = re.match(r"(yes|no)\b", s)
    if yes_no:
        return yes_no.group(1)
    s = _NUMBER_WORDS.sub(lambda m: str(_words_to_int(m.group())), s)
    numbers = _NUMBER.findall(s)
    if len(numbers) == 1 and not _MATHY.search(s.replace(numbers[0], " ")):  # one number among words, units
        return numbers[0]
    return s[:-1].strip() if s.endswith(".") else s


def _math_equal(x, y):
    """math-verify on two short answers, bounded by its timeout; never raises."""
    if len(x) > MATH_CHARS or len(y) > MATH_CHARS:
        return False
    # math-verify's timeout uses signal.alarm, which only works in the main thread.
    timeout = TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    try:
        gold = _parse(y, timeout)
        pred = _parse(x, timeout) if gold else ()
        return bool(pred) and verify(list(gold), list(pred), timeout_seconds=timeout)
    except (Exception, TimeoutException):
        return False


@lru_cache(maxsize=4096)
def _parse(answer, timeout):
    return tuple(parse(f"${answer}$", parsing_timeout=timeout))


def _letter(answer):
    """'(B) Paris' -> ('B', 'Paris'), 'option C' -> ('C', ''), '42' -> (None, '42')."""
    if _LONE_LETTER.fullmatch(answer):  # a completion that is only 'b' or '(c)': the letter, as VoiceBench reads it
        return answer.strip("().:").upper(), ""
    m = _LETTER.fullmatch(answer)
    return (m.group(1) or m.group(2), m.group(3)) if m else (None, answer)


def _is_math(s):
    """Has a digit or a math symbol; plain words never go to math-verify ('ab' would equal 'ba')."""
    return bool(re.search(r"\d", s) or _MATHY.search(s))


def _same(x, y):
    """Whether two extracted answers agree (None never matches)."""
    if not x or not y:
        return False
    (lx, x), (ly, y) = _letter(x), _letter(y)
    if lx and ly:  # two letters: compare the letters
        return lx == ly
    if not x or not y:  # a bare letter against an answer with no letter
        return False
    x, y = _normalise(x), _normalise(y)  # one letter: its option text vs the other ('(B) 42' vs '42')
    if x == y:
        return True
    if _PLAIN.fullmatch(x) and _PLAIN.fullmatch(y):
        return Decimal(x) == Decimal(y)  # '7.50' == '7.5', exactly
    return _is_math(x) and _is_math(y) and _math_equal(x, y)


def answers_match(a, b):
    """Whether two completions (or bare answers) reach the same final answer.

    >>> answers_match("So the answer is \\\\boxed{\\\\frac{3}{4}}", "It is 0.75.")
    True
    >>> answers_match("The total is twenty-three apples.", "Answer: 23"), answers_match(None, None)
    (True, False)
    """
    return _same(extract_answer(a), extract_answer(b))


class RuleJudge:
    """J(y, ŷ) by rules (Eq. 8). ground_truth=True: refs are bare answers, used as they are.

    >>> RuleJudge()(["... answer is 4", "... answer is (B)"], ["It's four.", "C"])
    [1.0, 0.0]
    >>> RuleJudge(ground_truth=True)(["so 1,200 in all"], ["1200"])
    [1.0]
    """

    def __init__(self, ground_truth=False):
        self.ground_truth = ground_truth

    def __call__(self, preds, refs):
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} preds but {len(refs)} refs")
        as_ref = (lambda r: _clean(str(r)) if r is not None else None) if self.ground_truth else extract_answer
        return [float(_same(extract_answer(p), as_ref(r))) for p, r in zip(preds, refs)]


# ---------------------------------------------------------------------------
# Scoring a manifest row: the one verdict of evaluation and of --reward_ref answer
# ---------------------------------------------------------------------------
_NEGATED = re.compile(r"\b(?:not|none|never|neither|nor|incorrect|wrong|rule[sd]? out|eliminat\w*|rather than|"
                      r"instead of|unlike|accompanied by)\b|n[’']t\b", re.I)  # such a clause names no pick
_CLAUSE_END = re.compile(r"([.;!?\n]+(?=\s|$)|,|\s(?:but|because|since|while|whereas|although|however)\b)", re.I)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|\n")
_FINAL = re.compile(  # phrases after which a careful reader looks for the final pick
    r"\b(?:answer|option|choice)s?\s*(?:is|would be|should be|must be|:)|\bclosest(?: one| option| answer)? is"
    r"|\b(?:choose|pick|select|go with)\b|\b(?:so|therefore|thus|hence)\b|\bit(?:'s|’s| is| must be| would be)"
    r"|\b(?:correct|right|best)(?: one| option)? is", re.I)
_ASIDE = re.compile(r",?\s(?:although|though|whereas|because|since)\b", re.I)  # 'it's B, although the joule …'
_MENTION = re.compile(r"⟨(\d)⟩|(?<![\w'’⟨])([A-J])(?![\w'’])")  # a masked option text, or a lone capital
_LOWER = re.compile(r"(?:option|choice|answer is|answer:)\s*\(?([a-j])\)?(?=[.,:;)!?]|\s*$)", re.I)
_WORD_AFTER = re.compile(r" (?!(?:or|and|is|was|would|because|since|as|with|which|but|then)\b)[a-z]")
_RESTATED = re.compile(r"(-?[\d.,/]+)(?:\s+[a-z]+){0,2}\s*,\s*(?:which is|that is|i\.e\.|or)\s[^.;]*\.?\s*$", re.I)
_OPERATOR = re.compile(r"\b(?:times|plus|minus|divided|over)\b|[×*+=/÷-]\s*$", re.I)


def _plain(text):
    """Markdown and LaTeX wrappers off, number words as digits: '**\\text{(C)}**' -> '(C)', 'nine' -> '9'."""
    s = _TEXT_WRAP.sub(r"\1", text)
    s = re.sub(r"\\(?:boxed|fbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"[*_`$]|\\[()\[\]]", " ", s)
    return _NUMBER_WORDS.sub(lambda m: str(_words_to_int(m.group())), s)


def _mask_options(text, options):
    """Each option's words in the text become ⟨k⟩ (longest option first, a leading article optional), so that
    neither a negation inside an option ('Not enough data') nor a letter in one ('C major') is read as a pick.
    A mask is never matched again: option 'two' (-> '2') must not rewrite the '⟨2⟩' that 'nine' became."""
    order = sorted(range(len(options)), key=lambda k: -len(options[k]))
    for k in order:
        words = re.sub(r"^(?:a|an|the)\s+", "", _plain(options[k]).strip().rstrip(".").strip(), flags=re.I)
        if words and not re.fullmatch(r"[A-Za-z]", words):  # an option that is one letter is read as a letter
            pattern = r"(?<![\w⟨])(?:(?:a|an|the)\s+)?" + r"\s+".join(map(re.escape, words.split())) + r"(?![\w⟩])"
            text = re.sub(pattern, f"⟨{k}⟩", text, flags=re.I)
    return text


def _affirmed(text):
    """The text without its negated clauses: 'Not C. The answer is D.' -> ' . The answer is D.'"""
    parts = _CLAUSE_END.split(text)  # clause, separator, clause, ...
    return "".join(p if i % 2 or not _NEGATED.search(p) else " " for i, p in enumerate(parts))


def _picks(span, letters):
    """Option indices named in a span, in order: a letter of `letters`, or a masked option text."""
    out = []
    for m in _MENTION.finditer(span):
        if m.group(1):
            out.append(int(m.group(1)))
            continue
        before, after = span[: m.start()], span[m.end() :]
        pronoun = m.group(2) in "AI" and re.match(_WORD_AFTER, after)  # 'A dog', 'I think': a word, not a letter
        if pronoun and not re.search(r"(?:\bis|\bbe|option|choice|:)\s*$", before, re.I):
            continue
        if m.group(2) in letters or m.group(2) != "I":
            out.append(letters.index(m.group(2)) if m.group(2) in letters else len(letters) + ord(m.group(2)))
    return out + [letters.index(x.upper()) for x in _LOWER.findall(span) if x.upper() in letters]


def pick_option(completion, letters, options=None):
    """The letter of the one option a careful reader says the completion picks, else None (no pick, or a hedge:
    'A or C', a letter with another option's words). Letters in any ordinary form ('C, Pavlov', 'option C',
    '**C**', 'the closest is B', '…, so D.'); an option named by its words alone when exactly one option's words
    are there; negated clauses ('Not C.', 'it is not a car') name no pick. The last final-answer phrase
    ('the answer is', 'so', 'I'd pick') that names something decides; without one, everything named must agree.

    >>> pick_option("The answer is C, Pavlov.", list("ABCD")), pick_option("Not C. The answer is D.", list("ABCD"))
    ('C', 'D')
    >>> pick_option("The speaker is a man.", list("ABC"), ["Man", "Woman", "Child"]), pick_option("A or C", list("ABC"))
    ('A', None)
    """
    if not isinstance(completion, str) or not completion.strip():
        return None
    bare = completion.strip().strip("*().:").strip()
    if len(bare) == 1 and bare.upper() in letters:  # 'b', '(c)': the letter, as VoiceBench reads it
        return bare.upper()
    usable = [o if isinstance(o, str) else "" for o in (options or [])]
    text = _affirmed(_mask_options(_plain(completion), usable))
    spans = []
    for m in _FINAL.finditer(text):
        rest = text[m.end() :].lstrip(" \n:*")
        end = _SENTENCE_END.search(rest)
        span = rest[: end.start() if end else len(rest)]
        spans.append(span[: m2.start()] if (m2 := _ASIDE.search(span)) else span)  # the pick, not its asides
    for span in reversed(spans):  # the last final-answer phrase that names an option decides
        named = set(_picks(span, letters))
        if named:
            return letters[named.pop()] if len(named) == 1 and min(named) < len(letters) else None
    named = set(_picks(text, letters))
    return letters[named.pop()] if len(named) == 1 and min(named) < len(letters) else None


def _restated_number(completion):
    """'… 160 minutes, which is 2 hours and 40 minutes.' -> '160': a final quantity restated in other units
    (not a computation: '3 times 6, which is 18' gives None)."""
    m = _RESTATED.search(completion.strip())
    if not m or _OPERATOR.search(completion[: m.start(1)].rstrip()[-12:]):
        return None
    return m.group(1).rstrip(".,")


def score_row(completion, row):
    """Is `completion` right for manifest row `row` (data_gen.py's fields)? None when the row has no answer.

    Multiple choice (`choices` = the letters, optional `options` = their texts in the same order): the option
    pick_option reads must be `answer`. Otherwise `answer` is compared as RuleJudge(ground_truth=True) does
    ('$18', '18 dollars', '\\boxed{18}'), also accepting a final quantity restated in other units.

    >>> score_row("Answer: C, Pavlov", {"answer": "C", "choices": list("ABCD")})
    True
    >>> score_row("It takes 160 minutes, which is 2 hours and 40 minutes.", {"answer": "160"}), score_row("7", {})
    (True, None)
    """
    answer = row.get("answer")
    if answer is None:
        return None
    if row.get("choices"):
        return pick_option(completion, list(row["choices"]), row.get("options")) == str(answer).strip().upper()
    reference = _clean(str(answer))
    if _same(extract_answer(completion), reference):
        return True
    restated = _restated_number(completion) if isinstance(completion, str) else None
    return bool(restated) and _same(restated, reference)


def judge_pairs(judge, preds, refs, rows=None):
    """J(y_i, y_hat_i) for each pair (Eq. 8 with the model's own text answer as reference). With the rule judge and
    the manifest rows, a multiple-choice row's pair agrees when both pick the same option (pick_option: 'C, Pavlov'
    and 'The answer is C.' agree; no pick agrees with nothing); other rows, and other judges, go to `judge`.

    >>> row = {"choices": list("ABCD"), "options": ["Thorndike", "Skinner", "Pavlov", "Watson"]}
    >>> judge_pairs(RuleJudge(), ["The answer is C, Pavlov.", "B", "Pavlov"], ["C.", "C.", "(C)"], [row] * 3)
    [1.0, 0.0, 1.0]
    """
    if rows is None or not isinstance(judge, RuleJudge):
        return judge(preds, refs)
    out = judge(preds, refs)
    for i, row in enumerate(rows):
        if row.get("choices"):
            letters, options = list(row["choices"]), row.get("options")
            a, b = pick_option(preds[i], letters, options), pick_option(refs[i], letters, options)
            out[i] = float(a is not None and a == b)
    return out


# ---------------------------------------------------------------------------
# Model judge: P(yes) vs P(no) from the next-token logits
# ---------------------------------------------------------------------------
class ModelJudge:
    """J(y, ŷ) by a causal LM, as in the paper: a fixed prompt asks whether the two
    responses reach the same final answer; score = P(yes) / (P(yes) + P(no)) at the
    next token; verdict = score >= threshold.

    model: anything whose __call__(input_ids=, attention_mask=) returns `.logits`
    (B, T, V): a transformers causal LM, or an adapter around the trained LALM's
    text path. Inputs are right-padded and the logits read at each row's last
    real token, so batching cannot change a score, whatever the position
    embedding. The model's train/eval mode is left as it is. Memory: the full
    (batch_size, T, V) logits are materialised; lower batch_size if short.
    """

    PROMPT = (
        "Two responses to the same question are shown below. Do they reach the same final answer? "
        "Reply with yes or no.\n\nResponse A: {a}\n\nResponse B: {b}\n\nSame final answer:"
    )

    def __init__(self, model, tokenizer, threshold=0.5, batch_size=16, device=None, max_chars=2000):
        self.model, self.tokenizer = model, tokenizer
        self.threshold, self.batch_size, self.max_chars = threshold, batch_size, max_chars
        self.device = device or getattr(model, "device", None) or "cpu"
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        first = lambda w: (tokenizer.encode(w, add_special_tokens=False) or [None])[0]
        yes = {first(w) for w in ("yes", " yes", "Yes", " Yes")} - {None}
        no = {first(w) for w in ("no", " no", "No", " No")} - {None}
        self.yes_ids, self.no_ids = sorted(yes - no), sorted(no - yes)  # a shared first token says nothing
        if not self.yes_ids or not self.no_ids:
            raise ValueError("the tokenizer cannot tell 'yes' from 'no' by their first token")

    def prompt(self, a, b):
        """The full prompt string (chat template applied when the tokenizer has one)."""
        tail = lambda s: str(s or "")[-self.max_chars :]  # the final answer is at the end
        text = self.PROMPT.format(a=tail(a), b=tail(b))
        if self.chat:
            messages = [{"role": "user", "content": text}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text

    @torch.no_grad()
    def scores(self, preds, refs):
        """P(yes) / (P(yes) + P(no)) per pair, in [0, 1]."""
        if len(preds) != len(refs):
            raise ValueError(f"{len(preds)} preds but {len(refs)} refs")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for i in range(0, len(preds), self.batch_size):
            pairs = zip(preds[i : i + self.batch_size], refs[i : i + self.batch_size])
            ids = [self.tokenizer.encode(self.prompt(a, b), add_special_tokens=not self.chat) for a, b in pairs]
            T = max(map(len, ids))
            input_ids = torch.tensor([x + [pad] * (T - len(x)) for x in ids])  # (B, T), right padded
            mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in ids])  # (B, T)
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
            last = mask.sum(1) - 1  # (B,) each prompt's last real token
            z = logits[torch.arange(len(ids), device=mask.device), last].float()  # (B, V) next-token logits
            # P(yes) / (P(yes) + P(no)) = sigmoid(logsumexp z_yes - logsumexp z_no): softmax's normaliser cancels
            out += torch.sigmoid(z[:, self.yes_ids].logsumexp(-1) - z[:, self.no_ids].logsumexp(-1)).tolist()
        return out

    def __call__(self, preds, refs):
        return [float(s >= self.threshold) for s in self.scores(preds, refs)]


def make_judges(kind="rule", lm=None, tokenizer=None, judge_model=None, trust_remote_code=False, device="cpu"):
    """(judge of two completions, judge of a completion vs a ground-truth answer), as cord.py uses them.

    kind "rule": RuleJudge and RuleJudge(ground_truth=True). kind "model": one ModelJudge for both,
    asking `judge_model` (a causal LM, loaded here) or else `lm` with `tokenizer` (e.g. the LALM's text path).
    """
    if kind == "rule":
        return RuleJudge(), RuleJudge(ground_truth=True)
    if judge_model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lm = AutoModelForCausalLM.from_pretrained(judge_model, trust_remote_code=trust_remote_code).to(device)
        tokenizer = AutoTokenizer.from_pretrained(judge_model, trust_remote_code=trust_remote_code)
    mj = ModelJudge(lm, tokenizer)
    return mj, mj


# ---------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description="Do two completions reach the same final answer? (CORD Eq. 8)")
    p.add_argument("a", help="a completion")
    p.add_argument("b", help="a completion (or, with --gt, a bare reference answer)")
    p.add_argument("--gt", action="store_true", help="ground-truth mode: take b as the answer itself")
    p.add_argument("--model", help="also ask this local/cached causal LM (ModelJudge)")
    args = p.parse_args()
    b_answer = _clean(args.b) if args.gt else extract_answer(args.b)
    print(f"answer a: {extract_answer(args.a)!r}\nanswer b: {b_answer!r}")
    print(f"rule judge: {RuleJudge(ground_truth=args.gt)([args.a], [args.b])[0]:.0f}")
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
        judge = ModelJudge(model, tokenizer)
        score = judge.scores([args.a], [args.b])[0]
        print(f"model judge: {float(score >= judge.threshold):.0f}  (P(yes) = {score:.3f})")


if __name__ == "__main__":
    main()
