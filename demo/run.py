"""The CPU demo, beside cord.py because it is not the paper: the tiny Qwen2-Audio that hears worse than it reads,
CORD closing the gap, the comparison of every objective over seeds, and the leave-one-voice-out table.

The paper's Tables 1 and 3 in miniature, on the model tiny_lalm.py builds (or the copy shipped in demo/tiny/).
Settings that differ from the paper's, for a 1.5 M-parameter model with ~20-token completions, are in DEMO;
each applies only where the flag was left at its default. train="audio" (encoder + projector): the tiny
language model barely holds the task, and training it too cost up to 9 points of text accuracy on one of
two builds (docs/demo.md).

    python cord.py                                       # build/load the tiny LALM, evaluate, CORD, evaluate
    python -m demo.run --compare --seeds 5 --eval_every 10 --threads 1   # every objective x 5 seeds: results.md
    python -m demo.run --leave-one-out                   # per TTS engine: built without it, heard by it, CORD

`python -m demo.run` takes its own flags (below) and hands every other flag to cord.py's parser
(`--threads`, `--eval_every`, `--steps`, `--output`, ...). Several processes given the same --compare command
share its runs (each claims the next unclaimed one), and the one that finishes last writes the table and plot.
"""
import fcntl
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

import cord
from cord import Args, evaluate, load_manifest, setup, train
from cordkit import plumbing

DEMO = dict(steps=60, batch_size=16, max_new_tokens=24, k=4, train="audio", eval_limit=500, save_every=20,
            output="runs/demo")  # its own folder: a real run in runs/cord is never touched
COMPARED = ("sft", "fkl", "grpo", "opd", "opd+grpo", "cord")  # the baselines first, the paper's objective last
CURVE_KEYS = ("acc_text", "acc_audio", "gap", "gap_reduction")


def demo_args(args: Args, **over) -> Args:
    from demo.tiny_lalm import INSTRUCTION

    paper = Args()
    changed = {k: v for k, v in DEMO.items() if getattr(args, k) == getattr(paper, k)}
    if args.instruction == paper.instruction:
        changed["instruction"] = INSTRUCTION
    return replace(args, **changed, **over)


def load_demo(args: Args, **build):
    """(args with the tiny model and its data, training rows, eval rows, build/load seconds)."""
    from demo.tiny_lalm import load_or_build

    clock = time.time()
    model, _, train_m, eval_m = load_or_build(seed=args.seed, **build)
    args = demo_args(args, model=model.name_or_path, data=str(train_m))  # the build, or the copy shipped in tiny/
    return args, load_manifest(args.data), load_manifest(str(eval_m))[: args.eval_limit], time.time() - clock


def demo(args: Args, **build):
    """python cord.py: build (or load) the tiny LALM, evaluate, train with CORD, evaluate, print the table.

    `build` goes to tiny_lalm.load_or_build (the tests use a drastically reduced budget)."""
    output = demo_args(args).output
    # before the build: a refused folder costs nothing; the demo's own folder starts over
    overwrite = args.overwrite or (output == DEMO["output"] and not args.resume)
    plumbing.prepare_output(output, args.resume, overwrite=overwrite)
    args, examples, ev, built = load_demo(args, **build)
    out = Path(args.output)
    lalm = setup(args)
    base = evaluate(lalm, ev, args, str(out / "eval-base"))
    clock = time.time()
    eval_sets = {"eval": ev} if args.eval_every else None  # --eval_every: eval.jsonl, eval.md during training
    train(lalm, examples, args, eval_sets)
    minutes = (time.time() - clock) / 60
    after = evaluate(lalm, ev, args, str(out / "eval-final"), base)
    n_params = sum(p.numel() for p in lalm.model.parameters()) / 1e6
    print(f"\ntiny LALM ({n_params:.1f} M params), {len(ev)} held-out spoken problems, {args.objective} for "
          f"{args.steps} steps ({minutes:.1f} min; model build/load {built / 60:.1f} min)")
    print(f"{'':10}{'text acc':>10}{'audio acc':>11}{'gap':>8}")
    for name, s in (("before", base), ("after", after)):
        print(f"{name:10}{s['acc_text']:10.1f}{s['acc_audio']:11.1f}{s['gap']:8.1f}")
    red = after.get("gap_reduction")  # absent when the base model has no gap to close
    red = "n/a (no gap before)" if red is None else f"{100 * red:.1f} %"
    print(f"gap reduction: {red}  (paper: 41.6 % Qwen2-Audio, 44.8 % Step-Audio2)")
    return {"before": base, "after": after, "minutes": minutes, "model": args.model}


# ---------------------------------------------------------------------------------------------
# The comparison: every objective x seeds on the same model, data and steps, each evaluated every --eval_every steps


@contextmanager
def locked(path: Path):
    """Hold an exclusive lock on `path` (flock) across processes."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: is it there?
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(run: Path) -> bool:
    """True when this process should train `run`: it is not finished (run/curve.json) and no live process is
    training it (run/owner.pid). A run left half-done by a process that died is started over."""
    run.parent.mkdir(parents=True, exist_ok=True)
    with locked(run.parent / ".claims.lock"):
        owner = run / "owner.pid"
        if (run / "curve.json").is_file():
            return False
        pid = int(owner.read_text() or 0) if owner.is_file() else 0
        if pid > 0 and alive(pid):
            return False
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        owner.write_text(str(os.getpid()))
        return True


def run_curve(args: Args, examples: list[dict], ev: list[dict], run: Path) -> list[dict]:
    """Train one objective and seed into `run`, evaluating `ev` at step 0 and every --eval_every steps (cord.train
    writes eval.jsonl); -> the measured points, saved last as run/curve.json (it marks the run finished)."""
    start = time.time()
    a = replace(args, output=str(run))
    train(setup(a), examples, a, eval_sets={"eval": ev})
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    curve = [dict(step=r["step"], **{k: r.get(k) for k in CURVE_KEYS}) for r in rows]
    timing = {"start": start, "end": time.time(), "load_avg": os.getloadavg()}  # load: how shared the CPUs were
    (run / "time.json").write_text(json.dumps(timing))
    (run / "curve.json").write_text(json.dumps(curve, indent=1))
    return curve


def compare(args: Args, seeds: int = 5, objectives=COMPARED, command: str = "", **build):
    """Every objective x seeds 0..seeds-1 on the same tiny LALM and data, each run evaluated at step 0 and every
    --eval_every steps (10 if not given) on the demo's eval set. Runs go seed by seed (if cut short, the finished
    seeds cover every objective); a finished run is kept. When all are finished: results.md (mean ± std over the
    seeds at the last step) and curves.png in --output (default runs/compare).
    -> {"runs": {"<objective>-seed<s>": curve}, "table": results.md}, or None while another process trains some."""
    if args.output == Args().output:
        args = replace(args, output="runs/compare")
    args, examples, ev, _ = load_demo(replace(args, eval_every=args.eval_every or 10), **build)
    out = Path(args.output)
    runs = [(obj, seed) for seed in range(seeds) for obj in objectives]
    for obj, seed in tqdm(runs, desc="compare", unit="run", dynamic_ncols=True):
        run = out / f"{obj}-seed{seed}"
        if claim(run):
            run_curve(replace(args, objective=obj, seed=seed), examples, ev, run)
    missing = [f"{obj}-seed{seed}" for obj, seed in runs if not (out / f"{obj}-seed{seed}/curve.json").is_file()]
    if missing:
        print(f"{len(missing)} runs are still training in another process ({', '.join(missing[:3])}, ...): the "
              "process that finishes last writes results.md (or run this command again when they are done)")
        return None
    curves = {(obj, seed): json.loads((out / f"{obj}-seed{seed}/curve.json").read_text()) for obj, seed in runs}
    times = {key: json.loads((out / f"{key[0]}-seed{key[1]}/time.json").read_text()) for key in runs}
    table = results_table(curves, times, objectives, seeds)
    text = results_text(table, curves, times, args, len(ev), seeds, command)
    (out / "results.md").write_text(text)
    print(text)
    plot_curves(curves, objectives, seeds, len(ev), out / "curves.png")
    return {"runs": {f"{obj}-seed{seed}": c for (obj, seed), c in curves.items()}, "table": table}


def mean_std(values, scale: float = 1.0) -> str:
    """'mean ± std' over seeds; std with n - 1 (the sample's), 0 for one seed."""
    v = scale * np.array(values, dtype=float)
    std = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.1f} ± {std:.1f}"


def results_table(curves: dict, times: dict, objectives, seeds: int) -> str:
    """The markdown table: the base model (step 0), then per objective mean ± std over seeds at the last step."""
    base = curves[(objectives[0], 0)][0]  # step 0: the shipped model, the same in every run
    rows = ["| objective | text acc | audio acc | gap | gap reduction | min / run |", "|---|---|---|---|---|---|",
            f"| base model (step 0) | {base['acc_text']:.1f} | {base['acc_audio']:.1f} | {base['gap']:.1f} | – | |"]
    for obj in objectives:
        last = [curves[(obj, s)][-1] for s in range(seeds)]
        cells = [mean_std([r[k] for r in last]) for k in ("acc_text", "acc_audio", "gap")]
        cells.append(mean_std([r["gap_reduction"] for r in last], 100) + " %")
        minutes = np.mean([(times[(obj, s)]["end"] - times[(obj, s)]["start"]) / 60 for s in range(seeds)])
        rows.append(f"| {obj} | {' | '.join(cells)} | {minutes:.1f} |")
    return "\n".join(rows)


def machine() -> str:
    import torch

    cpu = platform.machine()
    info = Path("/proc/cpuinfo")
    if info.is_file():
        names = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    python = platform.python_version()
    return f"{os.cpu_count()} CPUs ({cpu}), {platform.system()}, Python {python}, torch {torch.__version__}"


def results_text(table: str, curves: dict, times: dict, args: Args, n_eval: int, seeds: int, command: str) -> str:
    """results.md: what was run and measured, the table, the machine and the wall time."""
    steps = [p["step"] for p in next(iter(curves.values()))]
    same_base = len({json.dumps(c[0]) for c in curves.values()}) == 1
    start = min(t["start"] for t in times.values())
    end = max(t["end"] for t in times.values())
    process_min = sum(t["end"] - t["start"] for t in times.values()) / 60
    load = np.mean([t["load_avg"][1] for t in times.values()])  # 5-minute load average at the end of each run
    return (f"# The comparison on the tiny model\n\n`{command or 'python -m demo.run --compare'}`\n\n"
            f"{len(curves)} runs: {len(curves) // seeds} objectives x seeds 0-{seeds - 1}, {args.steps} steps of "
            f"{args.batch_size} prompts each (`--train {args.train}`, K = {args.k}, lr {args.lr}). Every run evaluated "
            f"greedily (audio and text) on the first {n_eval} held-out spoken problems at steps "
            f"{', '.join(map(str, steps))}; the table is at step {steps[-1]}: mean ± std over the seeds (std with "
            f"n - 1). Gap reduction = (gap_base - gap) / gap_base."
            f"{'' if same_base else ' NOTE: the step-0 evaluations differ between runs; the base row is the first.'}"
            f"\n\n{table}\n\n"
            f"Machine: {machine()}; {args.threads or 'default'} torch thread(s) per process.\n"
            f"Wall time: {(end - start) / 60:.1f} min from the first run's start to the last run's end "
            f"({process_min:.1f} process-minutes summed over the runs; mean 5-minute load average at the end of a "
            f"run {load:.1f}).\n")


def plot_curves(curves: dict, objectives, seeds: int, n_eval: int, path: Path):
    """Text accuracy, audio accuracy and gap vs step: a marker at every measured step (mean over the seeds, bars
    ± std), lines only between measured points; the objectives are nudged apart on x so the bars stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    steps = []
    for i, obj in enumerate(objectives):
        runs = [curves[(obj, s)] for s in range(seeds)]
        steps = [p["step"] for p in runs[0]]
        nudge = 0.4 * (i - (len(objectives) - 1) / 2)
        for ax, key in zip(axes, ("acc_text", "acc_audio", "gap")):
            y = np.array([[p[key] for p in c] for c in runs], dtype=float)  # (seeds, measured steps)
            std = y.std(0, ddof=1) if seeds > 1 else np.zeros(len(steps))
            ax.errorbar(np.array(steps) + nudge, y.mean(0), yerr=std, marker="o", ms=3.5, capsize=2.5, label=obj,
                        lw=2.2 if obj == "cord" else 1.0)
    for ax, title in zip(axes, ("text accuracy (%)", "audio accuracy (%)", "gap = text - audio (points)")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_xticks(steps)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"tiny Qwen2-Audio, {seeds} seeds: mean ± std (bars) measured at steps {', '.join(map(str, steps))} "
                 f"on {n_eval} held-out problems; lines join measured points", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Leave one voice out: does the tiny LALM hear a TTS engine it never heard in training, and does CORD help there?

def leave_one_out(args: Args, engines=("hibari", "piper", "espeak"), limit: int = 300, cache_dir=".cache/tiny_lalm",
                  shared_lm: bool = False, **build) -> list[dict]:
    """For each TTS engine: the tiny LALM built without it (tiny_lalm.load_or_build(holdout=engine): same voiced
    data, every stage trained without the engine's clips), evaluated greedily on its training voices ("in-voice":
    the eval questions voiced by the other engines) and on the never-heard engine ("held-out": the first `limit`
    eval questions voiced by it alone); then CORD with the demo's settings on its own training data, and both
    evaluated again. One row per (engine, set) in args.output/loo.json and loo.md; an engine whose
    no-<engine>/loo.json exists is read back, not rerun. shared_lm=True: reuse the full build's language model
    (it never hears) and skip stage 1; about half the build time, but with it hibari's and piper's left-out
    encoders never learned to reach it (dev audio 5-8 %; docs/demo.md)."""
    from demo.tiny_lalm import load_or_build

    root, rows = Path(args.output), []
    if shared_lm:
        load_or_build(cache_dir=cache_dir, seed=args.seed, **build)  # the full build: its language model is shared
    for e in engines:
        done = root / f"no-{e}" / "loo.json"
        if done.is_file():
            rows += json.loads(done.read_text())
            continue
        clock = time.time()
        model, _, train_m, eval_m = load_or_build(cache_dir=f"{cache_dir}-no-{e}", data_dir=f"{cache_dir}/data",
                                                  holdout=e, shared_lm=cache_dir if shared_lm else None,
                                                  seed=args.seed, **build)
        built = time.time() - clock
        a = replace(demo_args(args), model=model.name_or_path, data=str(train_m), output=str(root / f"no-{e}"))
        plumbing.prepare_output(a.output, False, overwrite=True)
        held_out = Path(eval_m).parents[1] / f"eval-{e}" / "manifest.jsonl"
        sets = {"in-voice": load_manifest(str(eval_m))[:limit], "held-out": load_manifest(str(held_out))[:limit]}
        lalm = setup(a)
        base = {k: evaluate(lalm, v, a, kl=False) for k, v in sets.items()}
        clock = time.time()
        train(lalm, load_manifest(a.data), a)
        minutes = (time.time() - clock) / 60
        after = {k: evaluate(lalm, v, a, None, base[k], kl=False) for k, v in sets.items()}
        mine = []
        for k in sets:
            b = base[k]
            mine.append(dict(engine=e, set=k, n=b["n"], acc_text=b["acc_text"], acc_audio=b["acc_audio"], gap=b["gap"],
                             cord_acc_audio=after[k]["acc_audio"], cord_gap=after[k]["gap"],
                             gap_reduction=after[k].get("gap_reduction"), build_minutes=built / 60,
                             cord_minutes=minutes))
        done.write_text(json.dumps(mine, indent=1))
        rows += mine
    lines = ["| engine left out | eval voices | n | text acc | audio acc | gap | audio after CORD | gap after | "
             "gap reduction |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        red = "–" if r["gap_reduction"] is None else f"{100 * r['gap_reduction']:.1f} %"
        what = f"{r['engine']} (never heard)" if r["set"] == "held-out" else "the other engines (trained on)"
        lines.append(f"| {r['engine']} | {what} | {r['n']} | {r['acc_text']:.1f} | {r['acc_audio']:.1f} | "
                     f"{r['gap']:.1f} | {r['cord_acc_audio']:.1f} | {r['cord_gap']:.1f} | {red} |")
    (root / "loo.json").write_text(json.dumps(rows, indent=1))
    (root / "loo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


# ---------------------------------------------------------------------------------------------
# The command line: the demo's own flags; every other flag goes to cord.py's parser


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m demo.run", allow_abbrev=False,  # --seed must reach cord, not --seeds
                                description="The CPU demo on the tiny LALM: the plain demo (as python cord.py), "
                                            "--compare, or --leave-one-out.",
                                epilog="Every other flag goes to cord.py (python cord.py --help): --threads, "
                                       "--eval_every, --steps, --output, --seed, ...")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--compare", action="store_true",
                      help="every objective x --seeds: results.md and curves.png in --output (default runs/compare)")
    what.add_argument("--leave-one-out", action="store_true",
                      help="per TTS engine: build without it, evaluate, CORD, evaluate (--output default runs/loo)")
    p.add_argument("--seeds", type=int, default=5, help="--compare: seeds per objective (0, 1, ..., n - 1)")
    p.add_argument("--objectives", default=",".join(COMPARED), help="--compare: objectives, comma-separated")
    p.add_argument("--engines", default="hibari,piper,espeak", help="--leave-one-out: engines to leave out")
    p.add_argument("--n-eval", type=int, default=300, help="--leave-one-out: eval items per set")
    p.add_argument("--shared-lm", action="store_true",
                   help="--leave-one-out: reuse the full build's language model (faster; see leave_one_out)")
    a, rest = p.parse_known_args(argv)
    objectives = tuple(a.objectives.split(","))
    bad = [o for o in objectives if o not in cord.OBJECTIVES]
    if bad:
        p.error(f"--objectives {a.objectives}: {', '.join(bad)} is not one of {', '.join(cord.OBJECTIVES)}")
    if a.seeds < 1:
        p.error(f"--seeds {a.seeds}: it must be >= 1")
    args = cord.parse_args(rest)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if a.compare:
        command = "python -m demo.run " + " ".join(sys.argv[1:] if argv is None else argv)
        return compare(args, a.seeds, objectives, command)
    if a.leave_one_out:
        output = "runs/loo" if args.output == Args().output else args.output
        return leave_one_out(replace(args, output=output), tuple(a.engines.split(",")), a.n_eval,
                             shared_lm=a.shared_lm)
    return demo(args)


if __name__ == "__main__":
    main()
