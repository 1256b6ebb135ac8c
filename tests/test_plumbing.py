"""plumbing.py: checkpoints and exact resume, damaged checkpoints skipped, torchrun (gloo on CPU) with and
without FSDP equal to one process, SIGKILL at any moment. cord.py is launched as users launch it, in its own
processes; a tiny launcher runs cord.main once per argument list (one process start for several runs:
imports cost ~8 s per process here) and records each rank's pid.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cord
from cordkit import evaluation, plumbing
from conftest import run_main


def test_resume_reproduces_the_uninterrupted_run(tmp_path, speech_data, qwen2_audio_dir):
    common = ("--objective", "cord", "--save_every", "1", "--seed", "3")
    full = run_main(tmp_path / "a", qwen2_audio_dir, speech_data, *common, steps=3)
    run_main(tmp_path / "b", qwen2_audio_dir, speech_data, *common, steps=1)
    shutil_target = tmp_path / "b/run/checkpoint-000001"
    assert (shutil_target / "model.safetensors").is_file() and not list((tmp_path / "b/run").glob(".tmp-*"))
    resumed = run_main(tmp_path / "b", qwen2_audio_dir, speech_data, *common, "--resume", "true", steps=3)
    a, b = cord.load_lalm(str(full)).model.state_dict(), cord.load_lalm(str(resumed)).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    la = [json.loads(l)["loss"] for l in open(tmp_path / "a/run/metrics.jsonl")]
    lb = [json.loads(l)["loss"] for l in open(tmp_path / "b/run/metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-5)


def test_corrupted_checkpoint_is_skipped(tmp_path, capsys):
    good, bad = tmp_path / "checkpoint-000002", tmp_path / "checkpoint-000004"
    for d in (good, bad):
        d.mkdir()
    (good / "state.json").write_text('{"step": 2}')
    (good / "optimizer.pt").write_bytes(b"x"), (good / "model.safetensors").write_bytes(b"x")
    (bad / "state.json").write_text('{"st')  # a partial write
    assert plumbing.last_checkpoint(str(tmp_path)) == good
    assert "checkpoint-000004" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun, gloo on CPU) and crash safety

LAUNCHER = """import json, os, signal, sys
from pathlib import Path
import cord
from cordkit import plumbing
Path(sys.argv[1], "pid" + os.environ.get("RANK", "0")).write_text(str(os.getpid()))
kill_at = os.environ.get("KILL_BEFORE_PUBLISHING")  # die between a checkpoint's write and its rename
if kill_at:
    publish = plumbing.publish
    def dying(tmp, final):
        if final.name == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        publish(tmp, final)
    plumbing.publish = dying
for argv in json.loads(sys.argv[2]):
    cord.main(argv)
"""


def _argv(model_dir, manifest, output, *extra, steps=2, batch_size=2):
    return ["--model", str(model_dir), "--data", str(manifest), "--output", str(output), "--steps", str(steps),
            "--batch_size", str(batch_size), "--group_size", "2", "--max_new_tokens", "5", "--lr", "1e-3",
            "--chunk_size", "4", *extra]


def _torchrun(tmp_path, runs, nproc=2, env=None, name="launch"):
    """Start `torchrun --nproc_per_node nproc` on the launcher with the given cord.py argument lists."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher, pids = tmp_path / "launch.py", tmp_path / f"pids-{name}"
    launcher.write_text(LAUNCHER), pids.mkdir()
    root = Path(cord.__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(launcher), str(pids), json.dumps(runs)]
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, pids, tmp_path / f"{name}.log"


def _kill_ranks(pids):  # SIGKILL every rank (torchrun starts each in its own session)
    for pid in pids.iterdir():
        try:
            os.kill(int(pid.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(proc, log, pids, ok=True):
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        _kill_ranks(pids), proc.kill()
        raise
    assert (rc == 0) == ok, f"exit {rc}:\n{log.read_text()[-3000:]}"
    return log.read_text()


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "final/model.safetensors"))


def _logged(run_dir, key="loss"):
    return [json.loads(l)[key] for l in open(Path(run_dir) / "metrics.jsonl")]


def test_dist_two_processes_equal_one_process_on_the_global_batch(tmp_path, speech_data, qwen2_audio_dir):
    """torchrun x 2 with B = 2 each (gradients all-reduced; and --fsdp: FSDP2 shards) == one process with B = 4.

    Greedy rollouts make every row deterministic, so the two runs see the same rows: rank r takes prompts
    2r, 2r+1 of each global batch of 4. Every loss is a per-sequence mean, so the mean of the ranks'
    gradients is the single process's gradient.
    """
    greedy = ("--objective", "cord", "--reward_ref", "answer", "--temperature", "0", "--grpo_temperature", "0",
              "--ref_temperature", "0", "--seed", "1")
    ddp = _argv(qwen2_audio_dir, speech_data, tmp_path / "ddp", *greedy)
    fsdp = _argv(qwen2_audio_dir, speech_data, tmp_path / "fsdp", *greedy, "--fsdp", "true")
    proc, pids, log = _torchrun(tmp_path, [ddp, fsdp])
    cord.main(_argv(qwen2_audio_dir, speech_data, tmp_path / "one", *greedy, batch_size=4))  # meanwhile, here
    out = _finish(proc, log, pids)
    assert "global batch: 4 prompts per step = 2 per process x 2 process(es)" in out
    one, before = _weights(tmp_path / "one"), load_file(str(qwen2_audio_dir / "model.safetensors"))
    assert max((one[k] - before[k]).abs().max().item() for k in before) > 1e-3  # the steps did move the weights
    for run in ("ddp", "fsdp"):
        w = _weights(tmp_path / run)  # fsdp: gathered into the plain save_pretrained layout
        for k in one:
            torch.testing.assert_close(w[k], one[k], atol=5e-5, rtol=0, msg=f"{run}: {k}")
        assert _logged(tmp_path / run) == pytest.approx(_logged(tmp_path / "one"), rel=1e-3)  # rank 0 logs the mean
        # the norm of the synchronised gradient: a sum over ranks (not a mean) would double it; AdamW would not tell
        assert _logged(tmp_path / run, "grad_norm") == pytest.approx(_logged(tmp_path / "one", "grad_norm"), rel=1e-3)
        ckpt = tmp_path / run / "checkpoint-000002"
        assert len(torch.load(ckpt / "rng.pt", weights_only=True)) == 2  # one RNG state per rank
    model = cord.load_lalm(str(tmp_path / "fsdp/checkpoint-000002")).model  # plain transformers loads FSDP's
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


def _wait_for_lines(path, n, proc, log, timeout=240):
    t0 = time.time()
    while not (path.is_file() and len(path.read_text().splitlines()) >= n):
        assert proc.poll() is None, f"ended before {n} steps:\n{log.read_text()[-3000:]}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_dist_sigkill_at_any_moment_resumes_to_the_uninterrupted_run(tmp_path, speech_data, qwen2_audio_dir):
    """Two FSDP ranks sampling at tau = 1 / 1.5, killed with SIGKILL (a) mid-step, (b) inside a checkpoint
    write; a corrupted checkpoint is skipped; the resumed run ends on the uninterrupted run's weights
    and losses, so optimizer shards and each rank's RNG stream came back exactly."""
    run = tmp_path / "run"
    def argv(out):
        return _argv(qwen2_audio_dir, speech_data, out, "--fsdp", "true", "--save_every", "2", "--seed", "3", steps=4)
    args = argv(run)
    # (a) SIGKILL every rank as soon as step 3 is logged (checkpoint-000002 exists; step 4 is under way)
    proc, pids, log = _torchrun(tmp_path, [args], name="a")
    _wait_for_lines(run / "metrics.jsonl", 3, proc, log)
    _kill_ranks(pids)
    _finish(proc, log, pids, ok=False)
    assert (run / "checkpoint-000002/state.json").is_file()
    # (b) resume; rank 0 is killed (the launcher patches plumbing.publish) after writing checkpoint 4, before renaming
    kill = {"KILL_BEFORE_PUBLISHING": "checkpoint-000004"}
    proc, pids, log = _torchrun(tmp_path, [args + ["--resume", "true"]], env=kill, name="b")
    assert "resumed from" in _finish(proc, log, pids, ok=False)
    assert (run / ".tmp-checkpoint-000004/state.json").is_file() and not (run / "checkpoint-000004").exists()
    # a newer checkpoint with a truncated weights file must be skipped, with its name in the message
    bad = run / "checkpoint-000003"
    shutil.copytree(run / "checkpoint-000002", bad)
    state = json.loads((bad / "state.json").read_text())
    (bad / "state.json").write_text(json.dumps({**state, "step": 3}))
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    # (c) resume to the end; then, in the same processes, the uninterrupted run
    proc, pids, log = _torchrun(tmp_path, [args + ["--resume", "true"], argv(tmp_path / "ref")], name="c")
    out = _finish(proc, log, pids)
    assert "skipping" in out and "checkpoint-000003" in out and "model.safetensors" in out
    assert f"resumed from {run / 'checkpoint-000002'} at step 2" in out  # lost at most --save_every steps
    resumed, ref = _weights(run), _weights(tmp_path / "ref")
    for k in ref:
        torch.testing.assert_close(resumed[k], ref[k], atol=1e-6, rtol=0, msg=k)
    assert _logged(run) == pytest.approx(_logged(tmp_path / "ref"), rel=1e-6)  # 4 lines: the killed steps' dropped
    assert not list(run.glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------
# Never lose a run: the output folder, non-finite steps, checkpoint pruning


def test_an_output_holding_a_run_is_never_overwritten_by_accident(tmp_path, speech_data, qwen2_audio_dir):
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", steps=1)
    first = (tmp_path / "run/metrics.jsonl").read_text()
    with pytest.raises(SystemExit, match="holds a run .* --resume true .* --overwrite true"):
        run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", steps=1)  # the same command again
    assert (tmp_path / "run/metrics.jsonl").read_text() == first  # untouched
    with pytest.raises(SystemExit, match="no complete checkpoint in .*typo"):  # --resume with a mistyped --output
        cord.main(["--model", str(qwen2_audio_dir), "--data", str(speech_data), "--output", str(tmp_path / "typo"),
                   "--resume", "true"])
    (tmp_path / "run/notes.txt").write_text("mine")
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--overwrite", "true", "--save_every", "5",
             steps=2)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["checkpoint-000002", "final", "metrics.jsonl", "notes.txt"]  # the old checkpoint-000001 is gone
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 2


def test_prepare_output_unwritable_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="cannot write there"):
        plumbing.prepare_output(str(tmp_path / "file" / "run"), resume=False, overwrite=False)


def test_a_non_finite_step_is_never_applied_and_three_in_a_row_stop(tmp_path, speech_data, qwen2_audio_dir, monkeypatch,
                                                                     capsys):
    real, calls = cord.weighted_token_loss, []

    def poisoned(D, *a, **kw):  # step 1 (and with `always`, every step) gets a NaN loss
        calls.append(1)
        loss, m = real(D, *a, **kw)
        return (loss * float("nan") if len(calls) == 1 or always else loss), m

    always = False
    monkeypatch.setattr(cord, "weighted_token_loss", poisoned)
    final = run_main(tmp_path / "a", qwen2_audio_dir, speech_data, "--objective", "opd", "--save_every", "1", steps=2)
    start = load_file(str(qwen2_audio_dir / "model.safetensors"))
    after1, after2 = load_file(str(tmp_path / "a/run/checkpoint-000001/model.safetensors")), _weights(final.parent)
    assert all(torch.equal(after1[k], start[k]) for k in start)  # the NaN step changed nothing: nothing NaN saved
    assert any(not torch.equal(after2[k], start[k]) for k in start)
    assert all(torch.isfinite(v).all() for v in after2.values())
    err = capsys.readouterr().err
    assert "skipped a step with a non-finite loss" in err and "examples: q" in err  # names the batch's ids
    always = True
    with pytest.raises(SystemExit, match="3 steps in a row"):
        run_main(tmp_path / "b", qwen2_audio_dir, speech_data, "--objective", "opd", steps=5)
    assert len((tmp_path / "b/run/metrics.jsonl").read_text().splitlines()) == 2  # stopped at the third skip


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, speech_data, qwen2_audio_dir):
    limit = ("--save_every", "1", "--save_total_limit", "2")
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", *limit, steps=3)
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]


def test_log_evaluations_measures_each_set_against_its_own_step_0(tmp_path):
    gaps = {("a", 0): 40.0, ("b", 0): 10.0, ("a", 5): 30.0, ("b", 5): 10.0}
    seen = []

    def fake_evaluate(rows, baseline):  # as cord.evaluate: gap reduction against the baseline given
        seen.append((rows, baseline and baseline["gap"]))
        gap = gaps[(rows, step)]
        return {"n": 1, "gap": gap, "gap_reduction": (baseline["gap"] - gap) / baseline["gap"] if baseline else None}

    for step in (0, 5):
        out = evaluation.log_evaluations(fake_evaluate, {"set-a": "a", "set-b": "b"}, str(tmp_path), step)
    assert seen == [("a", None), ("b", None), ("a", 40.0), ("b", 10.0)]  # step 5 is measured against each set's step 0
    assert [r["gap_reduction"] for r in out] == [0.25, 0.0]
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 4


def test_summarize_evaluations_tables_each_set_the_mean_gap_reduction_and_categories(tmp_path):
    """eval.jsonl -> eval.md: first vs last evaluation per set; the mean gap reduction over the speech sets only
    (computed here by hand: (40-10)/40 = 75 %, (10-5)/10 = 50 % -> 62.5 %); MMAU's accuracy by category; eval.png."""
    at = lambda step, name, n, text, audio, red=None, cats=None: {
        "step": step, "set": name, "n": n, "acc_text": text, "acc_audio": audio,
        "gap": None if text is None else text - audio,
        "gap_reduction": red, "acc_audio_by_category": cats}
    lines = [at(0, "data/mmsu/manifest.jsonl", 10, 80.0, 40.0), at(0, "data/gsm8k.jsonl", 5, 60.0, 50.0),
             at(0, "data/mmau/manifest.jsonl", 4, None, 50.0, cats={"music": 0.0, "sound": 100.0}),
             at(10, "data/mmsu/manifest.jsonl", 10, 80.0, 70.0, 0.75), at(10, "data/gsm8k.jsonl", 5, 60.0, 55.0, 0.5),
             at(10, "data/mmau/manifest.jsonl", 4, None, 75.0, cats={"music": 50.0, "sound": 100.0})]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    md = evaluation.summarize_evaluations(str(tmp_path))
    assert "| mmsu | 10 | 80.0 → 80.0 | 40.0 → 70.0 | 40.0 → 10.0 | 75.0 % |" in md
    assert "| gsm8k | 5 | 60.0 → 60.0 | 50.0 → 55.0 | 10.0 → 5.0 | 50.0 % |" in md
    assert "| mmau | 4 | n/a → n/a | 50.0 → 75.0 | n/a → n/a | n/a |" in md
    assert "over 2 of 2 speech set(s) (those with a gap at step 0): 62.5 %" in md
    assert "| mmau | music | 0.0 → 50.0 |" in md and "| mmau | sound | 100.0 → 100.0 |" in md
    assert (tmp_path / "eval.md").read_text() == md and (tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_report_to_tensorboard_writes_event_files_and_a_resumed_run_replaces_later_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = plumbing.MetricsLog(str(tmp_path), 0, "tensorboard")
    for step in (1, 2, 3):
        log.log({"loss": 0.5 * step, "step": step, "note": "text is not a scalar"}, step)
    log.log({"acc_audio": 40.0, "acc_text": None, "acc_audio_by_category": {"sound": 25.0}}, 3, prefix="eval/mmau")
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 1.0), (3, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/mmau/acc_audio_by_category/sound")] == [(3, 25.0)]
    assert "eval/mmau/acc_text" not in events.Tags()["scalars"] and "train/note" not in events.Tags()["scalars"]
    log = plumbing.MetricsLog(str(tmp_path), 2, "tensorboard")  # resumed from checkpoint 2: step 3 is done again
    log.log({"loss": 9.0, "step": 3}, 3)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 1.0), (3, 9.0)]
    assert events.Scalars("eval/mmau/acc_audio") == []  # purged with step 3 (the resumed run evaluates again)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in lines] == [0.5, 1.0, 9.0]
