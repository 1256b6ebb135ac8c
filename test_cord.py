"""cord.py, all on CPU: the loss math and the training loop (the other modules have their own test_*.py).

Three kinds (STYLE.md): (a) each loss against a slow, obviously correct loop; (b) hand-built
tensors with the expected value per row; (c) a few steps of the whole loop on tiny models of the
real architectures (Qwen2-Audio, Qwen2.5-Omni thinker) built locally with real speech.
"""
import importlib
import json
import math
import re
import runpy
import sys
import types
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import cord
import families
from conftest import QUESTIONS, rand_case, run_main
from cord import (
    Args,
    cord_token_loss,
    grpo_advantages,
    grpo_loss,
    importance_weights,
    position_weights,
    token_forward_kl,
    token_reverse_kl,
)
from data_gen import load_manifest
from judge import ModelJudge


# ----------------------------------------------------------------------------------------------
# (a) + (b): loss math against slow loops and hand tables


def slow_kl(p_logits, q_logits):  # KL(p || q) for one position, plain Python over the vocabulary
    p = torch.softmax(p_logits.double(), -1).tolist()
    q = torch.softmax(q_logits.double(), -1).tolist()
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def test_reverse_kl_matches_slow_loop_and_direction():
    s, t, mask = rand_case()
    D = token_reverse_kl(s, t, mask)
    for b in range(3):
        for i in range(7):
            want = slow_kl(s[b, i], t[b, i]) if mask[b, i] else 0.0  # KL(student || teacher), 0 on padding
            assert D[b, i].item() == pytest.approx(want, abs=1e-5)
    F = token_forward_kl(s, t, mask)
    assert F[0, 0].item() == pytest.approx(slow_kl(t[0, 0], s[0, 0]), abs=1e-5)
    assert not torch.allclose(D[mask], F[mask])  # the two directions differ: not the forward KL


def test_reverse_kl_hand_value_and_zero_for_identical():
    s = torch.tensor([[[0.0, 0.0]]])  # student (0.5, 0.5)
    t = torch.tensor([[[0.0, math.log(3.0)]]])  # teacher (0.25, 0.75)
    one = torch.ones(1, 1, dtype=torch.bool)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert token_reverse_kl(s, t, one).item() == pytest.approx(want, abs=1e-6)
    x, _, mask = rand_case()
    assert token_reverse_kl(x, x.clone(), mask).abs().max().item() < 1e-6


def test_importance_weights_hand_table():
    D = torch.tensor([
        [0.1, 0.9, 0.5, 0.3, 0.0],  # K=2: positions 1 (0.9) and 2 (0.5) get alpha
        [0.2, 0.1, 9.0, 9.0, 9.0],  # length 2 (padding holds large D): padding never selected, T <= K -> all alpha
        [0.7, 0.0, 0.0, 0.0, 0.0],  # length 1 -> alpha
    ])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]).bool()
    w = importance_weights(D, mask, k=2, alpha=2.0)
    assert w.tolist() == [[1, 2, 2, 1, 1], [2, 2, 0, 0, 0], [2, 0, 0, 0, 0]]
    assert importance_weights(D, mask, k=20, alpha=3.0).tolist() == (mask * 3.0).tolist()  # T <= K: alpha everywhere
    assert importance_weights(D, mask, k=torch.tensor([1, 1, 1])).tolist() == [[1, 2, 1, 1, 1], [2, 1, 0, 0, 0], [2, 0, 0, 0, 0]]


def test_importance_weights_vs_slow_loop():
    g = torch.Generator().manual_seed(3)
    D = torch.rand(6, 12, generator=g)
    lengths = [12, 11, 5, 3, 2, 1]
    mask = torch.arange(12)[None] < torch.tensor(lengths)[:, None]
    w = importance_weights(D, mask, k=4, alpha=2.5)
    for b, L in enumerate(lengths):
        top = sorted(range(L), key=lambda i: -D[b, i].item())[:4]
        assert w[b].tolist() == pytest.approx([2.5 if i in top else (1.0 if i < L else 0.0) for i in range(12)])


def test_position_weights_hand_table_and_slow_loop():
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    w = position_weights(mask, beta=2.0)
    torch.testing.assert_close(w, torch.tensor([
        [2.0, 1.75, 1.5, 1.25, 1.0],  # linear from beta to 1 over the sequence's own length
        [2.0, 1.5, 1.0, 0.0, 0.0],
        [2.0, 0.0, 0.0, 0.0, 0.0],  # one token: beta
    ]))
    for beta in (1.0, 3.0):
        w = position_weights(mask, beta)
        for b, L in enumerate([5, 3, 1]):
            for t in range(1, 6):  # the paper's 1-based t
                want = (beta - (beta - 1) * (t - 1) / (L - 1) if L > 1 else beta) if t <= L else 0.0
                assert w[b, t - 1].item() == pytest.approx(want)


def slow_cord_loss(s, t, mask, k, alpha, beta, normalize):
    per_seq = []
    for b in range(s.shape[0]):
        L = int(mask[b].sum())
        if L == 0:
            continue
        D = [slow_kl(s[b, i], t[b, i]) for i in range(L)]
        top = sorted(range(L), key=lambda i: -D[i])[:k]
        w = [(alpha if i in top else 1.0) * (beta - (beta - 1) * i / (L - 1) if L > 1 else beta) for i in range(L)]
        denom = sum(w) if normalize == "weights" else L
        per_seq.append(sum(wi * di for wi, di in zip(w, D)) / denom)
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("normalize", ["weights", "length"])
@pytest.mark.parametrize("k,alpha,beta", [(2, 2.0, 2.0), (20, 2.0, 2.0), (1, 2.5, 1.0), (3, 1.0, 1.0)])
def test_cord_token_loss_vs_slow_loop(normalize, k, alpha, beta):
    s, t, mask = rand_case(B=3, T=7, V=13, seed=4)
    loss, m = cord_token_loss(s, t, mask, k, alpha, beta, normalize, chunk_size=3)
    assert loss.item() == pytest.approx(slow_cord_loss(s, t, mask, k, alpha, beta, normalize), rel=1e-5)
    assert {"kl_mean", "kl_p50", "kl_p80", "kl_p95", "kl_top_share"} <= set(m)


def test_uniform_weights_are_exactly_eq3():
    s, t, mask = rand_case(seed=5)
    loss, _ = cord_token_loss(s, t, mask, k=2, alpha=1.0, beta=1.0)
    D = token_reverse_kl(s, t, mask)
    eq3 = torch.stack([D[b, mask[b]].mean() for b in range(3)]).mean()  # E_y[(1/T) sum_t D_t]
    assert loss.item() == pytest.approx(eq3.item(), rel=1e-6)


def test_grpo_advantages_vs_loop():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    for scale in ("none", "std"):
        A = grpo_advantages(r, 4, scale)
        for g in range(3):
            grp = r[4 * g:4 * g + 4].tolist()
            mean = sum(grp) / 4
            std = math.sqrt(sum((x - mean) ** 2 for x in grp) / 3)
            for i in range(4):
                want = grp[i] - mean if scale == "none" else (grp[i] - mean) / (std + 1e-4)
                assert A[4 * g + i].item() == pytest.approx(want, abs=1e-5)
    assert grpo_advantages(r, 4)[4:8].abs().max() == 0  # all-equal group: no gradient


def test_grpo_loss_vs_slow_loop_with_clipping():
    g = torch.Generator().manual_seed(6)
    logp = (torch.randn(4, 5, generator=g) * 0.3 - 1).requires_grad_(True)
    old = logp.detach() + torch.randn(4, 5, generator=g) * 0.3  # rho far from 1 -> clipping happens
    A = torch.tensor([1.0, -1.0, 0.5, 0.0])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]).bool()
    loss, m = grpo_loss(logp, old, A, mask, eps=0.2, group_size=2)
    want, clipped, n = 0.0, 0, 0
    for i in range(4):
        L = int(mask[i].sum())
        terms = []
        for t in range(L):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            terms.append(min(rho * A[i].item(), min(max(rho, 0.8), 1.2) * A[i].item()))
            clipped += (rho > 1.2 and A[i] > 0) or (rho < 0.8 and A[i] < 0)
            n += 1
        want -= sum(terms) / L / 4  # Eq. 10: per-sequence token mean, then mean over sequences
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert m["clip_frac"] == pytest.approx(clipped / n)
    assert m["zero_spread_frac"] == 0.0
    loss.backward()
    assert logp.grad[3].abs().sum() == 0  # A = 0: no gradient
    # rho = 1 (one update per batch): the gradient is the policy gradient of -A log pi
    logp.grad = None
    grpo_loss(logp, logp.detach(), A, mask)[0].backward()
    g1, logp.grad = logp.grad.clone(), None
    (-sum(A[i] * logp[i, mask[i]].mean() for i in range(4)) / 4).backward()
    torch.testing.assert_close(g1, logp.grad)


# ----------------------------------------------------------------------------------------------
# (c) the whole method on tiny models of the real architectures, with real speech (conftest.py)


def lalm_and_batch(model_dir, manifest, n=3):
    lalm = cord.load_lalm(str(model_dir))
    examples = load_manifest(str(manifest))[:n]
    return lalm, examples, cord.build_prompts(lalm, examples, Args.instruction)


@pytest.mark.parametrize("family", ["qwen2_audio", "omni"])
def test_aligned_completion_logits_equal_per_prefix_forward(family, speech_data, qwen2_audio_dir, omni_dir):
    """Both prompts' completion logits, aligned on the same tokens, equal the model's own forward
    on each prefix fed alone (no padding, the model's own audio merge and positions)."""
    lalm, examples, P = lalm_and_batch(qwen2_audio_dir if family == "qwen2_audio" else omni_dir, speech_data)
    lalm.model.eval()
    torch.manual_seed(0)
    x_a = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])
    y, m = cord.sample(lalm, x_a, P["audio_mask"], 1, 1.0, 6)  # (3, T), right-padded
    m[1, 3:] = False  # make one completion shorter
    with torch.no_grad():
        s = cord.completion_logits(lalm, x_a, P["audio_mask"], y, m)  # (3, T, V)
        t = cord.completion_logits(lalm, cord.embed_prompts(lalm, P["text_ids"]), P["text_mask"], y, m)
        for b in range(3):
            a_ids = P["audio_ids"][b, P["audio_mask"][b].bool()]
            t_ids = P["text_ids"][b, P["text_mask"][b].bool()]
            for i in range(int(m[b].sum())):
                ids = torch.cat([a_ids, y[b, :i]])[None]
                ref = lalm.model(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=P["features"][b:b + 1],
                                 feature_attention_mask=P["feature_mask"][b:b + 1]).logits[0, -1]
                torch.testing.assert_close(s[b, i], ref, atol=1e-4, rtol=1e-4)
                ids = torch.cat([t_ids, y[b, :i]])[None]
                torch.testing.assert_close(t[b, i], lalm.model(input_ids=ids).logits[0, -1], atol=1e-4, rtol=1e-4)


def test_greedy_sampler_equals_generate_and_suppresses_audio_tokens(speech_data, qwen2_audio_dir):
    lalm, examples, P = lalm_and_batch(qwen2_audio_dir, speech_data)
    lalm.model.eval()
    x_a = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])
    y, m = cord.sample(lalm, x_a, P["audio_mask"], 2, 0.0, 8)  # (6, T): 2 greedy copies per prompt
    ref = lalm.model.generate(input_ids=P["audio_ids"], attention_mask=P["audio_mask"], input_features=P["features"],
                              feature_attention_mask=P["feature_mask"], max_new_tokens=8, do_sample=False,
                              suppress_tokens=lalm.suppress_ids, eos_token_id=lalm.eos_ids, pad_token_id=lalm.tokenizer.pad_token_id)
    ref = ref[:, P["audio_ids"].shape[1]:]
    for b in range(3):
        for j in range(2):
            row = y[2 * b + j][m[2 * b + j]]
            assert row.tolist() == ref[b, :len(row)].tolist()
    # make the audio placeholder the most likely token: it must still never be sampled
    head = lalm.model.get_output_embeddings()
    with torch.no_grad():
        head.weight[lalm.audio_token_id] = head.weight.mean(0) * 0 + 50 * lalm.model.get_decoder().norm.weight
        y, m = cord.sample(lalm, x_a, P["audio_mask"], 4, 1.5, 8)
    assert not torch.isin(y[m], torch.tensor(lalm.suppress_ids)).any()


@pytest.mark.parametrize("objective", ["cord", "opd", "grpo", "opd+grpo", "sft", "fkl"])
def test_every_objective_trains_on_tiny_qwen2_audio(objective, tmp_path, speech_data, qwen2_audio_dir, monkeypatch):
    seen = {}
    real_hidden = cord.Teacher.hidden

    real_completion_hidden = cord.completion_hidden

    def inner(lalm, *a):  # what the teacher's forward sees
        seen["grad"], seen["training"] = torch.is_grad_enabled(), lalm.model.training
        return real_completion_hidden(lalm, *a)

    def spy(self, *a):  # the teacher pass runs without grad, in eval mode
        with monkeypatch.context() as mp:
            mp.setattr(cord, "completion_hidden", inner)
            out = real_hidden(self, *a)
        seen["requires_grad"] = out[0].requires_grad
        return out

    monkeypatch.setattr(cord.Teacher, "hidden", spy)
    before = cord.load_lalm(str(qwen2_audio_dir)).model.state_dict()
    final = run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", objective, "--train", "llm",
                     "--reward_ref", "answer" if objective == "grpo" else "text")
    after = cord.load_lalm(str(final)).model.state_dict()
    lines = [json.loads(l) for l in open(tmp_path / "run/metrics.jsonl")]
    assert len(lines) == 2 and all(math.isfinite(l["loss"]) for l in lines)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert all("audio_tower" not in k and "projector" not in k for k in changed)  # --train llm: audio frozen
    if objective != "grpo":  # GRPO alone may see only equal rewards (zero advantage) on an untrained model
        assert any("language_model" in k for k in changed)
    if objective in ("cord", "opd", "opd+grpo", "fkl"):
        assert seen == {"grad": False, "training": False, "requires_grad": False}
    if objective in ("cord", "grpo", "opd+grpo"):
        assert {"reward_mean", "clip_frac", "zero_spread_frac"} <= set(lines[-1])


def test_lora_with_frozen_teacher_and_model_judge(tmp_path, speech_data, qwen2_audio_dir, monkeypatch):
    """--train lora: only adapters train; --teacher frozen runs with the adapter disabled; --judge model
    asks the LALM's own text path (judge.ModelJudge) for the GRPO reward."""
    frozen_calls, judged = [], []
    real_hidden, real_call = cord.Teacher.hidden, ModelJudge.__call__

    def spy_hidden(self, *a):
        frozen_calls.append(self.mode == "frozen" and self.copy is None)
        return real_hidden(self, *a)

    def spy_judge(self, preds, refs):
        judged.append(len(preds))
        return real_call(self, preds, refs)

    monkeypatch.setattr(cord.Teacher, "hidden", spy_hidden)
    monkeypatch.setattr(ModelJudge, "__call__", spy_judge)
    final = run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "cord", "--train", "lora", "--lora_r", "4",
                     "--teacher", "frozen", "--judge", "model", steps=1)
    before = cord.load_lalm(str(qwen2_audio_dir)).model.state_dict()
    after = cord.load_lalm(str(final)).model.state_dict()  # adapters merged into the saved weights
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("language_model.model.layers" in k and "proj" in k for k in changed)
    assert frozen_calls == [True] and judged == [4]  # B = 2 prompts x N = 2 rollouts


def test_omni_thinker_trains_all_parameters(tmp_path, speech_data, omni_dir):
    final = run_main(tmp_path, omni_dir, speech_data, "--objective", "cord", "--train", "audio", steps=1)
    before = cord.load_lalm(str(omni_dir)).model.state_dict()
    after = cord.load_lalm(str(final)).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("audio_tower") for k in changed)


def test_one_audio_encoding_per_prompt_per_step(tmp_path, speech_data, qwen2_audio_dir, monkeypatch):
    clips = []
    real = families.qwen2_audio_features

    def counting(model, features, mask):
        clips.append(features.shape[0])
        return real(model, features, mask)

    monkeypatch.setitem(families.AUDIO_FAMILIES, "qwen2_audio", (families.AUDIO_FAMILIES["qwen2_audio"][0], counting))
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "cord", "--group_size", "4", steps=1)
    assert clips == [2]  # B = 2 prompts, one call, not B x (1 + N) rows


def test_eval_mode_writes_items_and_summary(tmp_path, speech_data, qwen2_audio_dir):
    s = cord.main(["--eval", "true", "--model", str(qwen2_audio_dir), "--data", str(speech_data), "--output", str(tmp_path),
                   "--max_new_tokens", "6"])
    assert {"acc_text", "acc_audio", "gap", "kl_p50", "kl_p80", "kl_p95", "kl_by_position", "top_kl_tokens"} <= set(s)
    items = [json.loads(l) for l in open(tmp_path / "items.jsonl")]
    assert len(items) == len(QUESTIONS) and json.loads((tmp_path / "summary.json").read_text())["n"] == len(QUESTIONS)


def test_model_without_audio_support_gets_a_clear_error(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="no audio adapter"):
        cord.load_lalm(str(tmp_path))


def test_cord_steps_pull_the_audio_path_towards_the_text_teacher(speech_data, qwen2_audio_dir, monkeypatch):
    """The learning effect, end to end: on fixed rollouts, CORD steps on the encoder + projector only
    (the text teacher cannot move) must shrink the token loss of Eq. 7 -- a sign or alignment error
    anywhere between the prompts and the optimizer would make it grow or stall."""
    torch.manual_seed(0)
    args = Args(model=str(qwen2_audio_dir), train="audio", lr=1e-3, batch_size=4, max_new_tokens=8, k=3, chunk_size=4)
    lalm = cord.load_lalm(args.model)
    params = cord.configure_trainable(lalm, args)
    opt = torch.optim.AdamW(params, lr=args.lr)
    first = {}
    real_sample = cord.sample

    def fixed_sample(*a, **kw):  # the same rollouts every step: only the loss surface is tested
        key = (tuple(a[1].shape), repr(a[4]))  # the audio rollouts vs the text reference y_hat
        if key not in first:
            first[key] = real_sample(*a, **kw)
        return first[key]

    monkeypatch.setattr(cord, "sample", fixed_sample)
    examples = load_manifest(str(speech_data))[:4]
    teacher, judge = cord.Teacher(lalm, "live"), cord.make_judge(args, lalm)
    losses = []
    for _ in range(12):
        _, m = cord.train_step(lalm, teacher, judge, examples, args)
        opt.step(), opt.zero_grad(set_to_none=True)
        losses.append(m["loss_tok"])
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------------------------
# The command line: `python cord.py` as users type it


CHOICE_FLAGS = [f.name for f in fields(cord.Args) if typing.get_origin(typing.get_type_hints(cord.Args)[f.name]) is typing.Literal]


@pytest.mark.parametrize("flag", CHOICE_FLAGS + ["compare_objectives", "no_such_flag"])
def test_a_bad_choice_or_unknown_flag_is_one_line_before_any_model_loads(flag, capsys):
    """A typo stops at parse time with one line naming the flag (the model path does not exist: loading it would
    fail with another message)."""
    with pytest.raises(SystemExit) as e:
        cord.main(["--model", "/no/such/model", f"--{flag}", "bogus"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and flag in err and "bogus" in err, err


def test_every_choice_option_is_typed():
    """Every string option whose value selects a branch is a Literal, so argparse knows its choices."""
    assert {"objective", "teacher", "train", "normalize", "opd_rollout", "adv_scale", "grpo_reduction", "reward_ref",
            "judge", "dtype"} <= set(CHOICE_FLAGS)


def test_python_cord_py_without_model_runs_the_demo_with_one_cord_module(monkeypatch):
    """`python cord.py` runs cord.py as __main__; demo.py's `import cord` must get that same module, not a
    second copy (whose Args, LALM, ... would be other classes)."""
    seen = {}
    fake_demo = types.ModuleType("demo")
    fake_demo.demo = lambda args: seen.update(cord=sys.modules["cord"], args=args)
    monkeypatch.delitem(sys.modules, "cord")
    monkeypatch.setitem(sys.modules, "demo", fake_demo)
    monkeypatch.setattr(sys, "argv", ["cord.py", "--steps", "3"])
    ran = runpy.run_path(cord.__file__, run_name="__main__")
    assert seen["cord"].main is ran["main"] and isinstance(seen["args"], ran["Args"]) and seen["args"].steps == 3


def test_every_function_in_the_readme_paper_table_exists():
    """The README's paper <-> code table names `file.py:function` (or Class.method); each must exist."""
    readme = (Path(cord.__file__).parent / "README.md").read_text()
    table = readme.split("## Paper ↔ code", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`(\w+)\.py:([\w.]+)`", table)
    assert len(named) >= 20
    for module, name in named:
        obj = importlib.import_module(module)
        for part in name.split("."):
            assert hasattr(obj, part), f"README names {module}.py:{name}, which does not exist"
            obj = getattr(obj, part)
