"""cordkit/chunked.py against cord.py's reference functions: the memory-bounded ones give the same values and gradients,
static_sample the same rollouts as cord.sample."""
import pytest
import torch

import cord
from conftest import rand_case
from cord import token_forward_kl, token_logprobs, token_reverse_kl
from cordkit.manifest import load_manifest
from cordkit import chunked
from cordkit.chunked import (cache_buckets, chunked_kl, chunked_logprobs, fused_kl_and_logprobs, sample_tokens,
                             static_sample, width_for_step)


@pytest.mark.parametrize("fn,reverse", [(token_reverse_kl, True), (token_forward_kl, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_kl_equals_unchunked_values_and_grads(fn, reverse, dtype):
    s, t, mask = rand_case(B=3, T=9, V=50, seed=1)
    s, t = s.to(dtype), t.to(dtype)
    grads = []
    for chunk in (None, 1, 4, 100):
        si = s.clone().requires_grad_(True)
        ti = t.clone().requires_grad_(True)
        D = fn(si, ti, mask) if chunk is None else chunked_kl(si, ti, chunk, reverse) * mask  # the reference first
        (D * torch.linspace(0.5, 2, 9)).sum().backward()
        assert ti.grad is None or ti.grad.abs().max() == 0  # no gradient reaches the teacher
        grads.append((D.detach(), si.grad.float()))
    for D, g in grads[1:]:
        torch.testing.assert_close(D, grads[0][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g, grads[0][1], atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


def test_chunked_kl_gradient_matches_finite_differences():
    s, t, mask = rand_case(B=1, T=2, V=5, seed=2)
    s = s.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: chunked_kl(x, t.double(), 1) * mask, (s,))


def test_chunked_logprobs_equal_unchunked():
    s, _, mask = rand_case(B=2, T=6, V=30, seed=7)
    y = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    out = []
    for chunk in (None, 1, 5):
        si = s.clone().requires_grad_(True)
        lp = token_logprobs(si, y) if chunk is None else chunked_logprobs(si, y, chunk)  # the reference first
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


# ----------------------------------------------------------------------------------------------
# static_sample: cord.sample over a static KV cache (the CUDA graph needs a GPU: the last test)


def test_sample_tokens_draws_like_multinomial_with_the_softmax_distribution():
    """Fixed logits, 20,000 rows: the same tokens as torch.multinomial for the same seed, frequencies within a
    chi-square bound (p = 1e-6) of softmax(logits / tau) and far outside it for a wrong tau; tau = 0 is argmax."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]).expand(20000, 6)  # token 5 suppressed
    tau = torch.full((20000, 1), 1.5)
    torch.manual_seed(0)
    y = sample_tokens(logits, tau)  # (20000,)
    torch.manual_seed(0)
    assert torch.equal(y, torch.multinomial(torch.softmax(logits / 1.5, -1), 1)[:, 0])
    counts = torch.bincount(y, minlength=6).double()
    assert counts[5] == 0
    chi2 = lambda p: (((counts[:5] - 20000 * p[:5]) ** 2) / (20000 * p[:5])).sum().item()  # 4 degrees of freedom
    assert chi2(torch.softmax(logits[0].double() / 1.5, -1)) < 30.9  # 30.9 = chi2.isf(1e-6, df=4)
    assert chi2(torch.softmax(logits[0].double() / 1.0, -1)) > 30.9 * 5  # the bound has the power to see tau
    assert (sample_tokens(logits[:3], torch.tensor([[0.0], [1e-9], [0.0]])) == 0).all()  # greedy rows


def fast(lalm, x, mask, n, tau, T, **kw):  # chunked.static_sample with cord.sample's arguments
    return static_sample(lalm.base.get_decoder(), lalm.base.get_output_embeddings(), x, mask, n, tau, T,
                         lalm.eos_ids, lalm.suppress_ids, lalm.tokenizer.pad_token_id, **kw)


def loaded(model_dir, manifest, eos_logit=0.0):  # lalm with a fresh untied head, 3 left-padded audio prompts, x_a
    """The tiny fixtures' greedy path repeats one token; a random untied head (scale 0.5) gives varied
    greedy paths. eos_logit: a bias added to EOS's logit."""
    lalm = cord.load_lalm(str(model_dir))
    lalm.model.eval()
    head = lalm.base.get_output_embeddings()
    torch.manual_seed(1)
    head.weight = torch.nn.Parameter(torch.randn_like(head.weight) * 0.5, requires_grad=False)
    head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]), requires_grad=False)
    head.bias[lalm.eos_ids[0]] = eos_logit
    P = cord.build_prompts(lalm, load_manifest(str(manifest))[:3], cord.Args.instruction)
    assert len(set(P["audio_mask"].sum(1).tolist())) > 1  # prompts of different lengths: left padding
    with torch.no_grad():
        return lalm, P, cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])


@pytest.mark.parametrize("family", ["qwen2_audio", "omni"])
def test_static_sampler_equals_eager_sampler_and_generate(family, speech_data, qwen2_audio_dir, omni_dir):
    """Temperatures 0, 1, 0, 1.5 per prompt: for the same seed cord.sample(fast="on") returns the eager sampler's
    tokens and mask (the sampled rows too); the greedy rows are generate's."""
    lalm, P, x = loaded(qwen2_audio_dir if family == "qwen2_audio" else omni_dir, speech_data)
    taus, T = [0.0, 1.0, 0.0, 1.5], 10
    torch.manual_seed(0)
    y_e, m_e = cord.sample(lalm, x, P["audio_mask"], 4, taus, T)  # (12, T)
    torch.manual_seed(0)
    y_f, m_f = cord.sample(lalm, x, P["audio_mask"], 4, taus, T, fast="on")  # -> chunked.static_sample
    assert torch.equal(y_f, y_e) and torch.equal(m_f, m_e)
    assert len({tuple(r) for r in y_f[0::4].tolist()} | {tuple(r) for r in y_f[1::4].tolist()}) > 2  # not one path
    ref = lalm.model.generate(input_ids=P["audio_ids"], attention_mask=P["audio_mask"], input_features=P["features"],
                              feature_attention_mask=P["feature_mask"], max_new_tokens=T, do_sample=False,
                              suppress_tokens=lalm.suppress_ids, eos_token_id=lalm.eos_ids,
                              pad_token_id=lalm.tokenizer.pad_token_id)
    ref = ref[:, P["audio_ids"].shape[1]:]  # (3, T)
    for b in range(3):
        for j in (0, 2):  # the greedy rows
            row = y_f[4 * b + j][m_f[4 * b + j]]
            assert row.tolist() == ref[b, :len(row)].tolist()


def test_static_sampler_eos_padding_suppression_and_length(speech_data, qwen2_audio_dir):
    """EOS made likely, the audio placeholder the most likely token: every row ends before T = 20; rows are
    padded after their EOS, the mask is True up to and including it, no suppressed token is drawn, and
    the output has the eager length and values whether done is read every token or every 16."""
    lalm, P, x = loaded(qwen2_audio_dir, speech_data, eos_logit=10.0)
    head, pad = lalm.base.get_output_embeddings(), lalm.tokenizer.pad_token_id
    head.weight[lalm.audio_token_id] = 50 * lalm.base.get_decoder().norm.weight
    outs = []
    for run in (lambda: cord.sample(lalm, x, P["audio_mask"], 5, 1.5, 20),
                lambda: fast(lalm, x, P["audio_mask"], 5, 1.5, 20),
                lambda: fast(lalm, x, P["audio_mask"], 5, 1.5, 20, check_every=1)):
        torch.manual_seed(3)
        outs.append(run())
    (y, m), T = outs[0], outs[0][0].shape[1]
    for y_f, m_f in outs[1:]:
        assert torch.equal(y_f, y) and torch.equal(m_f, m)
    lengths = m.sum(1)  # (15,)
    assert T < 16 and len(set(lengths.tolist())) > 2  # all ended, at different steps, before the first check
    assert torch.equal(m, torch.arange(T)[None] < lengths[:, None])  # True up to and including EOS
    assert (y[torch.arange(15), lengths - 1] == lalm.eos_ids[0]).all() and (y[~m] == pad).all()
    assert not torch.isin(y[m], torch.tensor(lalm.suppress_ids)).any()


def test_cache_buckets_give_every_step_the_narrowest_aligned_width_that_holds_it():
    """S = 30 prompt columns, T = 100 steps, 4 buckets: step i writes column 30 + i and must read it."""
    widths = cache_buckets(S=30, T=100, n=4)
    assert widths == [64, 80, 112, 144]  # S + 25, 50, 75, 100 rounded up to 16; 144 = L, the whole cache
    assert ([width_for_step(widths, 30, i) for i in (0, 33, 34, 49, 50, 81, 82, 99)]
            == [64, 64, 80, 80, 112, 112, 144, 144])
    assert cache_buckets(S=30, T=100, n=1) == [144]  # one bucket: every step reads all L columns (the old path)
    assert cache_buckets(S=30, T=5, n=8) == [32, 48]  # buckets narrower than 16 columns merge
    every = cache_buckets(S=30, T=100, n=100)  # a bucket per 16 columns: no step reads 16 columns past its own
    assert all(0 < width_for_step(every, 30, i) - (30 + i) <= 16 for i in range(100))


@pytest.mark.parametrize("family,buckets", [("qwen2_audio", 1), ("qwen2_audio", 3), ("qwen2_audio", 20), ("omni", 3)])
def test_static_sampler_reading_only_the_filled_cache_equals_eager(family, buckets, speech_data, qwen2_audio_dir,
                                                                   omni_dir, monkeypatch):
    """static_sample with the cache read in buckets returns cord.sample's tokens and mask (same seed, sampled and
    greedy rows), and each decode step's attention got only the columns of its bucket: > t, fewer than L unless the
    bucket is the last. The Omni thinker has grouped key/value heads (its mask goes through transformers' GQA path)."""
    lalm, P, x = loaded(qwen2_audio_dir if family == "qwen2_audio" else omni_dir, speech_data)
    taus, T, S = [0.0, 1.5], 20, x.shape[1]
    torch.manual_seed(0)
    y_e, m_e = cord.sample(lalm, x, P["audio_mask"], 2, taus, T)  # (6, T) the reference
    seen, update = [], chunked.StaticKV.update

    def spy(kv, *a, **k):  # (column written, columns returned) of each layer call
        K, V = update(kv, *a, **k)
        seen.append((int(kv.t), K.shape[2]))
        return K, V

    monkeypatch.setattr(chunked.StaticKV, "update", spy)
    torch.manual_seed(0)
    y_f, m_f = fast(lalm, x, P["audio_mask"], 2, taus, T, buckets=buckets)
    assert torch.equal(y_f, y_e) and torch.equal(m_f, m_e)
    widths = cache_buckets(S, T, buckets)
    assert all(w == width_for_step(widths, S, t - S) and w > t for t, w in seen)
    assert len({w for _, w in seen}) == len(widths)  # every bucket ran
    if buckets == 20:  # one bucket per 16 columns: never 16 unwritten columns read
        assert all(w - t <= 16 for t, w in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_sampler_matches_eager_on_gpu(speech_data, qwen2_audio_dir):
    """On CUDA the decode step is one captured graph: greedy rows equal the eager sampler's; sampled rows end,
    pad and avoid suppressed tokens like them (graph RNG: same distribution, other numbers)."""
    lalm, P, x = loaded(qwen2_audio_dir, speech_data, eos_logit=6.0)
    lalm.model.cuda()
    with torch.no_grad():
        x = cord.embed_prompts(lalm, P["audio_ids"].cuda(), P["features"].cuda(), P["feature_mask"].cuda())
    mask = P["audio_mask"].cuda()
    y_e, m_e = cord.sample(lalm, x, mask, 3, [0.0, 1.5, 0.0], 40)
    for buckets in (1, 4):  # one graph; a graph per cache width
        y_f, m_f = fast(lalm, x, mask, 3, [0.0, 1.5, 0.0], 40, graph=True, buckets=buckets)
        greedy = torch.tensor([0, 2, 3, 5, 6, 8], device="cuda")
        T = int(m_e[greedy].sum(1).max())
        assert torch.equal(y_f[greedy, :T], y_e[greedy, :T]) and torch.equal(m_f[greedy, :T], m_e[greedy, :T])
        assert (y_f[~m_f] == lalm.tokenizer.pad_token_id).all()
        assert not torch.isin(y_f[m_f], torch.tensor(lalm.suppress_ids, device="cuda")).any()
