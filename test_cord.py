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
import shutil
import sys
import types
import typing
import warnings
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import cord
from cordkit import families
from cordkit import chunked, evaluation, plumbing
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
from cordkit.manifest import load_manifest
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
    assert importance_weights(D, mask, k=torch.tensor([1, 1, 1])).tolist() == [[1, 2, 1, 1, 1], [2, 1, 0, 0, 0],
                                                                              [2, 0, 0, 0, 0]]


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
    loss, m = cord_token_loss(s, t, mask, k, alpha, beta, normalize)
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


def test_rewards_for_every_reference_mode_vs_a_slow_loop():
    """Eq. 8 with --reward_ref text | answer | both, against a per-row loop: text judges y_i against y_hat; answer
    against the ground truth; both needs the two; a row without a ground truth falls back to y_hat (answer: refused)."""
    same = lambda preds, refs: [float(p == r) for p, r in zip(preds, refs)]  # a judge: exact string match
    completions, refs, answers = ["5", "5", "3", "7"], ["5", "4", "3", "1"], ["5", "5", None, "1"]
    slow = {"text": [same([c], [r])[0] for c, r in zip(completions, refs)],
            "answer": [same([c], [a])[0] for c, a in zip(completions, answers[:2] + ["-"] + answers[3:])]}
    slow["both"] = [min(t, g) if a is not None else t for t, g, a in zip(slow["text"], slow["answer"], answers)]
    assert slow == {"text": [1, 0, 1, 0], "answer": [1, 1, 0, 0], "both": [1, 0, 1, 0]}
    for mode in ("text", "both"):
        assert cord.rewards_for((same, same), completions, refs, answers, mode).tolist() == slow[mode], mode
    with_answers = [a or "3" for a in answers]
    assert cord.rewards_for((same, same), completions, [None] * 4, with_answers, "answer").tolist() == [1, 1, 1, 0]
    with pytest.raises(SystemExit, match="--reward_ref answer: an example has no 'answer'"):
        cord.rewards_for((same, same), completions, [None] * 4, answers, "answer")


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


@pytest.mark.parametrize("fast, device, static", [("off", "cpu", False), ("auto", "cpu", False), ("on", "cpu", True),
                                                  ("auto", "cuda", True), ("off", "cuda", False)])
def test_sample_takes_the_static_path_exactly_when_asked(fast, device, static, speech_data, qwen2_audio_dir,
                                                         monkeypatch):
    """--compile_rollout: "on" always takes chunked.static_sample, "auto" only on CUDA, "off" never. Both paths give
    the same tokens on CPU (test_cordkit/chunked.py), so only which one ran tells a wrong dispatch; the CUDA case is
    faked (a prompt that says is_cuda), and the static path is a spy that returns fixed tokens."""
    lalm, _, P = lalm_and_batch(qwen2_audio_dir, speech_data, n=2)
    x = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"]).detach()
    calls = []
    monkeypatch.setattr(cord.chunked, "static_sample",
                        lambda *a: calls.append(a) or (torch.zeros(4, 1, dtype=torch.long),
                                                       torch.ones(4, 1, dtype=torch.bool)))
    if device == "cuda":
        # only sample's check sees CUDA
        x = type("CudaLike", (torch.Tensor,), {"is_cuda": property(lambda self: True)})(x)
        monkeypatch.setattr(cord.chunked, "static_supported", lambda decoder: decoder is lalm.base.get_decoder())
    y, m = cord.sample(lalm, x, P["audio_mask"], 2, 0.0, 3, fast=fast)
    assert len(calls) == static and (y.shape == (4, 1)) == static
    if static:  # the arguments the static path needs, in its order
        decoder, head, x_, mask, n, tau, T, eos, suppress, pad = calls[0]
        assert (decoder, head) == (lalm.base.get_decoder(), lalm.base.get_output_embeddings())
        assert x_ is x and mask is P["audio_mask"] and (n, tau, T) == (2, 0.0, 3)
        assert (eos, suppress) == (lalm.eos_ids, lalm.suppress_ids) and pad == lalm.tokenizer.pad_token_id


def test_sample_passes_the_kv_cache_under_the_name_the_installed_transformers_uses(speech_data, qwen2_audio_dir):
    """transformers 5.24 renamed past_key_values to cache; the old name still works there, with a FutureWarning, until
    it is removed. sample must use the installed version's name (CI runs 5.x and 4.57), so no FutureWarning."""
    lalm, _, P = lalm_and_batch(qwen2_audio_dir, speech_data, n=2)
    x = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"]).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        y, _ = cord.sample(lalm, x, P["audio_mask"], 2, 1.0, 4)
    assert y.shape[1] > 1  # the decode loop ran: the cache was passed back at least once


def test_each_sampled_token_was_drawn_from_the_state_the_training_forward_computes_for_it(speech_data, qwen2_audio_dir):
    """On-policy (departure 1): the hidden state the head read to draw y_t, one token at a time from the KV cache
    (n samples sharing one prefill), equals the one completion_hidden gives y_t in one forward over prompt + y, which
    is what the loss differentiates. A wrong decode position, mask or cache would draw from another distribution."""
    lalm, _, P = lalm_and_batch(qwen2_audio_dir, speech_data, n=3)
    lalm.model.eval()
    x = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"]).detach()
    mask = P["audio_mask"]
    assert (mask.sum(1) != mask.shape[1]).any()  # some prompt is padded
    seen = []
    hook = lalm.base.get_output_embeddings().register_forward_hook(
        lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    torch.manual_seed(0)
    y, m = cord.sample(lalm, x, mask, 2, 1.0, 8)
    hook.remove()
    assert len(seen) == y.shape[1] >= 4
    with torch.no_grad():
        h = cord.completion_hidden(lalm, x.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), y, m)  # (6, T, C)
    for t in range(y.shape[1]):
        torch.testing.assert_close(seen[t][m[:, t]], h[m[:, t], t], atol=1e-5, rtol=1e-4, msg=f"step {t}")


def test_greedy_sample_of_a_left_padded_batch_equals_each_prompt_alone(speech_data, qwen2_audio_dir):
    """The prefill's attention mask and positions: prompts of different lengths, left-padded into one batch, give
    each prompt the greedy completion it gets alone (no padding at all)."""
    lalm, _, P = lalm_and_batch(qwen2_audio_dir, speech_data, n=3)
    lalm.model.eval()
    x = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"]).detach()
    mask = P["audio_mask"]
    assert (mask.sum(1) != mask.shape[1]).any()  # some prompt is padded
    seen = []  # the hidden states the head reads at each step (tokens alone can hide a change on a random model)
    hook = lalm.base.get_output_embeddings().register_forward_hook(
        lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    y, m = cord.sample(lalm, x, mask, 1, 0.0, 8)
    batch, seen[:] = list(seen), []
    for b in range(3):
        keep = mask[b].bool()
        y1, m1 = cord.sample(lalm, x[b:b + 1, keep], mask[b:b + 1, keep], 1, 0.0, 8)
        assert torch.equal(y[b][m[b]], y1[0][m1[0]]), b
        for t in range(int(m1[0].sum())):  # prefill's last position, then each decode step
            torch.testing.assert_close(batch[t][b], seen[t][0], atol=1e-5, rtol=1e-4)
        seen[:] = []
    hook.remove()


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
                ref = lalm.model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 input_features=P["features"][b:b + 1],
                                 feature_attention_mask=P["feature_mask"][b:b + 1]).logits[0, -1]
                torch.testing.assert_close(s[b, i], ref, atol=1e-4, rtol=1e-4)
                ids = torch.cat([t_ids, y[b, :i]])[None]
                torch.testing.assert_close(t[b, i], lalm.model(input_ids=ids).logits[0, -1], atol=1e-4, rtol=1e-4)


def row_kinds(speech_data):
    """One row of each kind a manifest can hold, on real speech files (the audio content does not matter here)."""
    wav = str(speech_data.parent / "wavs/q0.wav")
    return [
        {"id": "two-lines", "text": "Janet has 3 ducks.\nHow many eggs does she sell?",
         "answer": "3"},  # plain, multi-line
        {"id": "mcq", "text": "Which is a court? A. A bank. B. A tribunal.", "choices": ["A", "B"], "answer": "B"},
        {"id": "mmau", "prompt": "Which instrument plays? (A) piano (B) violin", "answer": "A"},  # audio-only
        {"id": "both", "text": "Listen to the tune.", "prompt": "Is it fast? (A) yes (B) no", "answer": "B"},
    ], wav


def test_the_audio_prompt_never_holds_the_transcript_for_any_row_kind(speech_data, qwen2_audio_dir):
    """x_a = audio + prompt + instruction, x_t = transcript + prompt + instruction: options spoken in the audio
    (VoiceBench) are never shown as text beside it, and nothing is shown twice."""
    lalm = cord.load_lalm(str(qwen2_audio_dir))
    rows, wav = row_kinds(speech_data)
    prompts = cord.build_prompts(lalm, [dict(r, audio_path=wav) for r in rows], "Answer.")
    tok = lalm.tokenizer
    for i, row in enumerate(rows):
        x_a = tok.decode(prompts["audio_ids"][i][prompts["audio_mask"][i].bool()])
        x_t = tok.decode(prompts["text_ids"][i][prompts["text_mask"][i].bool()])
        for line in filter(None, row.get("text", "").split("\n") + ["A bank", "A tribunal"] * (row["id"] == "mcq")):
            assert line not in x_a, (row["id"], line)  # nothing of what the audio says is shown beside it
        if row.get("text"):
            # options once, in the text
            assert x_t.count(row["text"]) == 1 and x_t.count("A bank") == (row["id"] == "mcq")
        if row.get("prompt"):
            assert x_a.count(row["prompt"]) == 1 and x_t.count(row["prompt"]) == 1  # shown in both
        assert x_a.count("<|AUDIO|>") > 10 and "<|AUDIO|>" not in x_t
        assert x_a.rstrip().endswith("Answer.<|im_end|>\n<|im_start|>assistant") and "Answer.<|im_end|>" in x_t


def test_audio_only_rows_are_evaluated_on_audio_and_skipped_by_training(tmp_path, speech_data, qwen2_audio_dir, capsys):
    rows, _ = row_kinds(speech_data)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(dict(r, audio=str(speech_data.parent / "wavs/q0.wav"))) + "\n"
                                for r in rows))
    only_audio = tmp_path / "audio_only.jsonl"
    only_audio.write_text(manifest.read_text().splitlines()[2] + "\n")
    s = cord.main(["--eval", "true", "--model", str(qwen2_audio_dir), "--data", str(only_audio),
                   "--output", str(tmp_path / "ev"), "--max_new_tokens", "3"])
    assert s["n_scored"] == 1 and s["acc_audio"] in (0.0, 100.0) and s["acc_text"] is None and s["gap"] is None
    run_main(tmp_path, qwen2_audio_dir, manifest, "--objective", "opd", steps=1)
    assert "skipping 1 audio-only rows" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no row has a 'text'"):
        run_main(tmp_path / "b", qwen2_audio_dir, only_audio, "--objective", "opd", steps=1)


def test_greedy_sampler_equals_generate_and_suppresses_audio_tokens(speech_data, qwen2_audio_dir):
    lalm, examples, P = lalm_and_batch(qwen2_audio_dir, speech_data)
    lalm.model.eval()
    x_a = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])
    y, m = cord.sample(lalm, x_a, P["audio_mask"], 2, 0.0, 8)  # (6, T): 2 greedy copies per prompt
    ref = lalm.model.generate(input_ids=P["audio_ids"], attention_mask=P["audio_mask"], input_features=P["features"],
                              feature_attention_mask=P["feature_mask"], max_new_tokens=8, do_sample=False,
                              suppress_tokens=lalm.suppress_ids, eos_token_id=lalm.eos_ids,
                              pad_token_id=lalm.tokenizer.pad_token_id)
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
    assert changed and all("language_model" in k and ".layers." in k and "proj" in k for k in changed)
    assert frozen_calls == [True] and judged == [4]  # B = 2 prompts x N = 2 rollouts


def test_omni_thinker_trains_all_parameters(tmp_path, speech_data, omni_dir):
    final = run_main(tmp_path, omni_dir, speech_data, "--objective", "cord", "--train", "audio", steps=1)
    before = cord.load_lalm(str(omni_dir)).model.state_dict()
    after = cord.load_lalm(str(final)).model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("audio_tower" in k for k in changed)


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
    s = cord.main(["--eval", "true", "--model", str(qwen2_audio_dir), "--data", str(speech_data),
                   "--output", str(tmp_path), "--max_new_tokens", "6"])
    assert {"acc_text", "acc_audio", "gap", "kl_p50", "kl_p80", "kl_p95", "kl_by_position", "top_kl_tokens"} <= set(s)
    items = [json.loads(l) for l in open(tmp_path / "items.jsonl")]
    assert len(items) == len(QUESTIONS) and json.loads((tmp_path / "summary.json").read_text())["n"] == len(QUESTIONS)


def test_cord_steps_pull_the_audio_path_towards_the_text_teacher(speech_data, qwen2_audio_dir, monkeypatch):
    """The learning effect, end to end: on fixed rollouts, CORD steps on the encoder + projector only
    (the text teacher cannot move) must shrink the token loss of Eq. 7 -- a sign or alignment error
    anywhere between the prompts and the optimizer would make it grow or stall."""
    torch.manual_seed(0)
    args = Args(model=str(qwen2_audio_dir), train="audio", lr=1e-3, batch_size=4, max_new_tokens=8, k=3, chunk_size=4)
    lalm = cord.load_lalm(args.model)
    params = cord.configure_trainable(lalm, args.train, args.lora_r)
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


CHOICE_FLAGS = [f.name for f in fields(cord.Args)
                if typing.get_origin(typing.get_type_hints(cord.Args)[f.name]) is typing.Literal]


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
    """`python cord.py` runs cord.py as __main__, which hands over to the module named `cord`: the demo's
    `from cord import Args` must see the classes that built its arguments, not a second copy's."""
    seen = {}
    fake_demo = types.ModuleType("demo.run")
    fake_demo.demo = lambda args: seen.update(cord=sys.modules["cord"], args=args)
    monkeypatch.delitem(sys.modules, "cord")
    monkeypatch.setitem(sys.modules, "demo.run", fake_demo)
    monkeypatch.setattr(sys, "argv", ["cord.py", "--steps", "3"])
    runpy.run_path(cord.__file__, run_name="__main__")
    assert isinstance(seen["args"], seen["cord"].Args) and seen["args"].steps == 3


def test_every_function_in_the_readme_paper_table_exists():
    """The README's paper <-> code table names `path/file.py:function` (or Class.method); each must exist."""
    readme = (Path(cord.__file__).parent / "README.md").read_text()
    table = readme.split("## Paper ↔ code", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`([\w/]+)\.py:([\w.]+)`", table)
    assert len(named) >= 20
    for module, name in named:
        obj = importlib.import_module(module.replace("/", "."))
        for part in name.split("."):
            assert hasattr(obj, part), f"README names {module}.py:{name}, which does not exist"
            obj = getattr(obj, part)


@pytest.mark.parametrize("argv,flag", [
    (["--batch_size", "0"], "--batch_size"), (["--lr", "-1"], "--lr"), (["--max_new_tokens", "0"], "--max_new_tokens"),
    (["--save_every", "0"], "--save_every"), (["--objective", "grpo", "--group_size", "1"], "--group_size"),
    (["--eval", "true"], "--eval"), (["--baseline", "/no/such/summary.json"], "--baseline"),
    (["--resume", "true", "--overwrite", "true"], "--resume"),
])
def test_bad_values_and_pairs_are_one_line_before_any_model_loads(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cord.main(["--model", "/no/such/model", *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and flag in err, err


def test_chunk_size_0_runs_the_reference_functions_with_the_same_losses(tmp_path, speech_data, qwen2_audio_dir):
    """--chunk_size 0: the plain reference functions instead of cordkit/chunked.py; the same rollouts give the same
    losses."""
    for run, extra in (("fused", ()), ("reference", ("--chunk_size", "0"))):
        run_main(tmp_path / run, qwen2_audio_dir, speech_data, "--objective", "cord", "--seed", "2", *extra, steps=1)
    a, b = (json.loads((tmp_path / run / "run/metrics.jsonl").read_text()) for run in ("fused", "reference"))
    assert a["rollout_tokens"] == b["rollout_tokens"] and a["loss_tok"] > 0
    for key in ("loss", "loss_tok", "loss_seq", "kl_mean"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_eval_data_is_evaluated_during_training_and_resumes_cleanly(tmp_path, speech_data, qwen2_audio_dir):
    """--eval_data a,b --eval_every 1: each set at step 0, 1, 2 in eval.jsonl; a run resumed from step 1 replaces
    (does not repeat) the lines after its checkpoint."""
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(dict(json.loads(line),
                                             audio=str(speech_data.parent / json.loads(line)["audio"])))
                             + "\n" for line in open(speech_data).read().splitlines()[:2]))
    sets = f"{speech_data},{other}"
    common = ("--objective", "opd", "--eval_data", sets, "--eval_every", "1", "--save_every", "1",
              "--max_new_tokens", "3")
    run_main(tmp_path, qwen2_audio_dir, speech_data, *common, steps=2)
    lines = [json.loads(line) for line in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["set"]) for r in lines] == [(s, p) for s in (0, 1, 2) for p in (str(speech_data), str(other))]
    assert [r["n"] for r in lines[:2]] == [len(QUESTIONS), 2] and all(r["acc_audio"] is not None for r in lines)
    assert all((r["gap_reduction"] is not None) == (r["step"] > 0 and lines[i % 2]["gap"] != 0)
               for i, r in enumerate(lines))
    (tmp_path / "run/eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:4])
                                             + '{"step": 2, "set": "stale"}\n')
    shutil.rmtree(tmp_path / "run/checkpoint-000002"), shutil.rmtree(tmp_path / "run/final")
    run_main(tmp_path, qwen2_audio_dir, speech_data, *common, "--resume", "true", steps=2)  # from checkpoint-000001
    again = [json.loads(line) for line in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    # stale step-2 lines replaced
    assert [(r["step"], r["set"]) for r in again] == [(r["step"], r["set"]) for r in lines]


def test_a_speech_set_and_an_audio_only_set_evaluated_during_training_print_one_table(tmp_path, speech_data,
                                                                                        qwen2_audio_dir, capsys,
                                                                                        monkeypatch):
    """One command trains with a spoken-math set and an MMAU-style audio-only set (a `prompt` with the options, a
    `category`) evaluated every step, and prints the table per set and the mean gap reduction. The accuracy by
    category is checked first with every completion made to say B: sound rows (answers A, B) 50 %, speech (B, B)
    100 %."""
    mmau = tmp_path / "mmau/manifest.jsonl"
    mmau.parent.mkdir()
    rows = [{"id": f"m{i}", "audio": str(speech_data.parent / f"wavs/q{i}.wav"),
             "prompt": "What is heard? A. a dog B. a voice",
             "choices": ["A", "B"], "answer": "AB"[i > 0], "category": ["sound", "speech"][i % 2]} for i in range(4)]
    mmau.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with monkeypatch.context() as m:
        m.setattr(cord, "decode", lambda lalm, y, y_mask: ["So the correct option is B."] * len(y))
        s = cord.main(["--eval", "true", "--model", str(qwen2_audio_dir), "--data", str(mmau),
                       "--output", str(tmp_path / "ev"), "--max_new_tokens", "3"])
    items = [json.loads(line) for line in open(tmp_path / "ev/items.jsonl")]
    by_hand = {c: 100.0 * np.mean([it["audio_correct"] for it in items if it["category"] == c])
               for c in ("sound", "speech")}
    assert s["acc_audio_by_category"] == by_hand == {"sound": 50.0, "speech": 100.0} and s["acc_text"] is None
    capsys.readouterr()
    run_main(tmp_path, qwen2_audio_dir, speech_data, "--objective", "opd", "--eval_data", f"{speech_data},{mmau}",
             "--eval_every", "1", "--max_new_tokens", "3", steps=2)
    out = capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "run/eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["set"]) for r in lines] == [(s, p) for s in (0, 1, 2) for p in (str(speech_data), str(mmau))]
    assert all(r["gap"] is None and set(r["acc_audio_by_category"]) == {"sound", "speech"} for r in lines[1::2])
    speech, last = evaluation.set_label(str(speech_data)), lines[-2]
    assert (f"| {speech} | {len(QUESTIONS)} | " in out and "| mmau | 4 | n/a → n/a | " in out
            and "| mmau | sound | " in out)
    assert "Mean gap reduction over" in out and out.count("speech set(s)") == 1
    if last["gap_reduction"] is not None:
        assert f"{100 * last['gap_reduction']:.1f} %" in out.split("Mean gap reduction")[1].splitlines()[0]
    assert (tmp_path / "run/eval.png").is_file() and (tmp_path / "run/eval.md").read_text() in out


def test_eval_without_answers_says_not_scored(tmp_path, speech_data, qwen2_audio_dir, capsys):
    rows = [dict(json.loads(line), audio=str(speech_data.parent / json.loads(line)["audio"]))
            for line in open(speech_data)]
    manifest = tmp_path / "no_answers.jsonl"
    manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n" for r in rows[:2]))
    s = cord.main(["--eval", "true", "--model", str(qwen2_audio_dir), "--data", str(manifest),
                   "--output", str(tmp_path / "ev"), "--max_new_tokens", "4"])
    assert s["n_scored"] == 0 and s["acc_text"] is None and s["acc_audio"] is None and s["gap"] is None
    assert "not scored" in capsys.readouterr().out


def test_audio_longer_than_the_encoder_window_is_refused_before_the_model_loads(tmp_path, qwen2_audio_dir, monkeypatch):
    sf.write(tmp_path / "long.wav", (0.1 * np.random.default_rng(0).standard_normal(16000 * 5)).astype(np.float32),
             16000)
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "long", "audio": "long.wav", "text": "a long question",
                                                  "answer": "1"}) + "\n")
    monkeypatch.setattr(cord, "setup", lambda args: pytest.fail("the model must not load"))
    with pytest.raises(SystemExit, match="1 of 1 clips are longer than the model's 4 s audio window"):
        cord.main(["--model", str(qwen2_audio_dir), "--data", str(tmp_path / "m.jsonl"),
                   "--output", str(tmp_path / "run")])
    monkeypatch.undo()
    # as VoiceBench's harness: the first 4 s are heard
    s = cord.main(["--eval", "true", "--long_audio", "cut", "--model", str(qwen2_audio_dir),
                   "--data", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "ev"), "--max_new_tokens", "2"])
    assert s["n"] == 1


# ----------------------------------------------------------------------------------------------
# The wiring of one training step: which rows meet which references, teacher, advantages, L = L_tok + lambda L_seq
#
# B = 4 prompts (answers 5, 3, 7, 4) x G = 3 GRPO rollouts on the tiny Qwen2-Audio, with cord.sample replaced by
# fixed rollouts whose text names the prompt and sample they came from, so every pairing can be checked by hand.

B_W, G_W = 4, 3
ANSWERS_W = [a for _, a in QUESTIONS[:B_W]]  # ground truth: 5, 3, 7, 4
YHAT_W = ["5", "4", "7", "4"]  # what each prompt's text path answers (y_hat): prompt 1 reads it wrong
# the answers of each prompt's G rollouts
GROUP_W = [["5", "3", "7"], ["3", "4", "4"], ["7", "7", "5"], ["4", "4", "4"]]


def opd_text(b):  # the OPD rollout (tau) of prompt b
    return f"p{b} opd: the answer is {ANSWERS_W[b]}."


def group_text(b, j):  # GRPO rollout j (tau_grpo) of prompt b
    return f"p{b} s{j}: the answer is {GROUP_W[b][j]}."


def yhat_text(b):  # y_hat ~ pi(.|x_t) of prompt b
    return f"p{b} text: the answer is {YHAT_W[b]}."


def fixed_sample(lalm):
    """Stands in for cord.sample: sample j of prompt b is fixed text naming b (and j), right-padded, EOS included."""

    # max_new_tokens ignored: fixed texts
    def fake(_lalm, prompt_embeds, prompt_mask, n, temperature, max_new_tokens, fast="off"):
        B = prompt_embeds.shape[0]
        if isinstance(temperature, list):  # x_a: one tau per sample, the OPD row at tau, the GRPO rows at tau_grpo
            assert len(temperature) == n and set(temperature) <= {Args.temperature, Args.grpo_temperature}
            texts = [opd_text(b) if tau == Args.temperature else group_text(b, temperature[:j].count(tau))
                     for b in range(B) for j, tau in enumerate(temperature)]
        else:  # x_t: the reference y_hat
            texts = [yhat_text(b) for b in range(B) for _ in range(n)]
        ids = [lalm.tokenizer(t, add_special_tokens=False)["input_ids"] + [lalm.eos_ids[0]] for t in texts]
        T = max(map(len, ids))
        y = torch.tensor([row + [lalm.tokenizer.pad_token_id] * (T - len(row)) for row in ids], device=lalm.device)
        return y, (torch.arange(T, device=lalm.device)[None]
                   < torch.tensor([len(row) for row in ids], device=lalm.device)[:, None])

    return fake


def wired(model_dir, manifest, monkeypatch, **kw):  # -> lalm, trainable params, live teacher, B_W examples, args
    args = Args(model=str(model_dir), batch_size=B_W, group_size=G_W, max_new_tokens=6, chunk_size=4, **kw)
    torch.manual_seed(0)
    lalm = cord.load_lalm(args.model)
    params = cord.configure_trainable(lalm, args.train, args.lora_r)
    monkeypatch.setattr(cord, "sample", fixed_sample(lalm))
    examples = load_manifest(str(manifest))[:B_W]
    assert [ex["answer"] for ex in examples] == ANSWERS_W
    return lalm, params, cord.Teacher(lalm, "live"), examples, args


def recording_judge(args, lalm, seen):  # the rule judges of make_judge, recording every (completion, reference) pair
    judge_text, judge_gt = cord.make_judge(args, lalm)

    def text(preds, refs):
        seen.setdefault("text", []).extend(zip(preds, refs))
        return judge_text(preds, refs)

    def gt(preds, refs):
        seen.setdefault("answer", []).extend(zip(preds, refs))
        return judge_gt(preds, refs)

    return text, gt


@pytest.mark.parametrize("reward_ref", ["text", "answer", "both"])
def test_each_rollout_is_judged_against_its_own_prompts_reference(reward_ref, speech_data, qwen2_audio_dir,
                                                                  monkeypatch):
    """Row b*G + j of the group (rollout j of prompt b) meets prompt b's y_hat and prompt b's answer, never
    another's."""
    lalm, _, teacher, examples, args = wired(qwen2_audio_dir, speech_data, monkeypatch, reward_ref=reward_ref)
    seen, rewards = {}, []
    real_rewards_for = cord.rewards_for

    def rewards_spy(*a):  # the rewards of Eq. 8 as train_step gets them
        rewards.append(real_rewards_for(*a))
        return rewards[-1]

    monkeypatch.setattr(cord, "rewards_for", rewards_spy)
    _, m = cord.train_step(lalm, teacher, recording_judge(args, lalm, seen), examples, args)
    rows = [(b, j) for b in range(B_W) for j in range(G_W)]  # the group's row order: prompt-major
    if reward_ref == "answer":
        assert "text" not in seen  # no y_hat is sampled or judged
    else:
        assert seen["text"] == [(group_text(b, j), yhat_text(b)) for b, j in rows]
    if reward_ref == "text":
        assert "answer" not in seen
    else:
        assert seen["answer"] == [(group_text(b, j), ANSWERS_W[b]) for b, j in rows]
    want = {  # per prompt, rollout answers GROUP_W vs y_hat YHAT_W (text), vs ANSWERS_W (answer), both must hold (both)
        "text": [[1, 0, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1]],
        "answer": [[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]],
        "both": [[1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 1, 1]],
    }[reward_ref]
    assert len(rewards) == 1 and rewards[0].tolist() == [float(r) for group in want for r in group]
    assert m["reward_mean"] == pytest.approx(sum(map(sum, want)) / (B_W * G_W))


@pytest.mark.parametrize("adv_scale", ["none", "std"])
def test_advantages_are_taken_within_each_prompts_group_of_G_rows(adv_scale, speech_data, qwen2_audio_dir,
                                                                  monkeypatch):
    """Eq. 9 per prompt: rewards (both) 100 | 000 | 110 | 111 -> A over rows b*G..b*G+G-1, and exactly these A reach
    Eq. 10."""
    lalm, _, teacher, examples, args = wired(qwen2_audio_dir, speech_data, monkeypatch, reward_ref="both",
                                             adv_scale=adv_scale)
    seen = []
    real_grpo_loss = cord.grpo_loss

    def spy(logp, old_logp, A, mask, *a):
        seen.append((A.clone(), mask.clone()))
        return real_grpo_loss(logp, old_logp, A, mask, *a)

    monkeypatch.setattr(cord, "grpo_loss", spy)
    _, m = cord.train_step(lalm, teacher, cord.make_judge(args, lalm), examples, args)
    (A, mask), = seen
    # r - mean(r) within each group of 3: 1 0 0 -> 2/3 -1/3 -1/3; 0 0 0 and 1 1 1 -> 0; 1 1 0 -> 1/3 1/3 -2/3
    want = torch.tensor([2, -1, -1, 0, 0, 0, 1, 1, -2, 0, 0, 0]) / 3
    if adv_scale == "std":
        # both non-constant groups have unbiased std sqrt(1/3); constant ones stay 0
        want = want / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(A, want)
    lengths = [len(lalm.tokenizer(group_text(b, j), add_special_tokens=False)["input_ids"]) + 1
               for b in range(B_W) for j in range(G_W)]
    assert mask.sum(-1).tolist() == lengths  # the group rows, in the same order (+1: EOS)
    assert m["zero_spread_frac"] == 0.5  # prompts 1 and 3


@pytest.mark.parametrize("opd_rollout", ["separate", "group"])
def test_teacher_rows_line_up_with_the_student_rows(opd_rollout, speech_data, qwen2_audio_dir, monkeypatch):
    """Teacher row r reads the transcript of the example whose audio student row r hears, and scores the same
    completion."""
    lalm, _, teacher, examples, args = wired(qwen2_audio_dir, speech_data, monkeypatch, opd_rollout=opd_rollout)
    x_a, teacher_calls, student_calls = [], [], []
    real_embed, real_hidden, real_teacher = cord.embed_prompts, cord.completion_hidden, cord.Teacher.hidden

    def embed_spy(lalm_, ids, features=None, feature_mask=None):
        out = real_embed(lalm_, ids, features, feature_mask)
        if features is not None:
            x_a.append(out.detach().clone())  # the step's audio prompts (B, S_a, C)
        return out

    def hidden_spy(lalm_, prompt_embeds, prompt_mask, y, y_mask):
        if torch.is_grad_enabled():  # the student forward (the teacher's runs under no_grad)
            student_calls.append((prompt_embeds.detach().clone(), y.clone(), y_mask.clone()))
        return real_hidden(lalm_, prompt_embeds, prompt_mask, y, y_mask)

    def teacher_spy(self, text_ids, text_mask, y, y_mask):
        teacher_calls.append((text_ids.clone(), text_mask.clone(), y.clone(), y_mask.clone()))
        return real_teacher(self, text_ids, text_mask, y, y_mask)

    monkeypatch.setattr(cord, "embed_prompts", embed_spy)
    monkeypatch.setattr(cord, "completion_hidden", hidden_spy)
    monkeypatch.setattr(cord.Teacher, "hidden", teacher_spy)
    cord.train_step(lalm, teacher, cord.make_judge(args, lalm), examples, args)
    (x_a,), ((t_ids, t_mask, t_y, t_m),), ((s_emb, s_y, s_m),) = x_a, teacher_calls, student_calls
    assert all(not torch.equal(x_a[b], x_a[c]) for b in range(B_W) for c in range(b))  # the B audio prompts differ
    group = [(b, group_text(b, j)) for b in range(B_W) for j in range(G_W)]
    # the student's rows: the L_tok rows first (the OPD rows, or the group itself with --opd_rollout group),
    # then the group
    tok_rows = [(b, opd_text(b)) for b in range(B_W)] if opd_rollout == "separate" else group
    student_rows = tok_rows + group if opd_rollout == "separate" else group
    decode = lambda ids: lalm.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    assert s_emb.shape[0] == len(student_rows)
    for r, (b, text) in enumerate(student_rows):
        assert torch.equal(s_emb[r], x_a[b]) and decode(s_y[r][s_m[r]]) == text  # row r hears prompt b, says its text
    assert t_ids.shape[0] == len(tok_rows)
    for r, (b, text) in enumerate(tok_rows):
        prompt = decode(t_ids[r][t_mask[r].bool()])
        # prompt b's transcript only
        assert [ex["text"] in prompt for ex in examples] == [c == b for c in range(B_W)], prompt
        assert lalm.audio_token_id not in t_ids[r].tolist()
        # the same completion tokens
        assert torch.equal(t_y[r][t_m[r]], s_y[r][s_m[r]]) and decode(t_y[r][t_m[r]]) == text


def test_total_loss_gradient_is_L_tok_plus_lambda_L_seq(speech_data, qwen2_audio_dir, monkeypatch):
    """The gradient train_step leaves in .grad is grad L_tok + lam grad L_seq (lam = 0.3), each term's gradient taken
    alone."""
    lam = 0.3
    lalm, params, teacher, examples, args = wired(qwen2_audio_dir, speech_data, monkeypatch, lam=lam)
    alone = {}
    real_tok, real_seq = cord.weighted_token_loss, cord.grpo_loss

    def grads_of(name, real):
        def spy(*a, **kw):
            out = real(*a, **kw)
            g = torch.autograd.grad(out[0], params, retain_graph=True, allow_unused=True)
            alone[name] = torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                     for gi, p in zip(g, params)])
            return out
        return spy

    monkeypatch.setattr(cord, "weighted_token_loss", grads_of("tok", real_tok))
    monkeypatch.setattr(cord, "grpo_loss", grads_of("seq", real_seq))
    _, m = cord.train_step(lalm, teacher, cord.make_judge(args, lalm), examples, args)
    total = torch.cat([p.grad.flatten() for p in params])
    g_tok, g_seq = alone["tok"], alone["seq"]
    assert g_seq.norm() > 0.1 * g_tok.norm() > 0  # both terms pull: a wrong weight shows in the sum
    torch.testing.assert_close(total, g_tok + lam * g_seq, rtol=1e-4, atol=1e-6)
    for wrong in (g_tok + g_seq, lam * g_tok + g_seq, g_tok + 2 * lam * g_seq):  # lam ignored, on L_tok, L_seq twice
        assert (total - wrong).norm() > 100 * (total - (g_tok + lam * g_seq)).norm()
    assert m["loss"] == pytest.approx(m["loss_tok"] + lam * m["loss_seq"], abs=1e-6)


@pytest.mark.parametrize("objective", ["cord", "opd", "grpo", "opd+grpo", "sft", "fkl"])
def test_each_objective_carries_exactly_its_terms(objective, speech_data, qwen2_audio_dir, monkeypatch):
    """L = 1 * L_tok + lam * L_seq with the terms the objective names; the token weights of Eq. 4-5 only for cord; the
    reductions the user chose (--normalize, --grpo_reduction; not the defaults here) reach Eq. 7 and Eq. 10.

    Each term returned by its loss function gets a probe p (value + p - p, so the value is unchanged): after the
    backward of train_step, p.grad is the coefficient with which that term entered the total loss."""
    lam, alpha, beta = 0.3, 3.0, 2.5
    lalm, _, teacher, examples, args = wired(qwen2_audio_dir, speech_data, monkeypatch, objective=objective, lam=lam,
                                             alpha=alpha, beta=beta, reward_ref="both", normalize="length",
                                             grpo_reduction="token")
    probes, values, passed = {}, {}, {}

    def probed(name, real):
        def spy(*a, **kw):
            passed[name] = a[3:] if name == "tok" else a[4:]  # weighted_token_loss(D, mask, k, alpha, beta, normalize),
            # grpo_loss(logp, old_logp, A, mask, eps, group_size, reduction): the settings as passed
            out = real(*a, **kw)  # (loss, metrics); baseline_loss: the loss alone
            loss = out[0] if isinstance(out, tuple) else out
            assert name not in probes  # each term computed once per step
            probes[name], values[name] = torch.zeros((), requires_grad=True), loss.item()
            loss = loss + probes[name] - probes[name].detach()
            return (loss, *out[1:]) if isinstance(out, tuple) else loss
        return spy

    for name, fn in (("tok", "weighted_token_loss"), ("seq", "grpo_loss"), ("baseline", "baseline_loss")):
        monkeypatch.setattr(cord, fn, probed(name, getattr(cord, fn)))
    judge = cord.make_judge(args, lalm) if objective in ("cord", "grpo", "opd+grpo") else None
    _, m = cord.train_step(lalm, teacher, judge, examples, args)
    want = {"cord": {"tok": 1.0, "seq": lam}, "opd": {"tok": 1.0}, "grpo": {"seq": lam},
            "opd+grpo": {"tok": 1.0, "seq": lam}, "sft": {"baseline": 1.0}, "fkl": {"baseline": 1.0}}[objective]
    assert {name: p.grad.item() for name, p in probes.items()} == pytest.approx(want)
    if "tok" in want:  # Eq. 4-5 weights for cord, uniform (Eq. 3) for opd and opd+grpo
        assert passed["tok"] == ((alpha, beta) if objective == "cord" else (1.0, 1.0)) + ("length",)
    if "seq" in want:
        assert passed["seq"] == (args.clip_eps, args.group_size, "token")
    assert m["loss"] == pytest.approx(sum(c * values[name] for name, c in want.items()), abs=1e-6)
    assert (("loss_tok" in m, "loss_seq" in m, f"loss_{objective}" in m)
            == ("tok" in want, "seq" in want, "baseline" in want))


# ----------------------------------------------------------------------------------------------
# Mutation-found cases (README: Testing -> mutation testing): each test below kills mutants of cord.py that
# survived the suite above, against an independent, obviously correct computation.


def slow_logp(logits, y):  # log softmax(logits)[y] for one position, plain Python over the vocabulary
    z = logits.double().tolist()
    top = max(z)
    return z[y] - top - math.log(sum(math.exp(v - top) for v in z))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_mut_both_kl_directions_and_logprobs_per_position_zero_on_padding(chunk_size):
    """Every position of D (reverse), the forward KL and log pi(y_t), on both paths of training (chunk_size None: in
    one piece; 3: chunked), against a slow loop; padding holds huge logits but D and the forward KL are exactly 0
    there."""
    s, t, mask = rand_case(B=3, T=5, V=7, seed=11)
    s[~mask], t[~mask] = 1e4 * s[~mask], -1e4 * t[~mask]
    y = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
    D = chunked.kl(s, t, mask, chunk_size)
    Fw = chunked.kl(s, t, mask, chunk_size, reverse=False)
    lp = chunked.logprobs(s, y, chunk_size)
    for b in range(3):
        for i in range(5):
            real = bool(mask[b, i])
            assert D[b, i].item() == pytest.approx(slow_kl(s[b, i], t[b, i]) if real else 0.0, abs=1e-5)
            assert Fw[b, i].item() == pytest.approx(slow_kl(t[b, i], s[b, i]) if real else 0.0, abs=1e-5)
            if real:
                assert lp[b, i].item() == pytest.approx(slow_logp(s[b, i], int(y[b, i])), abs=1e-5)
    # the teacher is stop-gradient in both directions: only the student's logits get a gradient
    s_, t_ = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    D_, Fw_ = chunked.kl(s_, t_, mask, chunk_size), chunked.kl(s_, t_, mask, chunk_size, False)
    (D_.sum() + Fw_.sum()).backward()
    assert t_.grad is None or t_.grad.abs().max() == 0
    assert s_.grad[mask].abs().max() > 0


def test_mut_position_weights_for_every_length_up_to_6():
    """Eq. 5 for T = 1..6 (T = 2 included: w = (beta, 1)), beta in {1, 2, 3.5}, against the formula in plain Python."""
    lengths = [1, 2, 3, 4, 5, 6]
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    for beta in (1.0, 2.0, 3.5):
        w = position_weights(mask, beta)
        for b, L in enumerate(lengths):
            want = [(beta - (beta - 1) * t / (L - 1) if L > 1 else beta) if t < L else 0.0 for t in range(6)]
            assert w[b].tolist() == pytest.approx(want), (beta, L)
    assert position_weights(torch.tensor([[True, True]])).tolist() == [[2.0, 1.0]]  # default beta = 2


def test_mut_importance_weights_k_per_sequence_and_large_k():
    """A K per sequence (departure 8), K above T, alpha other than 2, and a row whose padding holds the largest D."""
    D = torch.tensor([[0.3, 0.1, 0.2, 0.9], [5.0, 0.5, 9.0, 9.0], [0.1, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    w = importance_weights(D, mask, k=torch.tensor([2, 1, 7]), alpha=1.5)
    assert w.tolist() == [[1.5, 1.0, 1.0, 1.5],  # K = 2: 0.9 and 0.3
                          [1.5, 1.0, 0.0, 0.0],  # K = 1 on length 2: 5.0 (never the padding's 9.0)
                          [1.5, 1.5, 1.5, 1.5]]  # K = 7 > T: all
    assert importance_weights(D, mask, k=4).tolist() == (mask * 2.0).tolist()  # K = T: all alpha


def slow_token_metrics(D, mask, k):  # the logged metrics of weighted_token_loss, in plain Python
    d = [D[b, i].item() for b in range(D.shape[0]) for i in range(D.shape[1]) if mask[b, i]]
    top = []
    for b in range(D.shape[0]):
        L = int(mask[b].sum())
        top += sorted((D[b, i].item() for i in range(L)), reverse=True)[:k]
    q = lambda p: float(np.quantile(np.array(d), p))  # linear interpolation, as torch.quantile
    return {"kl_mean": sum(d) / len(d), "kl_top_share": sum(top) / sum(d), "k_eff_frac": len(top) / len(d),
            "kl_p50": q(0.5), "kl_p80": q(0.8), "kl_p95": q(0.95)}


@pytest.mark.parametrize("k,alpha", [(2, 3.0), (1, 1.0)])
def test_mut_weighted_token_loss_logged_metrics(k, alpha):
    """kl_mean, kl_top_share, k_eff_frac and the percentiles over the real tokens only (padding holds large D);
    the top-K of the metrics is the top-K of Eq. 4 whatever alpha is (alpha = 1 included)."""
    g = torch.Generator().manual_seed(12)
    D = torch.rand(3, 6, generator=g)
    mask = torch.arange(6)[None] < torch.tensor([6, 4, 1])[:, None]
    D[~mask] = 50.0
    _, m = cord.weighted_token_loss(D, mask, k=k, alpha=alpha, beta=2.0)
    assert m == pytest.approx(slow_token_metrics(D, mask, k), rel=1e-5)


def test_mut_weighted_token_loss_empty_rows_are_left_out_of_the_mean():
    """A row with no token is not a sequence: the mean runs over the others; no token at all gives 0 (and a graph)."""
    D = torch.tensor([[1.0, 2.0, 0.5], [7.0, 7.0, 7.0], [0.4, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 0]]).bool()
    loss, m = cord.weighted_token_loss(D, mask, k=1, alpha=2.0, beta=2.0)
    # row 0: w_kl = (1, 2, 1), w_pos = (2, 1.5, 1) -> w = (2, 3, 1): (2 * 1 + 3 * 2 + 1 * 0.5) / 6; row 2: 0.4
    assert loss.item() == pytest.approx(((2 * 1 + 3 * 2 + 0.5) / 6 + 0.4) / 2)
    loss, _ = cord.weighted_token_loss(D, mask, k=1, alpha=2.0, beta=2.0, normalize="length")
    assert loss.item() == pytest.approx(((2 * 1 + 3 * 2 + 0.5) / 3 + 2 * 2 * 0.4 / 1) / 2)  # row 2: w = alpha * beta
    none = torch.zeros(2, 3, dtype=torch.bool)
    loss, m = cord.weighted_token_loss(D[:2], none)
    assert loss.item() == 0.0 and loss.requires_grad and m["kl_mean"] == 0.0 and m["k_eff_frac"] == 0.0
    assert not any(key.startswith("kl_p") for key in m)


def slow_grpo(logp, old, A, mask, eps, reduction):  # Eq. 10 in plain Python -> (loss, clip_frac)
    total, tokens, clipped, per_seq = 0.0, 0, 0, []
    for i in range(logp.shape[0]):
        terms = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            rho, a = math.exp(logp[i, t].item() - old[i, t].item()), A[i].item()
            terms.append(min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a))
            clipped += (rho > 1 + eps and a > 0) or (rho < 1 - eps and a < 0)
        per_seq.append(sum(terms) / max(len(terms), 1))
        total, tokens = total + sum(terms), tokens + len(terms)
    loss = -sum(per_seq) / len(per_seq) if reduction == "sequence" else -total / max(tokens, 1)
    return loss, clipped / max(tokens, 1)


@pytest.mark.parametrize("reduction", ["sequence", "token"])
@pytest.mark.parametrize("eps", [0.2, 0.05])
def test_mut_grpo_loss_both_reductions_vs_slow_loop(reduction, eps):
    """Eq. 10 with either reduction and two clip ranges; rows of different lengths (one empty) so that the token
    mean and the sequence mean differ; the clip fraction over real tokens only."""
    g = torch.Generator().manual_seed(13)
    logp = torch.randn(5, 6, generator=g) * 0.3 - 1
    old = logp + torch.randn(5, 6, generator=g) * 0.2
    A = torch.tensor([1.5, -1.0, 0.5, -0.25, 2.0])
    mask = torch.arange(6)[None] < torch.tensor([6, 2, 4, 1, 0])[:, None]
    loss, m = grpo_loss(logp, old, A, mask, eps=eps, reduction=reduction)
    want, clip = slow_grpo(logp, old, A, mask, eps, reduction)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert m["clip_frac"] == pytest.approx(clip)
    assert "zero_spread_frac" not in m  # no group_size: not computed


def test_mut_grpo_loss_zero_spread_fraction_hand_table():
    A = torch.tensor([0.0, 0.0, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0])  # groups of 2: zero, spread, zero, zero -> 3/4
    lp = torch.zeros(8, 2)
    assert grpo_loss(lp, lp, A, torch.ones(8, 2, dtype=torch.bool), group_size=2)[1]["zero_spread_frac"] == 0.75
    assert grpo_loss(lp, lp, A, torch.ones(8, 2, dtype=torch.bool), group_size=4)[1]["zero_spread_frac"] == 0.5


def test_mut_grpo_advantages_default_is_std_and_handles_groups_of_two():
    r = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])  # int rewards, groups of 2
    A = grpo_advantages(r, 2)  # default: scale="std", eps = 1e-4
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    torch.testing.assert_close(A, torch.tensor([0.5, -0.5, 0, 0, 0, 0, 0.5, -0.5]) / (s + 1e-4))
    assert A.dtype == torch.float32 and A.shape == (8,)
    torch.testing.assert_close(grpo_advantages(r, 2, "std", eps=1.0),
                               torch.tensor([0.5, -0.5, 0, 0, 0, 0, 0.5, -0.5]) / (s + 1))


def fake_judge(verdicts):  # a judge answering from a table {(completion, reference): 0 or 1}, recording its calls
    calls = []

    def judge(preds, refs):
        calls.append((list(preds), list(refs)))
        return [verdicts[(p, r)] for p, r in zip(preds, refs)]

    return judge, calls


def test_mut_rewards_for_every_mode_hand_table():
    """Eq. 8 per row: text = J(y, y_hat); answer = J(y, ground truth) (y_hat where a row has no answer); both = min."""
    completions, refs, answers = ["a", "b", "c", "d"], ["R0", "R1", "R2", "R3"], [7, None, "x", 0]
    text_j, text_calls = fake_judge({("a", "R0"): 1, ("b", "R1"): 0, ("c", "R2"): 1, ("d", "R3"): 0})
    gt_j, gt_calls = fake_judge({("a", "7"): 0, ("c", "x"): 1, ("d", "0"): 1})
    r = cord.rewards_for((text_j, gt_j), completions, refs, answers, "text")
    assert r.tolist() == [1, 0, 1, 0] and r.dtype == torch.float32 and gt_calls == []
    r = cord.rewards_for((text_j, gt_j), completions, refs, answers, "both")
    assert r.tolist() == [0, 0, 1, 0] and r.dtype == torch.float32  # min(gt, text); row 1: text alone
    assert gt_calls == [(["a"], ["7"]), (["c"], ["x"]), (["d"], ["0"])]  # the answer as a string, 0 included
    text_calls.clear()
    gt_j, gt_calls = fake_judge({("a", "7"): 0, ("b", "1"): 1, ("c", "x"): 1, ("d", "0"): 1})
    r = cord.rewards_for((text_j, gt_j), completions, [None] * 4, [7, 1, "x", 0], "answer")
    assert r.tolist() == [0, 1, 1, 1] and r.dtype == torch.float32 and len(gt_calls) == 4
    assert text_calls == []  # no y_hat is judged with --reward_ref answer
    with pytest.raises(SystemExit,
                       match="^--reward_ref answer: an example has no 'answer'; use --reward_ref text or both$"):
        cord.rewards_for((text_j, gt_j), completions, [None] * 4, answers, "answer")


def test_mut_pad_cat_hand_table():
    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[4], [5]])
    assert cord.pad_cat([a, b], 0).tolist() == [[1, 2, 3], [4, 0, 0], [5, 0, 0]]
    assert cord.pad_cat([b, a], -7).tolist() == [[4, -7, -7], [5, -7, -7], [1, 2, 3]]
    m = cord.pad_cat([torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool)], False)
    assert m.tolist() == [[True, False], [True, True]]


def toy_lalm(V=9, C=4, bias=False, seed=0):  # just what head_terms and baseline_loss touch: lalm.base's lm_head
    torch.manual_seed(seed)
    head = torch.nn.Linear(C, V, bias=bias)
    return types.SimpleNamespace(base=types.SimpleNamespace(get_output_embeddings=lambda: head)), head


def toy_rows(C=4, V=9, seed=0):  # student h (3, 4, C), teacher h_t (3, 4, C) with its own head W_t (V, C), y, mask
    g = torch.Generator().manual_seed(seed)
    h, h_t, W_t = torch.randn(3, 4, C, generator=g), torch.randn(3, 4, C, generator=g), torch.randn(V, C, generator=g)
    y = torch.randint(0, V, (3, 4), generator=g)
    mask = torch.arange(4)[None] < torch.tensor([4, 2, 1])[:, None]
    return h, h_t, W_t, y, mask


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_mut_head_terms_vs_slow_loop(chunk_size, bias):
    """D of Eq. 2 (student logits h W^T + b vs teacher logits h_t W_t^T) and log pi(y_t) of logits / tau, position by
    position; the fused path (no bias) and the logits path give the same; no teacher: D is None."""
    lalm, head = toy_lalm(bias=bias)
    h, h_t, W_t, y, mask = toy_rows()
    logits = lambda hh, W, b=None: hh.double() @ W.double().T + (0 if b is None else b.double())
    D, logp = chunked.head_terms(head, h, y, mask, h_t, W_t, chunk_size)
    D_none, logp_hot = chunked.head_terms(head, h, y, mask, chunk_size=chunk_size, temperature=1.5)
    assert D_none is None
    for b in range(3):
        for t in range(4):
            s = logits(h[b, t], head.weight, head.bias)
            if mask[b, t]:
                assert D[b, t].item() == pytest.approx(slow_kl(s, logits(h_t[b, t], W_t)), abs=1e-5)
            else:
                assert D[b, t].item() == 0.0
            assert logp[b, t].item() == pytest.approx(slow_logp(s, int(y[b, t])), abs=1e-5)
            assert logp_hot[b, t].item() == pytest.approx(slow_logp(s / 1.5, int(y[b, t])), abs=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_mut_baseline_losses_vs_slow_loop(chunk_size):
    """Departure 9: sft = mean over sequences of the per-token mean of -log pi(y_hat_t | x_a); fkl = the same mean of
    KL(teacher || student); a sequence without tokens counts as 0."""
    lalm, head = toy_lalm()
    h, h_t, W_t, y, mask = toy_rows(seed=1)
    mask[1, 1:], mask[2] = False, False  # lengths 4, 1 and an empty row
    logits = lambda hh, W: hh.double() @ W.double().T
    sft, fkl = [], []
    for b in range(3):
        L = int(mask[b].sum())
        ce = [-slow_logp(logits(h[b, t], head.weight), int(y[b, t])) for t in range(L)]
        kl = [slow_kl(logits(h_t[b, t], W_t), logits(h[b, t], head.weight)) for t in range(L)]
        sft.append(sum(ce) / max(L, 1)), fkl.append(sum(kl) / max(L, 1))
    got_sft = cord.baseline_loss(lalm, h, y, mask, h_t, W_t, "sft", chunk_size)
    got_fkl = cord.baseline_loss(lalm, h, y, mask, h_t, W_t, "fkl", chunk_size)
    assert got_sft.item() == pytest.approx(sum(sft) / 3, rel=1e-5)
    assert got_fkl.item() == pytest.approx(sum(fkl) / 3, rel=1e-5)


# the teacher's hidden states computed directly: eval mode, no grad, x_t = the transcript prompt
def text_path(lalm, P, y, m):
    lalm.model.eval()
    with torch.no_grad():
        return cord.completion_hidden(lalm, cord.embed_prompts(lalm, P["text_ids"]), P["text_mask"], y, m)


def test_mut_frozen_teacher_keeps_the_initial_weights_live_follows_and_mode_is_restored(speech_data, qwen2_audio_dir):
    lalm, _, P = lalm_and_batch(qwen2_audio_dir, speech_data, n=2)
    y, m = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    live, frozen = cord.Teacher(lalm, "live"), cord.Teacher(lalm, "frozen")
    assert live.copy is None and frozen.copy is not None
    assert not any(p.requires_grad for p in frozen.copy.model.parameters())  # a frozen copy: never trained
    before = text_path(lalm, P, y, m)
    with torch.no_grad():  # the live model moves (a training step)
        for p in lalm.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = text_path(lalm, P, y, m)
    assert (after - before).abs().max() > 1e-3
    for training in (True, False):
        lalm.model.train(training)
        h_f, W_f = frozen.hidden(P["text_ids"], P["text_mask"], y, m)
        assert lalm.model.training == training  # the caller's mode is restored
        h_l, W_l = live.hidden(P["text_ids"], P["text_mask"], y, m)
        assert lalm.model.training == training
        torch.testing.assert_close(h_f, before)  # frozen: the initial weights, in eval mode
        torch.testing.assert_close(h_l, after)  # live: the current weights
        assert not h_f.requires_grad and not h_l.requires_grad
        assert W_l is lalm.base.get_output_embeddings().weight
        assert not torch.equal(W_f, W_l) and W_f is frozen.copy.base.get_output_embeddings().weight


def test_mut_lora_teacher_frozen_disables_the_adapter_live_keeps_it(speech_data, qwen2_audio_dir):
    lalm, _, P = lalm_and_batch(qwen2_audio_dir, speech_data, n=2)
    cord.configure_trainable(lalm, "lora", 4)
    with torch.no_grad():  # trained adapters (lora_B starts at 0, which would hide a wrong choice)
        for name, p in lalm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    y, m = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[1, 1, 1], [1, 1, 1]]).bool()
    with_adapter = text_path(lalm, P, y, m)
    with lalm.model.disable_adapter():
        base = text_path(lalm, P, y, m)
    assert (with_adapter - base).abs().max() > 1e-3
    frozen, live = cord.Teacher(lalm, "frozen"), cord.Teacher(lalm, "live")
    assert frozen.copy is None  # the base model under the adapter is the frozen teacher: no copy
    lalm.model.train()
    torch.testing.assert_close(frozen.hidden(P["text_ids"], P["text_mask"], y, m)[0], base)
    torch.testing.assert_close(live.hidden(P["text_ids"], P["text_mask"], y, m)[0], with_adapter)
    assert lalm.model.training


def test_mut_sampler_ends_rows_at_eos_pads_after_it_and_stops_when_all_are_done(speech_data, qwen2_audio_dir):
    """With half the vocabulary as EOS, rows end at different steps: each mask is True up to and including its first
    EOS, the tokens after it are the pad id (eos_ids[0] when the tokenizer has none), and sampling stops once every
    row is done."""
    lalm, _, P = lalm_and_batch(qwen2_audio_dir, speech_data, n=2)
    lalm.model.eval()
    x_a = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])
    V = lalm.base.get_output_embeddings().weight.shape[0]
    eos = [v for v in range(V) if v % 2 == 1 and v not in lalm.suppress_ids]  # odd ids: eos[0] is not the pad id
    for pad_id in (lalm.tokenizer.pad_token_id, None):
        fields = {**lalm.__dict__, "eos_ids": eos}
        if pad_id is None:
            fields["tokenizer"] = types.SimpleNamespace(pad_token_id=None)
        torch.manual_seed(0)
        y, m = cord.sample(cord.LALM(**fields), x_a, P["audio_mask"], 8, 1.0, 30)  # (16, T)
        pad = eos[0] if pad_id is None else pad_id
        assert pad_id is None or pad_id not in eos  # else a pad taken from eos_ids would go unnoticed
        lengths = []
        for row, alive in zip(y.tolist(), m.tolist()):
            L = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))  # up to and including the first EOS
            assert alive == [i < L for i in range(len(row))] and row[L:] == [pad] * (len(row) - L)
            lengths.append(L)
        assert y.shape[1] == max(lengths) < 30 and min(lengths) < max(lengths)  # stopped when the last row ended
        assert not torch.isin(y, torch.tensor(lalm.suppress_ids)).any()


def test_mut_sampler_draws_each_row_at_its_own_temperature(speech_data, qwen2_audio_dir):
    """Row j of each prompt is drawn from softmax(logits / temperature[j]) (0: argmax): the mean logit of the drawn
    first tokens matches its expectation under that temperature, within 5 standard errors."""
    lalm, _, P = lalm_and_batch(qwen2_audio_dir, speech_data, n=2)
    lalm.model.eval()
    head = lalm.base.get_output_embeddings()
    x_a = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"]).detach()
    with torch.no_grad():
        # (B, V) the first token's logits
        first = cord.completion_logits(lalm, x_a, P["audio_mask"], torch.zeros(2, 1, dtype=torch.long),
                                       torch.ones(2, 1, dtype=torch.bool))[:, 0].double()
        scale = 2.0 / first.std().item()  # logits spread (std 2) so that the temperatures differ clearly
        head.weight.mul_(scale)
    first = first * scale
    first[:, lalm.suppress_ids] = -math.inf
    taus, reps = [0.0, 0.5, 1.0, 1.7], 150
    torch.manual_seed(0)
    y, _ = cord.sample(lalm, x_a, P["audio_mask"], len(taus) * reps, taus * reps, 1)  # (B * 600, 1)
    y = y[:, 0].view(2, reps, len(taus))  # (B, draws, tau)
    for b in range(2):
        for j, tau in enumerate(taus):
            drawn = first[b, y[b, :, j]]  # (draws,) logits of the drawn tokens
            if tau == 0:
                assert (y[b, :, j] == first[b].argmax()).all()
                continue
            p = torch.softmax(first[b] / tau, -1)
            real = p > 0
            mean = (p[real] * first[b, real]).sum().item()
            sd = math.sqrt((p[real] * (first[b, real] - mean) ** 2).sum().item())
            assert abs(drawn.mean().item() - mean) < 5 * sd / math.sqrt(reps), (b, tau)


# fixed_sample for any temperatures: args.temperature plays the OPD row, others the GRPO rows
def translated_sample(lalm, args):
    fake, calls = fixed_sample(lalm), []

    def sample(_lalm, prompt_embeds, prompt_mask, n, temperature, max_new_tokens, fast="off"):
        calls.append((prompt_embeds.shape[0], n, temperature, max_new_tokens))
        if isinstance(temperature, list):
            temperature = [Args.temperature if t == args.temperature else Args.grpo_temperature for t in temperature]
        y, m = fake(_lalm, prompt_embeds, prompt_mask, n, temperature, max_new_tokens)
        calls[-1] += (y, m, fast)
        return y, m

    return sample, calls


# objective, extra args -> the sample calls (rows, n, temperature, max_new_tokens): x_a first, then x_t
ROLLOUT_CASES = [
    ("cord", {}, [(B_W, 1 + G_W, [1.0] + [1.5] * G_W, 6), (B_W, 1, 0.3, 6)]),
    ("cord", {"opd_rollout": "group", "reward_ref": "answer"}, [(B_W, G_W, [1.5] * G_W, 6)]),
    ("opd", {}, [(B_W, 1, [1.0], 6)]),
    ("grpo", {"reward_ref": "both"}, [(B_W, G_W, [1.5] * G_W, 6), (B_W, 1, 0.3, 6)]),
    ("sft", {}, [(B_W, 1, 0.3, 6)]),
    ("fkl", {}, [(B_W, 1, 1.0, 6)]),  # fkl: y ~ pi(.|x_t) at tau, on-text
]


@pytest.mark.parametrize("objective,extra,want", ROLLOUT_CASES)
def test_mut_rollouts_sample_what_each_objective_needs_and_the_step_logs_it(objective, extra, want, speech_data,
                                                                             qwen2_audio_dir, monkeypatch):
    """The sampler calls of one step (prompts, n, temperatures, T), the metrics train_step logs about them, the
    prompts it builds (the user's instruction and system prompt) and the teacher passes (only where a loss reads
    them)."""
    lalm, _, teacher, examples, args = wired(qwen2_audio_dir, speech_data, monkeypatch, objective=objective,
                                             ref_temperature=0.3, compile_rollout="on", instruction="Say the answer.",
                                             system_prompt="Be brief.", **extra)
    sample, calls = translated_sample(lalm, args)
    monkeypatch.setattr(cord, "sample", sample)
    built, taught, build_prompts, hidden = [], [], cord.build_prompts, teacher.hidden
    monkeypatch.setattr(cord, "build_prompts", lambda lalm_, ex, *a: built.append(a) or build_prompts(lalm_, ex, *a))
    monkeypatch.setattr(teacher, "hidden", lambda *a: taught.append(a) or hidden(*a))
    phases, Clock = [], plumbing.Clock  # the clock's phases in the order the step enters them
    monkeypatch.setattr(plumbing, "Clock", type("Clock", (Clock,), {
        "__call__": lambda self, name: phases.append(name) or Clock.__call__(self, name)}))
    judge = cord.make_judge(args, lalm) if objective in ("cord", "grpo", "opd+grpo") else None
    _, m = cord.train_step(lalm, teacher, judge, examples, args)
    assert [c[:4] for c in calls] == want
    assert [c[6] for c in calls] == ["on"] * len(want)  # --compile_rollout reaches every sampler call
    audio = [c for c in calls if isinstance(c[2], list)]
    if audio:  # rollout_tokens: every audio rollout token sampled; completion_len: mean length of the GRPO rows
        assert m["rollout_tokens"] == audio[0][5].sum().item()
        group = audio[0][5].view(B_W, -1, audio[0][5].shape[1])[:, -G_W:]  # (B, G, T) the group rows of each prompt
        if objective != "opd":
            assert m["completion_len"] == pytest.approx(group.sum(-1).float().mean().item())
    else:
        assert "rollout_tokens" not in m
    assert phases == ["t_prompts", "t_student", "t_rollout", "t_judge", "t_teacher", "t_student"]  # encoder + student
    assert {k for k in m if k.startswith("t_")} == set(phases)
    assert None not in m and built == [("Say the answer.", "Be brief.")]
    assert len(taught) == (objective in ("cord", "opd", "opd+grpo", "fkl"))  # sft and grpo read no teacher
    if objective in ("cord", "opd"):
        assert {"loss_tok", "kl_mean", "kl_top_share", "k_eff_frac", "kl_p50"} <= set(m)


GRPO_TAU_CASES = [  # objective, opd_rollout, grpo_logp_temperature, tau_grpo, k_frac -> tau of Eq. 10's log pi
    ("grpo", "separate", "sampling", 1.5, 0.0, 1.5),  # the defaults: the rollouts' temperature (departure 5)
    ("grpo", "separate", "one", 1.5, 0.0, 1.0),
    ("cord", "separate", "one", 1.5, 0.0, 1.0),
    ("cord", "group", "one", 1.5, 0.5, 1.0),  # the group's log pi of L_tok (tau = 1) is reused
    ("cord", "group", "sampling", 2.0, 0.04, 2.0),  # tau != 1: the reused log pi (tau = 1) would be wrong
    ("grpo", "separate", "sampling", 0.7, 0.0, 0.7),
    ("grpo", "separate", "sampling", 2.0, 0.0, 2.0),
    ("grpo", "separate", "sampling", 0.0, 0.0, 1.0),  # greedy GRPO rollouts: log pi at tau = 1
]


@pytest.mark.parametrize("objective,opd_rollout,mode,tau_grpo,k_frac,tau", GRPO_TAU_CASES)
def test_mut_student_loss_takes_log_pi_at_the_right_tau_and_K_per_sequence(objective, opd_rollout, mode, tau_grpo,
                                                                            k_frac, tau, speech_data, qwen2_audio_dir,
                                                                            monkeypatch):
    """Eq. 10's log pi(y_t) = log softmax(logits / tau)[y_t], against the model's own completion logits; the K of Eq. 4
    handed to the token loss is --k, or ceil(k_frac * T) per sequence with --k_frac (departure 8)."""
    lalm, _, teacher, examples, args = wired(qwen2_audio_dir, speech_data, monkeypatch, objective=objective, k=3,
                                             k_frac=k_frac, opd_rollout=opd_rollout, grpo_logp_temperature=mode,
                                             grpo_temperature=tau_grpo, reward_ref="answer")
    sample, _ = translated_sample(lalm, args)
    monkeypatch.setattr(cord, "sample", sample)
    seen, real_loss, real_tok, real_student = {}, cord.grpo_loss, cord.weighted_token_loss, cord.student_loss

    def loss_spy(logp, old_logp, A, mask, *a):
        seen["logp"] = logp.detach().clone()
        return real_loss(logp, old_logp, A, mask, *a)

    def tok_spy(D, mask, k, *a):
        seen["k"], seen["tok_mask"] = k, mask
        return real_tok(D, mask, k, *a)

    def student_spy(lalm_, x_a, m_a, ro, *a):
        seen["x_a"], seen["m_a"], seen["group"] = x_a.detach().clone(), m_a.clone(), ro.group
        return real_student(lalm_, x_a, m_a, ro, *a)

    monkeypatch.setattr(cord, "grpo_loss", loss_spy)
    monkeypatch.setattr(cord, "weighted_token_loss", tok_spy)
    monkeypatch.setattr(cord, "student_loss", student_spy)
    cord.train_step(lalm, teacher, cord.make_judge(args, lalm), examples, args)
    y, m = seen["group"]
    lalm.model.eval()
    with torch.no_grad():
        logits = cord.completion_logits(lalm, seen["x_a"].repeat_interleave(G_W, 0),
                                        seen["m_a"].repeat_interleave(G_W, 0), y, m)
    want = torch.log_softmax(logits.double() / tau, -1).gather(-1, y[..., None])[..., 0]  # (B*G, T)
    torch.testing.assert_close(seen["logp"][m].double(), want[m], atol=2e-5, rtol=1e-5)
    other = torch.log_softmax(logits.double() / (tau + 0.5), -1).gather(-1, y[..., None])[..., 0]  # another temperature
    assert (seen["logp"][m].double() - other[m]).abs().max() > 1e-3  # the check above can tell temperatures apart
    if objective == "cord":
        lengths = seen["tok_mask"].sum(-1)
        want_k = [max(1, math.ceil(k_frac * L)) for L in lengths.tolist()] if k_frac else None
        assert (torch.as_tensor(seen["k"]).tolist() == want_k) if k_frac else seen["k"] == 3


def test_mut_grpo_loss_default_eps_one_token_batches_and_clip_boundaries():
    """The default clip range is eps = 0.2; a batch of one token under either reduction; rho exactly on 1 -+ eps is not
    counted as clipped (the clip changes nothing there), and a zero advantage is never clipped."""
    g = torch.Generator().manual_seed(14)
    logp = torch.randn(3, 4, generator=g) * 0.3
    old = logp + torch.randn(3, 4, generator=g) * 0.3
    A, mask = torch.tensor([1.0, -0.5, 0.7]), torch.arange(4)[None] < torch.tensor([4, 2, 3])[:, None]
    # defaults: eps = 0.2, sequence reduction (lengths differ: not the token mean)
    loss, m = grpo_loss(logp, old, A, mask)
    want, clip = slow_grpo(logp, old, A, mask, 0.2, "sequence")
    assert loss.item() == pytest.approx(want, rel=1e-5) and m["clip_frac"] == pytest.approx(clip) and clip > 0
    # rho = 2, A = 1: clipped at 1.2
    one, one_mask = torch.tensor([[math.log(2.0), 0.0]]), torch.tensor([[True, False]])
    for reduction in ("sequence", "token"):
        loss, m = grpo_loss(one, torch.zeros(1, 2), torch.tensor([1.0]), one_mask, reduction=reduction)
        assert loss.item() == pytest.approx(-1.2) and m["clip_frac"] == 1.0
    lp = torch.tensor([[math.log(0.5), math.log(1.5)]] * 2 + [[math.log(3.0), math.log(0.1)]])  # rho = 0.5, 1.5 exactly
    assert torch.exp(lp[0]).tolist() == [0.5, 1.5]
    A = torch.tensor([-1.0, 1.0, 0.0])  # on the boundary that matters for its sign; A = 0 far outside the range
    assert grpo_loss(lp, torch.zeros(3, 2), A, torch.ones(3, 2, dtype=torch.bool), eps=0.5)[1]["clip_frac"] == 0.0


def test_mut_loss_defaults_are_the_papers_hyperparameters():
    """Called without them, Eq. 4-7 use K = 20, alpha = beta = 2 and the sum-of-weights normalisation (T > K + 1 here,
    so that K matters)."""
    s, t, mask = rand_case(B=2, T=25, V=5, seed=15)
    mask[1, 22:] = False
    want = slow_cord_loss(s, t, mask, 20, 2.0, 2.0, "weights")
    assert cord_token_loss(s, t, mask)[0].item() == pytest.approx(want, rel=1e-5)
    D = token_reverse_kl(s, t, mask)
    assert cord.weighted_token_loss(D, mask)[0].item() == pytest.approx(want, rel=1e-5)
    assert importance_weights(D, mask).tolist() == importance_weights(D, mask, 20, 2.0).tolist()
    assert position_weights(mask).tolist() == position_weights(mask, 2.0).tolist()


def test_mut_weighted_token_loss_small_weights_small_kl_and_one_token():
    """Eq. 7 is a weighted mean: one token gives its own D even when its weight is below 1 (alpha < 1); the logged
    top-K share is exact when the total KL is below 1, and a batch of one token has k_eff_frac = 1."""
    D, one = torch.tensor([[0.8]]), torch.ones(1, 1, dtype=torch.bool)
    loss, m = cord.weighted_token_loss(D, one, k=1, alpha=0.5, beta=1.0)
    assert loss.item() == pytest.approx(0.8) and m["k_eff_frac"] == 1.0 and m["kl_top_share"] == pytest.approx(1.0)
    D = torch.tensor([[0.02, 0.05, 0.01, 0.03]])  # total KL 0.11: top-2 share (0.05 + 0.03) / 0.11
    _, m = cord.weighted_token_loss(D, torch.ones(1, 4, dtype=torch.bool), k=2)
    assert m["kl_top_share"] == pytest.approx(0.08 / 0.11, rel=1e-5)
