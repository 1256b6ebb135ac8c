"""Reliability, round two (issue 26): one writer per folder, only our own files deleted, stale audio re-voiced,
resume means the same run, and one line (never a traceback) for unreadable audio, non-UTF-8 manifests, a full disk,
Ctrl-C, damaged or pickled checkpoints and a damaged shipped model. Each test failed before its fix.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import cord
import data_gen
from conftest import run_main
from cordkit import manifest, plumbing
from cordkit.runlock import FolderLock

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from cordkit.runlock import FolderLock; FolderLock(sys.argv[1], sys.argv[2]).acquire(); "
        "print('held', flush=True); time.sleep(600)")


def hold_lock(folder, program="cord.py") -> subprocess.Popen:
    """Another process holding `folder`'s lock (as a second `python cord.py` would), until killed."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), program], cwd=ROOT, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


# ----------------------------------------------------------------------------------------------
# 1. One writer per folder


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(SystemExit, match=rf"run is in use by cord.py \(pid {holder.pid} on .*\); wait until it"):
            FolderLock(tmp_path / "run").acquire()
    finally:
        holder.send_signal(signal.SIGKILL), holder.wait()  # dies holding it: the lock file stays, the flock goes
    assert (tmp_path / "run/.lock").is_file()
    with FolderLock(tmp_path / "run"):
        assert json.loads((tmp_path / "run/.lock").read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by cord.py (pid {holder.pid}" in capsys.readouterr().err
    assert not (tmp_path / "run/.lock").exists()  # released


def test_cord_and_data_gen_refuse_a_folder_another_run_writes(tmp_path, speech_data, qwen2_audio_dir):
    holder = hold_lock(tmp_path / "run")
    try:
        with pytest.raises(SystemExit, match=f"in use by cord.py \\(pid {holder.pid}"):
            run_main(tmp_path, qwen2_audio_dir, speech_data, "--overwrite", "true", steps=1)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing written or deleted
    finally:
        holder.kill(), holder.wait()
    holder = hold_lock(tmp_path / "data", "data_gen.py")
    try:
        with pytest.raises(SystemExit, match=f"in use by data_gen.py \\(pid {holder.pid}"):
            data_gen.main(["--n", "2", "--out", str(tmp_path / "data")])
    finally:
        holder.kill(), holder.wait()


def test_an_empty_output_is_refused(tmp_path, speech_data, qwen2_audio_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # before: the run went into the current folder
    common = ["--model", str(qwen2_audio_dir), "--data", str(speech_data), "--output", ""]
    for argv in (common + ["--steps", "1"], common + ["--eval", "true"]):
        with pytest.raises(SystemExit, match="--output is empty"):
            cord.main(argv)
    with pytest.raises(SystemExit, match="--out is empty"):
        data_gen.main(["--n", "2", "--out", ""])
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------
# 2. Only the run's own files are deleted; --eval never replaces its baseline


def test_rotation_overwrite_and_resume_touch_only_our_own_checkpoints(tmp_path, speech_data, qwen2_audio_dir, capsys):
    run = tmp_path / "run"
    common = ("--objective", "opd", "--save_every", "1", "--save_total_limit", "1")
    run_main(tmp_path, qwen2_audio_dir, speech_data, *common, steps=2)
    shutil.copytree(run / "checkpoint-000002", run / "checkpoint-000002-best")  # the user's backup copy
    (run / "checkpoint-list.txt").write_text("mine")
    capsys.readouterr()
    run_main(tmp_path, qwen2_audio_dir, speech_data, *common, "--resume", "true", steps=3)
    assert f"resumed from {run / 'checkpoint-000002'} at step 2" in capsys.readouterr().out  # not from the copy
    names = sorted(p.name for p in run.glob("checkpoint-*"))
    assert names == ["checkpoint-000002-best", "checkpoint-000003", "checkpoint-list.txt"]  # rotation: ours only
    run_main(tmp_path, qwen2_audio_dir, speech_data, *common, "--overwrite", "true", steps=1)
    names = sorted(p.name for p in run.glob("checkpoint-*"))
    assert names == ["checkpoint-000001", "checkpoint-000002-best", "checkpoint-list.txt"]


def test_eval_refuses_to_replace_its_baseline_or_an_earlier_eval(tmp_path, speech_data, qwen2_audio_dir):
    def evaluate(*extra):
        return cord.main(["--eval", "true", "--model", str(qwen2_audio_dir), "--data", str(speech_data),
                          "--max_new_tokens", "4", "--eval_limit", "2", *extra])

    base = tmp_path / "base"
    evaluate("--output", str(base))
    summary = (base / "summary.json").read_text()
    for extra in ((), ("--overwrite", "true")):  # replacing the file it reads is refused even with --overwrite
        with pytest.raises(SystemExit, match="holds the --baseline .* that this evaluation reads"):
            evaluate("--output", str(base), "--baseline", str(base / "summary.json"), *extra)
    with pytest.raises(SystemExit, match=r"holds an earlier evaluation \(summary.json, items.jsonl\).*--overwrite"):
        evaluate("--output", str(base))
    assert (base / "summary.json").read_text() == summary
    evaluate("--output", str(base), "--overwrite", "true")  # asked for: replaced
    evaluate("--output", str(tmp_path / "after"), "--baseline", str(base / "summary.json"))


# ----------------------------------------------------------------------------------------------
# 3. Data that can no longer be trusted is redone


def fake_tts(calls):
    def synthesize(text, voice="hibari", seed=None):  # a tone as long as plausible speech of `text`
        calls.append(text)
        t = np.arange(int(16000 * 0.35 * max(2, len(text.split())))) / 16000
        return (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000
    return synthesize


def test_a_rerun_revoices_clips_whose_text_changed_and_says_how_many(tmp_path, monkeypatch, capsys):
    calls, out = [], tmp_path / "data"
    monkeypatch.setattr(data_gen, "synthesize", fake_tts(calls))
    exs = [{"id": "p1", "text": "What is two plus three?", "answer": "5", "source": "t"},
           {"id": "p2", "text": "What is six plus one?", "answer": "7", "source": "t"}]
    data_gen.write_manifest(exs, out, workers=1)
    calls.clear()
    exs[0] = dict(exs[0], text="How many legs do nine spiders have?", answer="72")
    rows = data_gen.read_manifest(data_gen.write_manifest(exs, out, workers=1))
    assert [c for c in calls if c != "Check."] == ["How many legs do nine spiders have?"]  # before: nothing re-voiced
    assert "re-voicing 1 clips whose text, voice, augmentation or seed changed" in capsys.readouterr().out
    assert rows[0]["made_from"] == data_gen.made_from(exs[0], "hibari", None, 0) != rows[1]["made_from"]
    legacy = [{k: v for k, v in r.items() if k != "made_from"} for r in rows]  # a manifest from before the hash
    legacy[1]["text"] = "What is nine minus five?"
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in legacy))
    calls.clear()
    data_gen.write_manifest(exs, out, workers=1)
    assert [c for c in calls if c != "Check."] == ["What is six plus one?"]  # its text differs from its row's
    calls.clear()
    data_gen.write_manifest(exs, out, workers=1, seed=1)  # a new seed: every clip made again
    assert sorted(c for c in calls if c != "Check.") == sorted(ex["text"] for ex in exs)


def test_data_gen_refuses_an_out_holding_another_data_set(tmp_path, monkeypatch):
    calls, out = [], tmp_path / "data"
    monkeypatch.setattr(data_gen, "synthesize", fake_tts(calls))
    data_gen.write_manifest([{"id": "a1", "text": "What is two plus three?", "source": "builtin:add"}], out, workers=1)
    other = [{"id": "g1", "text": "Tom has three apples and buys two more.", "source": "jsonl:gsm8k.jsonl"}]
    with pytest.raises(ValueError, match="holds another data set .*builtin:add.*add --overwrite"):
        data_gen.write_manifest(other, out, workers=1)
    assert [r["id"] for r in data_gen.read_manifest(out / "manifest.jsonl")] == ["a1"]  # its rows kept
    rows = data_gen.read_manifest(data_gen.write_manifest(other, out, workers=1, overwrite=True))
    assert [r["id"] for r in rows] == ["g1"]
    with pytest.raises(SystemExit, match="^error: .*holds another data set"):  # the command: one line
        data_gen.main(["--n", "1", "--levels", "add", "--workers", "1", "--out", str(out)])


# ----------------------------------------------------------------------------------------------
# 4. Resume means the same run


def test_resume_with_other_experiment_flags_stops_with_a_one_line_diff(tmp_path, speech_data, qwen2_audio_dir,
                                                                       omni_dir):
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "cord", "--save_every", "1", steps=1)
    cases = [(("--objective", "opd"), r"--objective opd \(the checkpoint: cord\)"),
             (("--train", "lora"), r"--train lora \(the checkpoint: all\)"),
             (("--train", "audio", "--k", "5"), r"--train audio \(the checkpoint: all\), --k 5 \(the checkpoint: 20\)")]
    for extra, diff in cases:
        with pytest.raises(SystemExit, match=f"^--resume true: this run is not the one in .*checkpoint-000001: {diff}; "
                                             "resume with the checkpoint's flags"):
            run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "cord", "--resume", "true", *extra, steps=2)
    with pytest.raises(SystemExit, match=r"--model .*omni.* \(the checkpoint: .*qwen2_audio"):  # another model
        run_main(tmp_path, omni_dir, speech_data, "--objective", "cord", "--resume", "true", steps=2)


def test_resume_applies_a_changed_lr_and_says_so(tmp_path, speech_data, qwen2_audio_dir, monkeypatch, capsys):
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--save_every", "1", steps=1)  # --lr 1e-3
    seen, real = [], plumbing.start_or_resume
    monkeypatch.setattr(plumbing, "start_or_resume", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--resume", "true", "--lr", "0.01", steps=2)
    assert [g["lr"] for g in seen[0][1].param_groups] == [0.01]  # before: the checkpoint's 1e-3 came back
    assert "--lr 0.01 applied on resume (checkpoint-000001 had 0.001)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run/checkpoint-000002/state.json").read_text())["args"]
    assert saved["lr"] == 0.01


# ----------------------------------------------------------------------------------------------
# 5. One line, never a traceback


def _wav_bytes(tmp_path) -> bytes:
    sf.write(tmp_path / "ok.wav", np.zeros(1600, np.float32), 16000, subtype="PCM_16")
    return (tmp_path / "ok.wav").read_bytes()


@pytest.mark.parametrize("kind,what", [("empty_file", "not readable audio"), ("cut_header", "not readable audio"),
                                       ("text", "not readable audio"), ("folder", "a folder"),
                                       ("no_samples", "is empty")])
def test_unreadable_audio_of_any_kind_is_one_line_naming_the_manifest_line(tmp_path, kind, what):
    wav = tmp_path / "wavs/x.wav"
    wav.parent.mkdir()
    if kind == "folder":
        wav.mkdir()
    elif kind == "no_samples":
        sf.write(wav, np.zeros(0, np.float32), 16000, subtype="PCM_16")
    else:
        wav.write_bytes({"empty_file": b"", "cut_header": _wav_bytes(tmp_path)[:20], "text": b"not audio\n"}[kind])
    _wav_bytes(tmp_path)
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "audio": "ok.wav", "text": "hi"}\n{"id": "x", "audio": "wavs/x.wav", "text": "hi"}\n')
    rows = manifest.load_manifest(path)
    for window in (30.0, None):  # checked before the model loads, with or without an audio window
        with pytest.raises(SystemExit, match=rf"^{path}:2: audio .*x.wav .*{what}"):
            manifest.check_durations(rows, window, "refuse", str(path))


@pytest.mark.parametrize("encoding,line", [("latin-1", 2), ("utf-16", 1)])
def test_a_manifest_not_in_utf8_names_the_file_and_line(tmp_path, encoding, line):
    _wav_bytes(tmp_path)
    path = tmp_path / "m.jsonl"
    text = '{"id": "a", "audio": "ok.wav", "text": "cafe"}\n{"id": "b", "audio": "ok.wav", "text": "café"}\n'
    path.write_bytes(text.encode(encoding))
    with pytest.raises(SystemExit, match=rf"^{path}:{line}: not UTF-8 \(byte 0x.. at column \d+\); save the file as"):
        manifest.load_manifest(path)
    path.write_bytes(text.encode("utf-8-sig"))  # a byte-order mark is fine
    assert [r["id"] for r in manifest.load_manifest(path)] == ["a", "b"]


def _checkpoint_size(run: Path) -> int:
    return sum(f.stat().st_size for f in (run / "checkpoint-000001").rglob("*") if f.is_file())


@pytest.mark.parametrize("disk", ["tmpfs", "simulated"])
def test_a_full_disk_while_checkpointing_is_one_line_and_the_previous_checkpoint_resumes(
        tmp_path, speech_data, qwen2_audio_dir, monkeypatch, capsys, disk):
    """tmpfs: a real full disk, a tmpfs with room for one checkpoint (needs root to mount; skipped elsewhere).
    simulated: ENOSPC simulated by a torch.save that fails for the second checkpoint as PyTorch's writer does
    (RuntimeError 'file write failed'), on any machine."""
    common = ("--objective", "opd", "--save_every", "1")
    folder, mounted = tmp_path / "disk", False
    folder.mkdir()
    if disk == "tmpfs":
        run_main(tmp_path / "probe", qwen2_audio_dir, speech_data, *common, steps=1)
        size = int(_checkpoint_size(tmp_path / "probe/run") * 1.6) // 4096 * 4096
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                               capture_output=True)
        if mount.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip()}); the simulated case runs")
        mounted = True
    else:
        real = torch.save

        def full(obj, f, *a, **k):
            if "checkpoint-000002" in str(f):
                Path(f).write_bytes(b"\0" * 64)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                                   "file data/0: file write failed")
            return real(obj, f, *a, **k)
        monkeypatch.setattr(torch, "save", full)
    try:
        with pytest.raises(SystemExit, match=r"checkpoint-000002: could not be written \(disk full: \d+ MB free\); "
                                             r"nothing half-written is kept and checkpoint-000001 \(step 1\) stays: "
                                             r"free some space, then rerun with --resume true"):
            run_main(folder, qwen2_audio_dir, speech_data, *common, steps=3)
        run = folder / "run"
        assert not list(run.glob(".tmp-*")) and plumbing.last_checkpoint(run) == run / "checkpoint-000001"
        assert not (run / ".lock").exists()
        if mounted:  # make room, as the user would, then resume from the complete checkpoint
            shutil.copytree(run, tmp_path / "room" / "run")
            subprocess.run(["umount", "-l", str(folder)], check=True)  # -l: the stopped run's log may still be open
            mounted, folder = False, tmp_path / "room"
        monkeypatch.undo()
        capsys.readouterr()
        run_main(folder, qwen2_audio_dir, speech_data, *common, "--resume", "true", steps=2)
        assert "at step 1" in capsys.readouterr().out
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)])


def test_ctrl_c_during_training_is_one_line_keeps_nothing_half_written_and_resumes(
        tmp_path, speech_data, qwen2_audio_dir, monkeypatch, capsys):
    calls, real = [], cord.train_step

    def pressed_at_step_3(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(cord, "train_step", pressed_at_step_3)
    with pytest.raises(SystemExit, match=r"^interrupted \(Ctrl-C\); nothing half-written is kept; checkpoint-000002 is "
                                         r"the last complete checkpoint: rerun the same command with --resume true"):
        run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--save_every", "2", steps=4)
    real_save = torch.save

    def pressed_while_saving(obj, f, *a, **k):  # Ctrl-C in the middle of writing checkpoint-000004
        raise KeyboardInterrupt
    monkeypatch.setattr(cord, "train_step", real)
    monkeypatch.setattr(torch, "save", pressed_while_saving)
    with pytest.raises(SystemExit, match="checkpoint-000002 is the last complete checkpoint"):
        run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--save_every", "2", "--resume", "true",
                 steps=4)
    run = tmp_path / "run"
    assert not list(run.glob(".tmp-*")) and not (run / ".lock").exists()
    monkeypatch.setattr(torch, "save", real_save)
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--save_every", "2", "--resume", "true",
             steps=4)
    assert plumbing.last_checkpoint(run) == run / "checkpoint-000004"


def test_run_lock_turns_a_full_disk_or_ctrl_c_anywhere_into_one_line(tmp_path):
    """E.g. metrics.jsonl's write failing with ENOSPC, or Ctrl-C during --eval (nothing of a run in the folder)."""
    import errno

    with pytest.raises(SystemExit, match=r"^disk full while writing into .*; nothing half-written is kept; rerun"):
        with plumbing.RunLock(tmp_path / "a"):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(SystemExit, match=r"^interrupted \(Ctrl-C\); nothing half-written is kept; rerun the same "):
        with plumbing.RunLock(tmp_path / "b"):
            (tmp_path / "b/.tmp-final").mkdir()
            raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == []  # no lock, no half-written folder
    with pytest.raises(ValueError, match="other errors pass"):
        with plumbing.RunLock(tmp_path / "c"):
            raise ValueError("other errors pass")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_a_damaged_checkpoint_of_the_same_size_falls_back_to_the_previous_one(tmp_path, speech_data, qwen2_audio_dir,
                                                                               name, capsys):
    run = tmp_path / "run"
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--save_every", "1", steps=2)
    f = run / "checkpoint-000002" / name
    f.write_bytes(bytes(f.stat().st_size))  # same size, zeros: state.json's sizes still match
    capsys.readouterr()
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--save_every", "1", "--resume", "true",
             steps=3)
    out, err = capsys.readouterr()
    assert f"skipping {run / 'checkpoint-000002'}: {name} is damaged" in err and "falling back" in err
    assert f"resumed from {run / 'checkpoint-000001'} at step 1" in out


class Payload:  # what a pickle with code would rebuild
    def __reduce__(self):
        return (print, ("this ran",))


def test_a_pickle_in_optimizer_pt_is_refused_in_one_line(tmp_path, speech_data, qwen2_audio_dir, capsys):
    run = tmp_path / "run"
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--save_every", "1", steps=1)
    ckpt = run / "checkpoint-000001"
    torch.save({"state": {}, "param_groups": [], "x": Payload()}, ckpt / "optimizer.pt")
    state = json.loads((ckpt / "state.json").read_text())
    state["files"]["optimizer.pt"] = (ckpt / "optimizer.pt").stat().st_size  # as a careful attacker would
    (ckpt / "state.json").write_text(json.dumps(state))
    with pytest.raises(SystemExit, match=r"optimizer.pt: refused: it holds Python objects, not only tensors"):
        run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--resume", "true", steps=2)
    assert "this ran" not in capsys.readouterr().out


def test_mismatched_optimizer_state_in_a_checkpoint_is_one_line(tmp_path):
    two, one = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW([{"params": [two.weight]}, {"params": [two.bias]}])
    ckpt = tmp_path / "checkpoint-000001"
    ckpt.mkdir()
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    torch.save([{"cpu": torch.get_rng_state(), "cuda": None}], ckpt / "rng.pt")
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "world_size": 1, "args": {}}))
    with pytest.raises(SystemExit, match=r"optimizer.pt does not match this run's trainable parameters .*ValueError"):
        plumbing.load_training_state(one, torch.optim.AdamW(one.parameters()), ckpt, fsdp=False)


def test_a_damaged_shipped_model_is_refused_before_any_voicing(tmp_path, monkeypatch):
    from demo import tiny_lalm

    shipped = tmp_path / "tiny"
    shutil.copytree(tiny_lalm.SHIPPED, shipped)
    f = shipped / "model.safetensors"
    f.write_bytes(bytes(f.stat().st_size))
    monkeypatch.setattr(tiny_lalm, "make_data", lambda *a, **k: pytest.fail("voiced before checking the model"))
    with pytest.raises(SystemExit, match=rf"^{f}: damaged or unreadable .*restore it"):
        tiny_lalm.load_or_build(cache_dir=tmp_path / "cache", shipped=shipped)
