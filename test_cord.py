"""Tests for cord.py, judge.py, data_gen.py and tiny_lalm.py, all on CPU: `pytest -q test_cord.py`.

Three kinds (STYLE.md): (a) each loss against a slow, obviously correct loop; (b) hand-built
tensors with the expected value per row; (c) a few steps of the whole loop on tiny models of the
real architectures (Qwen2-Audio, Qwen2.5-Omni thinker) built locally with real speech.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import cord
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
