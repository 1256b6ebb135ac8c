"""kernels.py: the memory-bounded functions give the reference functions' values and gradients (cord.py's plain ones)."""
import pytest
import torch

from conftest import rand_case
from cord import token_forward_kl, token_logprobs, token_reverse_kl
from kernels import fused_kl_and_logprobs


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
        lp = token_logprobs(si, y, chunk)
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
            D, lp = fused_kl_and_logprobs(h1, ht, W1, y, mask, chunk_size=4)
        else:
            s = h1 @ W1.T
            D, lp = token_reverse_kl(s, ht @ W1.T, mask), token_logprobs(s, y)
        ((D + coef * lp) * mask).sum().backward()
        results.append((D.detach(), lp.detach(), h1.grad, W1.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
