"""Evaluation summaries and reports: cord.evaluate's items -> acc, gap, gap reduction, the official metric, Fig. 3's
token-KL statistics (summary.json); during training, eval.jsonl per step, eval.md (first vs last) and eval.png.

Standalone (never imports cord): cord.evaluate hands over plain items; log_evaluations gets `evaluate` as a function.
"""
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from benchmarks.official import official_summary
from cordkit.plumbing import MetricsLog, rank_world


def summarize(items: list[dict], rows: list[dict], token_kl: list, tokenizer, baseline: Optional[dict] = None,
              out_dir: Optional[str] = None) -> dict:
    """The evaluation protocol on scored items (one per manifest row: audio_correct, text_correct as True / False /
    None, category) -> acc_text, acc_audio (% right over the items scored on that side), gap = acc_text - acc_audio,
    gap reduction = (gap_base - gap) / gap_base, accuracy by category, the benchmark's own metric beside ours, and
    the KL statistics of `token_kl` ((D_t, y_t) per item). Written to out_dir/summary.json and items.jsonl.

    >>> items = [{"audio_correct": a, "text_correct": True, "category": None, "answer": "1"} for a in (True, False)]
    >>> s = summarize(items, [{}, {}], [], None, baseline={"gap": 100.0})
    >>> s["acc_text"], s["acc_audio"], s["gap"], s["gap_reduction"]
    (100.0, 50.0, 50.0, 0.5)
    """
    def acc(key, category=None):  # % right over the items scored on that side (of that category); None if none
        verdicts = [it[key] for it in items if it[key] is not None and category in (None, it["category"])]
        return 100.0 * sum(verdicts) / len(verdicts) if verdicts else None

    s = {"n": len(items), "n_scored": sum(it["answer"] is not None for it in items),
         "acc_text": acc("text_correct"), "acc_audio": acc("audio_correct")}
    scored = s["acc_text"] is not None and s["acc_audio"] is not None
    s["gap"] = s["acc_text"] - s["acc_audio"] if scored else None
    if scored and baseline and (baseline.get("gap") or 0) > 0:  # no gap to close at the baseline: no reduction
        s["gap_reduction"] = (baseline["gap"] - s["gap"]) / baseline["gap"]  # (gap_base - gap) / gap_base
    if any(it["category"] for it in items):  # e.g. MMAU: sound, music, speech
        categories = sorted({it["category"] for it in items if it["category"]})
        s["acc_audio_by_category"] = {c: acc("audio_correct", c) for c in categories}
    s.update(official_summary(rows, items))  # the benchmark's own metric; {} for other data
    if token_kl:
        for it, (d, _) in zip(items, token_kl):  # each item's mean D_t along its audio rollout
            it["kl_mean"] = d.mean().item() if len(d) else 0.0
        s.update(kl_statistics(token_kl, tokenizer))
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
        (Path(out_dir) / "summary.json").write_text(json.dumps(s, indent=1))
    return s


def kl_statistics(token_kl: list, tokenizer) -> dict:
    """The paper's Fig. 3 analysis of D_t over (D (T_i,), token ids) per audio rollout: quantiles, the mean by
    position and the position-KL correlation, the tokens of highest mean KL (each seen >= 5 times)."""
    D_pos, tok_kl = {}, {}  # position -> D values; token id -> D values
    for d, tokens in token_kl:
        for t, (v, tok) in enumerate(zip(d.tolist(), tokens)):
            D_pos.setdefault(t, []).append(v)
            tok_kl.setdefault(tok, []).append(v)
    D = torch.cat([d for d, _ in token_kl]) if D_pos else torch.zeros(1)  # (n tokens,)
    pos = np.array([float(t) for t in sorted(D_pos) for _ in D_pos[t]])  # (n tokens,)
    val = np.array([v for t in sorted(D_pos) for v in D_pos[t]])  # (n tokens,)
    s = {f"kl_p{q}": torch.quantile(D, q / 100).item() for q in (50, 80, 95)}
    s["kl_mean"] = D.mean().item()
    s["kl_by_position"] = [float(np.mean(D_pos[t])) for t in sorted(D_pos) if len(D_pos[t]) >= 5]
    varied = len(pos) > 2 and pos.std() > 0 and val.std() > 0  # else the correlation is undefined
    s["kl_position_corr"] = float(np.corrcoef(pos, val)[0, 1]) if varied else 0.0
    top = sorted(((np.mean(v), t) for t, v in tok_kl.items() if len(v) >= 5), reverse=True)[:15]
    s["top_kl_tokens"] = [[tokenizer.decode([t]), round(float(v), 4)] for v, t in top]
    return s


def log_evaluations(evaluate: Callable, sets: dict, output: str, step: int,
                    log: Optional[MetricsLog] = None) -> list[dict]:
    """Evaluate every set at `step` -> one JSON line per set in <output>/eval.jsonl, then eval.md and eval.png
    (rank 0 writes; every rank evaluates, as FSDP needs). evaluate(rows, baseline) -> summary; baseline = that set's
    step-0 line, for the gap reduction. Lines of this step or later (from a run resumed from an earlier checkpoint)
    are replaced."""
    path = Path(output) / "eval.jsonl"
    old = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    first = {r["set"]: r for r in old if r["step"] == 0}
    records = []
    for name, rows in sets.items():
        s = evaluate(rows, first.get(name))
        records.append({"step": step, "set": name, **{k: s.get(k) for k in EVAL_KEYS}})
    if rank_world()[0] == 0:
        path.write_text("".join(json.dumps(r) + "\n" for r in [r for r in old if r["step"] < step] + records))
        for r in records:
            print(json.dumps(r), file=sys.stderr)  # beside the progress bar
            if log:
                log.log({k: r[k] for k in EVAL_KEYS}, step, prefix=f"eval/{set_label(r['set'])}")
        summarize_evaluations(output)
    return records


EVAL_KEYS = ("n", "acc_text", "acc_audio", "gap", "gap_reduction", "acc_audio_by_category",  # ours (judge.score_row)
             "n_published", "official_metric", "official_acc_text", "official_acc_audio",  # the benchmark's own
             "official_no_letter_text", "official_no_letter_audio")


def set_label(path: str) -> str:  # data/mmsu/manifest.jsonl -> mmsu; data/gsm8k.jsonl -> gsm8k
    return Path(path).parent.name if Path(path).name == "manifest.jsonl" else Path(path).stem


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def summarize_evaluations(output: str) -> str:
    """<output>/eval.jsonl -> eval.md (returned) and eval.png: per set, step 0 vs the last evaluation.

    Speech sets (rows with a transcript) have acc_text, gap and the gap reduction against their own step 0;
    the mean gap reduction is taken over them, as the paper's. Audio-only sets (MMAU) have acc_audio only,
    and their accuracy by `category` (sound, music, speech) when the rows name one.
    """
    lines = [json.loads(line) for line in (Path(output) / "eval.jsonl").read_text().splitlines()]
    by_set = {}
    for r in lines:
        by_set.setdefault(r["set"], []).append(r)
    rows, reductions, categories, n_speech = [], [], [], 0
    for name, rs in by_set.items():
        a, b = rs[0], rs[-1]  # step 0 (or the first kept), the last
        red = b.get("gap_reduction")
        reductions += [red] if red is not None else []
        n_speech += b.get("gap") is not None
        rows.append(f"| {set_label(name)} | {b['n']} | {_pct(a['acc_text'])} → {_pct(b['acc_text'])} | "
                    f"{_pct(a['acc_audio'])} → {_pct(b['acc_audio'])} | {_pct(a['gap'])} → {_pct(b['gap'])} | "
                    f"{'n/a' if red is None else f'{100 * red:.1f} %'} |")
        for c, v in (b.get("acc_audio_by_category") or {}).items():
            before = (a.get("acc_audio_by_category") or {}).get(c)
            categories.append(f"| {set_label(name)} | {c} | {_pct(before)} → {_pct(v)} |")
    steps = sorted({r["step"] for r in lines})
    md = [f"Evaluation at steps {steps[0]} → {steps[-1]} (first → last); gap = acc_text - acc_audio; "
          "gap reduction = (gap_0 - gap) / gap_0.", "",
          "| set | n | acc_text | acc_audio | gap | gap reduction |", "|---|---|---|---|---|---|", *rows, ""]
    if n_speech:
        mean = f"{100 * np.mean(reductions):.1f} %" if reductions else "n/a"
        md += [f"Mean gap reduction over {len(reductions)} of {n_speech} speech set(s) (those with a gap at step 0): "
               f"{mean}", ""]
    md += official_table(by_set)
    if categories:
        md += ["| set | category | acc_audio |", "|---|---|---|", *categories, ""]
    text = "\n".join(md)
    (Path(output) / "eval.md").write_text(text)
    _plot_evaluations(by_set, Path(output) / "eval.png")
    return text


def official_table(by_set: dict) -> list[str]:
    """eval.md's lines for the sets a benchmark scores its own way: our accuracy / the official metric, first → last;
    n against the benchmark's published count; VoiceBench's no-letter responses (counted at 1/4 there).

    >>> r = dict(n=455, n_published=455, official_metric="voicebench_mcq", acc_text=60.0, official_acc_text=55.5,
    ...          acc_audio=50.0, official_acc_audio=47.0, official_no_letter_audio=12, official_no_letter_text=3)
    >>> official_table({"data/obqa/manifest.jsonl": [r]})[4]
    '| obqa | 455 of 455 | voicebench_mcq | 60.0 / 55.5 | 50.0 / 47.0 | 12 / 3 |'
    """
    rows = []
    for name, rs in by_set.items():
        a, b = rs[0], rs[-1]
        if not b.get("official_metric"):
            continue
        cells = []
        for side in ("text", "audio"):
            pairs = [f"{_pct(r.get(f'acc_{side}'))} / {_pct(r.get(f'official_acc_{side}'))}" for r in (a, b)]
            cells.append(pairs[1] if a is b else " → ".join(pairs))
        no_letter = [b.get(f"official_no_letter_{side}") for side in ("audio", "text")]
        letters = "–" if no_letter[0] is None else f"{no_letter[0]} / {no_letter[1]}"
        rows.append(f"| {set_label(name)} | {b['n']} of {b.get('n_published') or '?'} | {b['official_metric']} | "
                    f"{cells[0]} | {cells[1]} | {letters} |")
    if not rows:
        return []
    return ["Ours (judge.score_row) / the benchmark's own rule (benchmarks/official.py), first → last:", "",
            "| set | n of published | official metric | acc_text: ours / official | acc_audio: ours / official "
            "| no letter: audio / text |", "|---|---|---|---|---|---|", *rows, ""]


def _plot_evaluations(by_set: dict, path: Path) -> None:
    """One panel per set: acc_text, acc_audio and the gap against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_set), figsize=(4.5 * len(by_set), 3.5), squeeze=False)
    for ax, (name, rs) in zip(axes[0], by_set.items()):
        for key, style in (("acc_text", "-"), ("acc_audio", "-"), ("gap", "--")):
            points = [(r["step"], r[key]) for r in rs if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), style, marker=".", label=key)
        ax.set(title=set_label(name), xlabel="step", ylabel="%")
        ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
