"""The manifest contract that cord.py and data_gen.py share: reading and checking manifest.jsonl, audio at 16 kHz.

One JSON object per line (data_gen.py's docstring and the README's manifest table list the fields); every
problem stops the program with one line naming the file and line, never a traceback.
"""
import json
import math
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000  # the audio encoders (Whisper-style) read 16 kHz mono


def read_jsonl(path):
    """Yield (line number, dict) from a JSONL file; a bad line raises `path:line: problem; what to do`.

    UTF-8 (a leading byte-order mark is allowed); a line in another encoding (latin-1, UTF-16) is such a line.
    """
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if no == 1 else "")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{no}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{no}: not valid JSON ({e.msg} at column {e.colno}); fix or delete this line")
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{no}: expected a JSON object, got {type(row).__name__}; one object per line")
            yield no, row


def to_16k(audio, sr, sr_out: int = SR, zeros: int = 16, rolloff: float = 0.95) -> np.ndarray:
    """Polyphase windowed-sinc resampling (Kaiser, beta 8.6) to sr_out: float32 mono.

    Output sample n sits at input time t = n*sr/sr_out = base + frac; y[n] = sum_j x[base+j] h(frac-j), with
    the low-pass h(tau) = c sinc(c tau) w(tau), cut-off c = rolloff * min(1, sr_out/sr) of the input Nyquist
    and `zeros` zero crossings each side. With sr_out/sr = L/M there are only L distinct fracs (phases);
    outputs n = r, r+L, r+2L, ... share one phase and step M inputs, so each is a strided view times a vector.
    >>> to_16k(np.ones(24000, np.float32), 24000).shape
    (16000,)
    """
    x = np.asarray(audio, np.float32)
    x = x.mean(axis=1) if x.ndim == 2 else x                  # (N, C) -> (N,)
    if sr == sr_out:
        return x.copy()
    g = math.gcd(int(sr), int(sr_out))
    L, M = sr_out // g, int(sr) // g                          # up, down
    c = rolloff * min(1.0, sr_out / sr)
    half = zeros / c                                          # kernel half-width, in input samples
    W = int(math.ceil(half))
    j = np.arange(-W + 1, W + 1)                              # (2W,) tap offsets
    tau = np.arange(L)[:, None] / L - j[None, :]              # (L, 2W) distance from each tap
    win = np.i0(8.6 * np.sqrt(np.clip(1 - (tau / half) ** 2, 0, None))) / np.i0(8.6)
    bank = (c * np.sinc(c * tau) * win * (np.abs(tau) <= half)).astype(np.float32)   # (L, 2W)
    n_out = int(math.ceil(len(x) * L / M))
    frames = np.lib.stride_tricks.sliding_window_view(np.pad(x, (W, W + 1)), 2 * W)   # (N+2, 2W) view
    y = np.empty(n_out, np.float32)
    for r in range(min(L, n_out)):
        base, phase = (r * M) // L, (r * M) % L
        y[r::L] = frames[base + 1::M][:len(range(r, n_out, L))] @ bank[phase]      # (n_out/L, 2W) @ (2W,)
    return y


def wav_duration(path):
    """Seconds of a valid 16 kHz mono WAV, else None (missing, truncated or wrong format)."""
    try:
        info = sf.info(str(path))
        ok = info.samplerate == SR and info.channels == 1 and info.frames > 0
        return info.frames / SR if ok else None
    except Exception:
        return None


def read_manifest(path, check_files: bool = True, lines: list | None = None) -> list[dict]:
    """Rows of a manifest.jsonl, validated; a bad line raises ValueError('path:line: problem; what to do').

    lines: a list that receives each row's line number.
    """
    rows, seen, root = [], set(), Path(path).parent
    for no, row in read_jsonl(path):
        where = f"{path}:{no}:"
        for k in ("id", "audio", "text", "prompt"):  # text (what the audio says), prompt (shown as text): optional
            if (k in ("id", "audio") or k in row) and (not isinstance(row.get(k), str) or not row[k].strip()):
                raise ValueError(f"{where} field {k!r} missing or not a non-empty string; every line needs id and "
                                 "audio, and text / prompt, when present, are non-empty strings")
        if "answer" in row and not isinstance(row["answer"], str):
            raise ValueError(f"{where} 'answer' must be a string (write \"73\", not 73)")
        choices = row.get("choices")
        if "choices" in row and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)):
            raise ValueError(f"{where} 'choices' must be a list of strings")
        options = row.get("options")
        if "options" in row and not (isinstance(options, list) and all(isinstance(o, str) for o in options)
                                     and len(options) == len(row.get("choices") or [])):
            raise ValueError(f"{where} 'options' must be a list of strings, one per choice (the option texts in the "
                             "order of 'choices')")
        if "instruction" in row and not isinstance(row["instruction"], str):
            raise ValueError(f"{where} 'instruction' must be a string (it replaces --instruction for this row; \"\" "
                             "sends none)")
        if "category" in row and (not isinstance(row["category"], str) or not row["category"].strip()):
            raise ValueError(f"{where} 'category' must be a non-empty string (e.g. sound, music, speech)")
        if row["id"] in seen:
            raise ValueError(f"{where} duplicate id {row['id']!r}; ids must be unique")
        if check_files and not (root / row["audio"]).exists():
            raise ValueError(f"{where} audio file {row['audio']} not found next to the manifest; "
                             "rerun data_gen.py with the same arguments to regenerate it")
        seen.add(row["id"])
        rows.append(row)
        if lines is not None:
            lines.append(no)
    return rows


def load_manifest(path) -> list[dict]:
    """A manifest for training or evaluation: read_manifest's rows plus `audio_path` (the WAV's full path).

    A missing, empty or bad manifest stops the program with one line: `path:line: what is wrong`.
    """
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such manifest; make one with data_gen.py (README)")
    lines = []
    try:
        rows = read_manifest(path, lines=lines)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    except OSError as e:
        raise SystemExit(f"{path}: cannot read the manifest ({e.strerror})") from None
    if not rows:
        raise SystemExit(f"{path}: the manifest is empty")
    return [dict(ex, audio_path=Path(path).parent / ex["audio"], line=no) for ex, no in zip(rows, lines)]


def with_transcripts(rows: list[dict], where) -> list[dict]:
    """The rows training can use: those with a `text` (the teacher reads it); the others are counted, never silently
    dropped, and none left is one line."""
    kept = [r for r in rows if r.get("text")]
    if len(kept) < len(rows):
        print(f"{where}: skipping {len(rows) - len(kept)} audio-only rows (no 'text') in training")
    if not kept:
        raise SystemExit(f"{where}: no row has a 'text' (a transcript) to train on")
    return kept


def clip_seconds(row: dict, where: str = "the manifest") -> float:
    """Seconds of a row's audio from its header (fast); unreadable or empty audio of any kind (0 bytes, a cut header,
    not audio, a folder) stops the program with one line naming the manifest line and the file."""
    at = f"{where}:{row['line']}" if "line" in row else where
    try:
        info = sf.info(str(row["audio_path"]))
    except Exception as e:  # soundfile raises several types (LibsndfileError, RuntimeError, IsADirectoryError)
        why = "a folder" if Path(row["audio_path"]).is_dir() else str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SystemExit(f"{at}: audio {row['audio_path']} is not readable audio ({why}); regenerate it "
                         "(data_gen.py reruns what is missing or bad) or remove its line") from None
    if info.frames == 0:
        raise SystemExit(f"{at}: audio {row['audio_path']} is empty (0 samples); regenerate it or remove its line")
    return info.duration


def check_durations(rows: list[dict], max_seconds, mode: str = "refuse", where: str = "the manifest") -> list[dict]:
    """No clip is silently cut: rows whose audio (read from the WAV header) is longer than max_seconds (the
    model's audio window) stop the program with their count and the first offenders (mode "refuse"), are left
    out with a count ("drop"), or kept with a count: the encoder hears their first max_seconds ("cut", as
    VoiceBench's own harness does). max_seconds None: no limit. Every clip's header is read either way: an
    unreadable or empty one stops the program here, before any model loads (clip_seconds)."""
    seconds = [clip_seconds(r, where) for r in rows]
    if max_seconds is None:
        return rows
    long = [(r["id"], d) for r, d in zip(rows, seconds) if d > max_seconds + 1e-3]
    if long and mode == "refuse":
        first = ", ".join(f"{i} ({d:.1f} s)" for i, d in long[:3])
        raise SystemExit(f"{where}: {len(long)} of {len(rows)} clips are longer than the model's {max_seconds:g} s "
                         f"audio window (first: {first}); the encoder would cut them while the teacher reads the whole "
                         "transcript. Use --long_audio drop (leave them out) or cut (keep their first part), or "
                         "regenerate (data_gen.py --max-seconds)")
    if long:
        print(f"{where}: {len(long)} of {len(rows)} clips are longer than {max_seconds:g} s: "
              + ("dropped (--long_audio drop)" if mode == "drop"
                 else f"the encoder hears their first {max_seconds:g} s (--long_audio cut)"))
    return [r for r, d in zip(rows, seconds) if mode == "cut" or d <= max_seconds + 1e-3]


def load_audio(path, sampling_rate: int = SR) -> np.ndarray:
    """A clip as mono float32 at `sampling_rate` (resampled to 16 kHz if it is not); unreadable = one line naming it."""
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types
        raise SystemExit(f"{path}: cannot read audio ({e}); check the manifest's 'audio' field") from None
    if audio.size == 0 or not np.isfinite(audio).all():
        raise SystemExit(f"{path}: the clip is {'empty' if audio.size == 0 else 'not finite (NaN or inf samples)'}; "
                         "regenerate it or remove its line from the manifest")
    audio = audio.mean(1)  # mono
    if sr != sampling_rate:
        if sampling_rate != SR:
            raise SystemExit(f"{path}: sample rate {sr}, model wants {sampling_rate}; resample the data")
        audio = to_16k(audio, sr)
    return audio
