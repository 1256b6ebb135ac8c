"""The CPU demo: `python cord.py` without --model lands here: a tiny Qwen2-Audio that hears worse than it reads, CORD closing the gap, and --compare with its plots.

The paper's Tables 1 and 3 in miniature, on the model tiny_lalm.py builds (or loads from its cache).
Settings that differ from the paper's, for a 1.5 M-parameter model with ~20-token completions, are
in DEMO; each applies only where the flag was left at its default. train="audio" (encoder +
projector): the tiny language model barely holds the task, and training it too cost up to 9 points
of text accuracy on one of two builds (README, "The CPU demo").

    python cord.py                                 # build/load the tiny LALM, evaluate, CORD, evaluate
    python cord.py --compare true --eval_every 10  # every objective x 3 seeds: results.md, curves.png
"""
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import plumbing
from cord import Args, evaluate, load_manifest, setup, train


DEMO = dict(steps=60, batch_size=16, max_new_tokens=24, k=4, train="audio", eval_limit=500, save_every=20,
            output="runs/demo")  # its own folder: a real run in runs/cord is never touched


def demo_args(args: Args, **over) -> Args:
    from tiny_lalm import INSTRUCTION

    paper = Args()
    changed = {k: v for k, v in DEMO.items() if getattr(args, k) == getattr(paper, k)}
    if args.instruction == paper.instruction:
        changed["instruction"] = INSTRUCTION
    return replace(args, **changed, **over)


def train_with_curve(args: Args, examples, eval_examples, out: Path, base: dict) -> list[dict]:
    """Train in segments of --eval_every steps (resuming from the checkpoint) and evaluate after each."""
    lalm, curve = setup(args), [dict(step=0, **{k: base[k] for k in ("acc_text", "acc_audio", "gap")})]
    every = args.eval_every or args.steps
    for stop in range(every, args.steps + every, every):
        seg = replace(args, steps=min(stop, args.steps), resume=True, save_every=every)
        train(lalm, examples, seg)
        s = evaluate(lalm, eval_examples, seg, None, base, kl=False)
        curve.append(dict(step=seg.steps, **{k: s.get(k, float("nan")) for k in ("acc_text", "acc_audio", "gap", "gap_reduction")}))
        print(json.dumps({"objective": args.objective, "seed": args.seed, **curve[-1]}))
    (out / "curve.json").write_text(json.dumps(curve, indent=1))
    return curve


def demo(args: Args, **build):
    """python cord.py: build (or load) the tiny LALM, evaluate, train with CORD, evaluate, print the table.

    `build` goes to tiny_lalm.load_or_build (the tests use a drastically reduced budget)."""
    from tiny_lalm import load_or_build

    output = demo_args(args).output
    if not args.compare:  # before the build: a refused folder costs nothing; the demo's own folder starts over
        plumbing.prepare_output(output, args.resume, overwrite=args.overwrite or (output == DEMO["output"] and not args.resume))
    clock = time.time()
    model, _, train_m, eval_m = load_or_build(seed=args.seed, **build)
    args = demo_args(args, model=str(Path(train_m).parents[2]), data=str(train_m))
    built = time.time() - clock
    examples, ev = load_manifest(args.data), load_manifest(str(eval_m))[: args.eval_limit]
    out = Path(args.output)
    if args.compare:
        return compare(args, examples, ev)
    lalm = setup(args)
    base = evaluate(lalm, ev, args, str(out / "eval-base"))
    clock = time.time()
    train(lalm, examples, args)
    minutes = (time.time() - clock) / 60
    after = evaluate(lalm, ev, args, str(out / "eval-final"), base)
    print(f"\ntiny LALM ({sum(p.numel() for p in lalm.model.parameters()) / 1e6:.1f} M params), {len(ev)} held-out spoken problems,"
          f" {args.objective} for {args.steps} steps ({minutes:.1f} min; model build/load {built / 60:.1f} min)")
    print(f"{'':10}{'text acc':>10}{'audio acc':>11}{'gap':>8}")
    for name, s in (("before", base), ("after", after)):
        print(f"{name:10}{s['acc_text']:10.1f}{s['acc_audio']:11.1f}{s['gap']:8.1f}")
    print(f"gap reduction: {100 * after.get('gap_reduction', 0):.1f} %  (paper: 41.6 % Qwen2-Audio, 44.8 % Step-Audio2)")
    return {"before": base, "after": after, "minutes": minutes}


def compare(args: Args, examples, ev) -> dict:
    """Every --compare_objectives x --compare_seeds on the same tiny LALM and data: results.md, curves.png."""
    out = Path(args.output)
    base = evaluate(setup(args), ev, args, str(out / "eval-base"))
    results = {}
    for obj in args.compare_objectives.split(","):
        for seed in range(args.compare_seeds):
            run = out / f"{obj}-seed{seed}"
            if (run / "curve.json").is_file():  # resumable: finished runs are kept
                results[(obj, seed)] = json.loads((run / "curve.json").read_text())
                continue
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            results[(obj, seed)] = train_with_curve(replace(args, objective=obj, seed=seed, output=str(run)), examples, ev, run, base)
    rows = ["| objective | text acc | audio acc | gap | gap reduction |", "|---|---|---|---|---|",
            f"| base model | {base['acc_text']:.1f} | {base['acc_audio']:.1f} | {base['gap']:.1f} | – |"]
    for obj in args.compare_objectives.split(","):
        last = [results[(obj, s)][-1] for s in range(args.compare_seeds)]
        ms = lambda k, f=1.0: f"{f * np.mean([r[k] for r in last]):.1f} ± {f * np.std([r[k] for r in last]):.1f}"
        rows.append(f"| {obj} | {ms('acc_text')} | {ms('acc_audio')} | {ms('gap')} | {ms('gap_reduction', 100)} % |")
    table = "\n".join(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)
    plot_curves(results, args, out / "curves.png")
    return {"base": base, "runs": {f"{o}-seed{s}": c for (o, s), c in results.items()}}


def plot_curves(results: dict, args: Args, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for obj in args.compare_objectives.split(","):
        curves = [results[(obj, s)] for s in range(args.compare_seeds)]
        steps = [p["step"] for p in curves[0]]
        for ax, key in zip(axes, ("acc_text", "acc_audio", "gap")):
            y = np.array([[p[key] for p in c] for c in curves])
            ax.plot(steps, y.mean(0), label=obj, lw=2.5 if obj == "cord" else 1.2)
            ax.fill_between(steps, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.15)
    for ax, title in zip(axes, ("text accuracy (%)", "audio accuracy (%)", "gap = text - audio (points)")):
        ax.set_title(title), ax.set_xlabel("step"), ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"tiny Qwen2-Audio, {args.compare_seeds} seeds (mean ± std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
