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
