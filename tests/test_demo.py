"""demo/run.py: `python cord.py` without --model, end to end on a drastically reduced tiny LALM; --compare; its CLI."""
import json
import os
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
    # --compare: every run evaluated at step 0 and every --eval_every steps; measured points, mean ± std over seeds
    res = demo.compare(replace(args, eval_every=1, output=str(tmp_path / "cmp")), 2, ("opd", "cord"), "cmd", **build)
    assert set(res["runs"]) == {"opd-seed0", "cord-seed0", "opd-seed1", "cord-seed1"}
    assert [p["step"] for p in res["runs"]["cord-seed1"]] == [0, 1, 2]
    assert len({json.dumps(c[0]) for c in res["runs"].values()}) == 1  # step 0 is the same base model in every run
    text = (tmp_path / "cmp/results.md").read_text()
    assert "`cmd`" in text and "steps 0, 1, 2" in text and "| cord | " in text and "Wall time" in text
    assert (tmp_path / "cmp/curves.png").stat().st_size > 1000
    runs = sorted((tmp_path / "cmp").glob("*-seed*/curve.json"))
    mtimes = [r.stat().st_mtime for r in runs]
    demo.compare(replace(args, eval_every=1, output=str(tmp_path / "cmp")), 2, ("opd", "cord"), "cmd", **build)
    assert [r.stat().st_mtime for r in runs] == mtimes  # finished runs are kept, not rerun
    # a fresh clone: the model shipped in the repository (same settings) is what the demo trains, not a new build
    from demo import tiny_lalm
    tiny_lalm.ship(tmp_path / "tiny", tmp_path / "shipped")
    fresh = dict(build, cache_dir=tmp_path / "fresh", shipped=tmp_path / "shipped", demo_train=4)
    out = demo.demo(replace(args, output=str(tmp_path / "run-fresh"), steps=1, eval_every=1), **fresh)
    assert out["model"] == str(tmp_path / "shipped") and not (tmp_path / "fresh/model.safetensors").exists()
    lines = (tmp_path / "run-fresh/eval.jsonl").read_text().splitlines()  # --eval_every 1
    curve = [json.loads(line) for line in lines]
    assert [(r["step"], r["set"]) for r in curve] == [(0, "eval"), (1, "eval")]
    # python -m demo.run --leave-one-out: built without espeak (the same data, the LM above shared),
    # heard on espeak, CORD
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


def test_the_demo_cli_keeps_its_flags_and_hands_the_rest_to_cord(monkeypatch):
    """python -m demo.run --compare --seeds 2 --objectives opd,cord --seed 3 ...: the demo-only flags stay here
    (cord.Args has none of them), every other flag is cord.py's (--seed is not taken for --seeds)."""
    from dataclasses import fields

    assert not {"compare", "compare_seeds", "compare_objectives"} & {f.name for f in fields(Args)}
    seen = {}
    monkeypatch.setattr(demo, "compare", lambda args, seeds, objectives, command: seen.update(locals()))
    demo.main(["--compare", "--seeds", "2", "--objectives", "opd,cord", "--seed", "3", "--eval_every", "10"])
    assert seen["seeds"] == 2 and seen["objectives"] == ("opd", "cord")
    assert seen["args"].seed == 3 and seen["args"].eval_every == 10 and "--seeds 2" in seen["command"]
    monkeypatch.setattr(demo, "demo", lambda args: seen.update(plain=args))
    demo.main(["--steps", "5"])  # no demo flag: the plain demo, as `python cord.py --steps 5`
    assert seen["plain"].steps == 5


@pytest.mark.parametrize("argv, message", [(["--compare", "--objectives", "opd,bogus"], "bogus"),
                                           (["--compare", "--seeds", "0"], "--seeds"),
                                           (["--compare", "--no_such_flag", "1"], "no_such_flag")])
def test_a_bad_demo_flag_stops_before_any_model_loads(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("demo.tiny_lalm.load_or_build", lambda **kw: pytest.fail("refused before the build"))
    with pytest.raises(SystemExit) as e:
        demo.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_run_is_claimed_by_one_live_process(tmp_path):
    """Processes sharing a --compare command each claim the next run: not a finished one, not one a live process
    trains; a run whose owner died is taken over and started over."""
    run = tmp_path / "opd-seed0"
    assert demo.claim(run) and (run / "owner.pid").read_text() == str(os.getpid())
    (run / "owner.pid").write_text(str(os.getppid()))  # another live process (the test runner's parent)
    assert not demo.claim(run)
    (run / "owner.pid").write_text("999999999")  # no such process: it died
    (run / "half-done").write_text("x")
    assert demo.claim(run) and not (run / "half-done").exists()
    (run / "curve.json").write_text("[]")  # finished
    (run / "owner.pid").write_text("999999999")
    assert not demo.claim(run)
