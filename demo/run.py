"""The CPU demo: `python cord.py` without --model lands here: a tiny Qwen2-Audio that hears worse than it reads, CORD closing the gap, and --compare with its plots.

The paper's Tables 1 and 3 in miniature, on the model tiny_lalm.py builds (or loads from its cache).
Settings that differ from the paper's, for a 1.5 M-parameter model with ~20-token completions, are
in DEMO; each applies only where the flag was left at its default. train="audio" (encoder +
projector): the tiny language model barely holds the task, and training it too cost up to 9 points
of text accuracy on one of two builds (README, "The CPU demo").

    python cord.py                                 # build/load the tiny LALM, evaluate, CORD, evaluate
    python cord.py --compare true --eval_every 10  # every objective x 3 seeds: results.md, curves.png
    python demo.py --leave-one-out                 # per TTS engine: built without it, heard by it, CORD: runs/loo/loo.md
"""
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cordkit import plumbing
from cord import Args, evaluate, load_manifest, setup, train


DEMO = dict(steps=60, batch_size=16, max_new_tokens=24, k=4, train="audio", eval_limit=500, save_every=20,
            output="runs/demo")  # its own folder: a real run in runs/cord is never touched


def demo_args(args: Args, **over) -> Args:
    from demo.tiny_lalm import INSTRUCTION

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
    from demo.tiny_lalm import load_or_build

    output = demo_args(args).output
    if not args.compare:  # before the build: a refused folder costs nothing; the demo's own folder starts over
        plumbing.prepare_output(output, args.resume, overwrite=args.overwrite or (output == DEMO["output"] and not args.resume))
    clock = time.time()
    model, _, train_m, eval_m = load_or_build(seed=args.seed, **build)
    args = demo_args(args, model=model.name_or_path, data=str(train_m))  # the build, or the copy shipped in tiny/
    built = time.time() - clock
    examples, ev = load_manifest(args.data), load_manifest(str(eval_m))[: args.eval_limit]
    out = Path(args.output)
    if args.compare:
        return compare(args, examples, ev)
    lalm = setup(args)
    base = evaluate(lalm, ev, args, str(out / "eval-base"))
    clock = time.time()
    train(lalm, examples, args, eval_sets={"eval": ev} if args.eval_every else None)  # --eval_every: eval.jsonl, eval.md
    minutes = (time.time() - clock) / 60
    after = evaluate(lalm, ev, args, str(out / "eval-final"), base)
    print(f"\ntiny LALM ({sum(p.numel() for p in lalm.model.parameters()) / 1e6:.1f} M params), {len(ev)} held-out spoken problems,"
          f" {args.objective} for {args.steps} steps ({minutes:.1f} min; model build/load {built / 60:.1f} min)")
    print(f"{'':10}{'text acc':>10}{'audio acc':>11}{'gap':>8}")
    for name, s in (("before", base), ("after", after)):
        print(f"{name:10}{s['acc_text']:10.1f}{s['acc_audio']:11.1f}{s['gap']:8.1f}")
    red = after.get("gap_reduction")  # absent when the base model has no gap to close
    print(f"gap reduction: {'n/a (no gap before)' if red is None else f'{100 * red:.1f} %'}  (paper: 41.6 % Qwen2-Audio, 44.8 % Step-Audio2)")
    return {"before": base, "after": after, "minutes": minutes, "model": args.model}


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


# ---------------------------------------------------------------------------------------------
# Leave one voice out: does the tiny LALM hear a TTS engine it never heard in training, and does CORD help there?

def leave_one_out(args: Args, engines=("hibari", "piper", "espeak"), limit: int = 300, cache_dir=".cache/tiny_lalm",
                  shared_lm: bool = False, **build) -> list[dict]:
    """For each TTS engine: the tiny LALM built without it (tiny_lalm.load_or_build(holdout=engine): same voiced data,
    every stage trained without the engine's clips),
    evaluated greedily on its training voices ("in-voice": the eval questions voiced by the other engines) and on the
    never-heard engine ("held-out": the first `limit` eval questions voiced by it alone); then CORD with the demo's
    settings on its own training data, and both evaluated again. One row per (engine, set) in
    args.output/loo.json and loo.md; an engine whose no-<engine>/loo.json exists is read back, not rerun.
    shared_lm=True: reuse the full build's language model (it never hears) and skip stage 1; about half the build
    time, but with it hibari's and piper's left-out encoders never learned to reach it (dev audio 5-8 %; README)."""
    from demo.tiny_lalm import load_or_build

    root, rows = Path(args.output), []
    if shared_lm:
        load_or_build(cache_dir=cache_dir, seed=args.seed, **build)    # the full build: its language model is shared
    for e in engines:
        done = root / f"no-{e}" / "loo.json"
        if done.is_file():
            rows += json.loads(done.read_text())
            continue
        clock = time.time()
        model, _, train_m, eval_m = load_or_build(cache_dir=f"{cache_dir}-no-{e}", data_dir=f"{cache_dir}/data", holdout=e,
                                                  shared_lm=cache_dir if shared_lm else None, seed=args.seed, **build)
        built = time.time() - clock
        a = replace(demo_args(args), model=model.name_or_path, data=str(train_m), output=str(root / f"no-{e}"))
        plumbing.prepare_output(a.output, False, overwrite=True)
        sets = {"in-voice": load_manifest(str(eval_m))[:limit],
                "held-out": load_manifest(str(Path(eval_m).parents[1] / f"eval-{e}" / "manifest.jsonl"))[:limit]}
        lalm = setup(a)
        base = {k: evaluate(lalm, v, a, kl=False) for k, v in sets.items()}
        clock = time.time()
        train(lalm, load_manifest(a.data), a)
        minutes = (time.time() - clock) / 60
        after = {k: evaluate(lalm, v, a, None, base[k], kl=False) for k, v in sets.items()}
        mine = [dict(engine=e, set=k, n=base[k]["n"], acc_text=base[k]["acc_text"], acc_audio=base[k]["acc_audio"],
                     gap=base[k]["gap"], cord_acc_audio=after[k]["acc_audio"], cord_gap=after[k]["gap"],
                     gap_reduction=after[k].get("gap_reduction"), build_minutes=built / 60, cord_minutes=minutes)
                for k in sets]
        done.write_text(json.dumps(mine, indent=1))
        rows += mine
    lines = ["| engine left out | eval voices | n | text acc | audio acc | gap | audio after CORD | gap after | gap reduction |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        red = "–" if r["gap_reduction"] is None else f"{100 * r['gap_reduction']:.1f} %"
        what = f"{r['engine']} (never heard)" if r["set"] == "held-out" else "the other engines (trained on)"
        lines.append(f"| {r['engine']} | {what} | {r['n']} | {r['acc_text']:.1f} | {r['acc_audio']:.1f} | {r['gap']:.1f} | "
                     f"{r['cord_acc_audio']:.1f} | {r['cord_gap']:.1f} | {red} |")
    (root / "loo.json").write_text(json.dumps(rows, indent=1))
    (root / "loo.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="The leave-one-voice-out table of the tiny LALM (README, \"The CPU demo\").")
    p.add_argument("--leave-one-out", action="store_true", required=True, help="build without each engine, evaluate, CORD, evaluate")
    p.add_argument("--engines", default="hibari,piper,espeak", help="engines to leave out, one build each")
    p.add_argument("--n-eval", type=int, default=300, help="eval items per set")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the builds and of CORD")
    p.add_argument("--output", default="runs/loo", help="one folder per engine left out, and loo.md")
    p.add_argument("--shared-lm", action="store_true", help="reuse the full build's language model (faster; see leave_one_out)")
    a = p.parse_args(argv)
    if a.threads:
        import torch
        torch.set_num_threads(a.threads)
    leave_one_out(Args(seed=a.seed, threads=a.threads, output=a.output), tuple(a.engines.split(",")), a.n_eval,
                  shared_lm=a.shared_lm)


if __name__ == "__main__":
    main()
