"""demo.py: `python cord.py` without --model, end to end on a drastically reduced tiny LALM, and --compare."""
import json
from dataclasses import replace

import pytest

from demo import run as demo
from cord import Args
from data_gen import read_manifest


def test_demo_default_path_smoke(tmp_path):
    """`python cord.py` with no --model: build the tiny LALM (drastically reduced), evaluate, train, evaluate."""
    build = dict(cache_dir=tmp_path / "tiny", n_train=6, n_eval=4, n_dev=3, takes=1, voices=("hibari", "espeak:en-us"),
                 n_engine_eval=3, d_audio=32, audio_layers=1, d_text=32, text_layers=1, ctc_steps=2, text_steps=3,
                 audio_max_steps=2, eval_every=1, target_audio=1.1, batch_size=4, workers=1)
    args = Args(output=str(tmp_path / "run"), steps=2, batch_size=2, group_size=2, max_new_tokens=6, save_every=1)
    out = demo.demo(args, **build)
    for key in ("acc_text", "acc_audio", "gap"):
        assert key in out["before"] and key in out["after"]
    assert "gap_reduction" in out["after"] or out["before"]["gap"] == 0
    assert (tmp_path / "run/final/model.safetensors").is_file() and (tmp_path / "run/eval-final/summary.json").is_file()
    args = replace(args, compare=True, compare_seeds=1, compare_objectives="opd,cord", eval_every=1, output=str(tmp_path / "cmp"))
    res = demo.demo(args, **build)
    assert set(res["runs"]) == {"opd-seed0", "cord-seed0"} and len(res["runs"]["cord-seed0"]) == 3  # step 0, 1, 2
    assert (tmp_path / "cmp/results.md").is_file() and (tmp_path / "cmp/curves.png").stat().st_size > 1000
    # a fresh clone: the model shipped in the repository (same settings) is what the demo trains, not a new build
    from demo import tiny_lalm
    tiny_lalm.ship(tmp_path / "tiny", tmp_path / "shipped")
    fresh = dict(build, cache_dir=tmp_path / "fresh", shipped=tmp_path / "shipped", demo_train=4)
    out = demo.demo(replace(args, compare=False, output=str(tmp_path / "run-fresh"), steps=1), **fresh)
    assert out["model"] == str(tmp_path / "shipped") and not (tmp_path / "fresh/model.safetensors").exists()
    curve = [json.loads(line) for line in (tmp_path / "run-fresh/eval.jsonl").read_text().splitlines()]  # --eval_every 1
    assert [(r["step"], r["set"]) for r in curve] == [(0, "eval"), (1, "eval")]
    # demo.py --leave-one-out: built without espeak (the same data, the LM above shared), heard on espeak, CORD
    build["cache_dir"] = str(build["cache_dir"])
    rows = demo.leave_one_out(replace(args, output=str(tmp_path / "loo")), engines=("espeak",), limit=3, shared_lm=True,
                             **build)
    assert [(r["engine"], r["set"], r["n"]) for r in rows] == [("espeak", "in-voice", 1), ("espeak", "held-out", 3)]
    train = read_manifest(tmp_path / "tiny/data/train-no-espeak/manifest.jsonl")
    assert train and all(r["voice"] == "hibari" for r in train)
    stats = json.loads((tmp_path / "tiny-no-espeak/tiny_lalm.json").read_text())
    assert stats["heldout"]["engine"] == "espeak" and stats["settings"]["shared_lm"] == str(tmp_path / "tiny")
    assert (tmp_path / "loo/loo.md").read_text().count("\n") == 4


def test_the_demo_never_overwrites_a_real_run(tmp_path, monkeypatch):
    """`python cord.py` writes to runs/demo (a real run's default is runs/cord); any other folder that holds a run
    is refused before the tiny model is even built."""
    assert demo.demo_args(Args()).output == "runs/demo" and Args().output == "runs/cord"
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text('{"step": 1}\n')
    monkeypatch.setattr("demo.tiny_lalm.load_or_build", lambda **kw: pytest.fail("refused before the build"))
    with pytest.raises(SystemExit, match="holds a run"):
        demo.demo(Args(output=str(tmp_path / "run")))
    assert (tmp_path / "run/metrics.jsonl").read_text() == '{"step": 1}\n'
