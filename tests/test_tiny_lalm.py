"""tiny_lalm.py: the demo's model builder (real Qwen2-Audio classes, a tokenizer trained here, real speech)."""
import itertools
import json

import numpy as np
import torch

from demo import tiny_lalm
from data_gen import read_manifest, synthesize, to_16k
from judge import RuleJudge


# ----------------------------------------------------------------------------------------------
# tiny_lalm.py: the demo's model builder

TINY_QUESTIONS = ["What is seven plus six minus two?", "What is four minus one minus two?"]


def _tiny(corpus=TINY_QUESTIONS):
    processor = tiny_lalm.build_processor([q + " 7+6=13. 13-2=11. The answer is 11." for q in corpus] * 4,
                                          vocab_size=300)
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
        mine = tiny_lalm.text_lm(model)(inputs_embeds=emb, attention_mask=enc["attention_mask"]).logits
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
    assert model2.get_output_embeddings().weight.data_ptr() == model2.get_input_embeddings().weight.data_ptr()


def test_tiny_solution_and_split():
    assert tiny_lalm.solution({"written": "What is 4 - 1 - 2?"}) == "4-1=3. 3-2=1. The answer is 1."
    problems = tiny_lalm.chain_problems(seed=0)
    assert len({p["written"] for p in problems}) == len(problems) > 2000
    assert RuleJudge(ground_truth=True)([tiny_lalm.solution(p) for p in problems],
                                        [p["answer"] for p in problems]) == [1.0] * len(problems)
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
    train, dev, ev = (read_manifest(tmp_path / "tiny" / "data" / s / "manifest.jsonl")
                      for s in ("train", "dev", "eval"))
    assert len(train) == 6 and len(ev) == 4
    q = [{r["written"] for r in rows} for rows in (train, dev, ev)]
    assert not (q[0] & q[1]) and not (q[0] & q[2]) and not (q[1] & q[2])            # disjoint questions
    # second call: loaded from the cache, same weights
    model2, *_ = tiny_lalm.load_or_build(tmp_path / "tiny", **kw)
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(r["augment"] for r in train if "augment" in r) and not any("augment" in r for r in dev + ev)
    # a fresh clone: the shipped model (same settings) is loaded, only what the demo reads is voiced
    tiny_lalm.ship(tmp_path / "tiny", tmp_path / "shipped")
    model3, processor3, train3, eval3 = tiny_lalm.load_or_build(tmp_path / "fresh", **kw, shipped=tmp_path / "shipped",
                                                                demo_train=2)
    shipped = json.loads((tmp_path / "shipped" / "tokenizer_config.json").read_text())  # readable by 4.57 too
    assert shipped["tokenizer_class"] != "TokenizersBackend"
    assert not isinstance(shipped.get("extra_special_tokens"), list)
    text = "<|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|>What is two plus three?<|im_end|>"
    assert processor3.tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    assert len(read_manifest(train3)) == 2 and len(read_manifest(eval3)) == 4
    assert not (tmp_path / "fresh" / "model.safetensors").exists()
    for (k, a), (_, b) in zip(model.state_dict().items(), model3.state_dict().items()):
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
    # one word frame at 0: error 1 of 3 word frames
    off[0, 1] = 0.0
    # word frames: errors (1, 0, 0) -> mean 1/3; blank frames: 0; loss = 0.5 * 1/3
    assert abs(tiny_lalm.pseudo_audio_loss(off, a_len, slots, E, blank=0).item() - 1 / 6) < 1e-6


def test_tiny_voices_from_pip_and_augmentations():
    """espeak-ng voices come from the library piper-tts ships (no system program needed); data_gen's augmentations
    change what they should: speed the length, vtlp not the length (identity at 1), noise at the asked SNR."""
    from data_gen import augment, draw_augment, parse_augment, synthesize, vtlp
    a, sr = synthesize("What is seven plus six?", "espeak:en-gb-x-rp+m3:170")
    b, _ = synthesize("What is seven plus six?", "espeak:en-us+f3:170")
    y = to_16k(a, sr)
    assert sr == 22050 and 1.0 < len(y) / 16000 < 3.0 and np.sqrt(np.mean(y ** 2)) > 0.01 and len(a) != len(b)
    assert {tiny_lalm.engine(v) for v in tiny_lalm.VOICES} == {"hibari", "piper", "espeak"}
    assert abs(len(augment(y, {"speed": 1.25})) - len(y) / 1.25) <= 1 and len(augment(y, {"vtlp": 0.9})) == len(y)
    np.testing.assert_allclose(vtlp(y, 1.0), y, atol=1e-5)
    noisy = augment(y * 0.5, {"snr": 10.0}, "k")
    snr = 10 * np.log10(np.mean((y * 0.5) ** 2) / np.mean((noisy - y * 0.5) ** 2))
    assert abs(snr - 10.0) < 0.5
    spec = parse_augment(tiny_lalm.AUGMENT)
    draws = [draw_augment(spec, f"id{i}") for i in range(200)]
    assert draws == [draw_augment(spec, f"id{i}") for i in range(200)]                 # seeded by the clip id
    assert 0.35 < np.mean(["vtlp" in d for d in draws]) < 0.65                         # p = 0.5
    assert all(0.88 <= d["vtlp"] <= 1.12 for d in draws if "vtlp" in d)
