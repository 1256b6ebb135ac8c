"""cordkit/rollout.py: the rollout decodes with LoRA merged into a copy of the weights; logits and tokens are the
adapter model's, the base weights are never written. And benchmarks/bench.py's honest floor, by hand."""
import types

import pytest
import torch
from torch import nn

import cord
from benchmarks import bench
from cordkit.manifest import load_manifest
from cordkit.rollout import is_lora_linear, merged_lora, merged_weight, wanted


def lora_lalm(model_dir, r=4, seed=0):  # the tiny Qwen2-Audio with trained-looking adapters (lora_B is 0 at init)
    lalm = cord.load_lalm(str(model_dir))
    params = cord.configure_trainable(lalm, "lora", r)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in lalm.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    lalm.model.eval()
    return lalm, params


def prompts(lalm, manifest, n=3):  # -> P, x_a (B, S, C)
    P = cord.build_prompts(lalm, load_manifest(str(manifest))[:n], cord.Args.instruction)
    with torch.no_grad():
        return P, cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])


def lora_layers(model):
    return [m for m in model.modules() if is_lora_linear(m)]


def test_merged_rollout_has_the_adapter_models_logits_and_greedy_tokens(speech_data, qwen2_audio_dir):
    """fp32: inside merged_lora every adapted linear is a plain nn.Linear over W + s B A; the completion logits
    equal the adapter model's (allclose) and differ from the base model's; greedy rows equal cord.sample's with
    the adapters, eager and static; on exit the very same LoRA modules are back."""
    lalm, _ = lora_lalm(qwen2_audio_dir)
    P, x = prompts(lalm, speech_data)
    layers = lora_layers(lalm.model)
    assert len(layers) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    with torch.no_grad():
        y, m = cord.sample(lalm, x, P["audio_mask"], 2, 0.0, 12)  # (6, 12) greedy, with the adapters
        x2, mask2 = x.repeat_interleave(2, 0), P["audio_mask"].repeat_interleave(2, 0)  # (6, S, C), (6, S)
        ref = cord.completion_logits(lalm, x2, mask2, y, m)  # (6, 12, V)
        with lalm.model.disable_adapter():
            base = cord.completion_logits(lalm, x2, mask2, y, m)
        with merged_lora(lalm.model, "on"):
            assert not lora_layers(lalm.model)  # swapped for plain linears
            attn = lalm.base.get_decoder().layers[0].self_attn
            assert type(attn.q_proj) is nn.Linear and attn.q_proj.bias is layers[0].base_layer.bias  # bias shared
            merged = cord.completion_logits(lalm, x2, mask2, y, m)  # (6, 12, V)
            y_e, m_e = cord.sample(lalm, x, P["audio_mask"], 2, 0.0, 12)
            y_s, m_s = cord.sample(lalm, x, P["audio_mask"], 2, 0.0, 12, fast="on")  # static KV cache path
    torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)
    assert (base - ref).abs().max() > 1e-2  # the adapters matter: a merge that dropped them would fail above
    assert torch.equal(y_e, y) and torch.equal(m_e, m) and torch.equal(y_s, y) and torch.equal(m_s, m)
    assert lora_layers(lalm.model) == layers  # the same objects back (optimizer state and hooks still attached)


def test_base_weights_bit_identical_after_many_steps_with_merged_rollouts(speech_data, qwen2_audio_dir):
    """12 AdamW steps on the adapters, each after a merged rollout: every base weight is bit for bit what it was,
    the adapters moved, and each rollout merged the adapters of that step (W + s B A, not a stale copy)."""
    lalm, params = lora_lalm(qwen2_audio_dir)
    P, x = prompts(lalm, speech_data, n=2)
    frozen = {n: p.detach().clone() for n, p in lalm.model.named_parameters() if not p.requires_grad}
    lora0 = [p.detach().clone() for p in params]
    layer = lalm.base.get_decoder().layers[1].mlp.down_proj  # one adapted linear to follow
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(12):
        with torch.no_grad(), merged_lora(lalm.model, "on"):
            W = lalm.base.get_decoder().layers[1].mlp.down_proj.weight  # (out, in) the merged copy
            B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight  # (out, r), (r, in)
            torch.testing.assert_close(W, layer.base_layer.weight + layer.scaling["default"] * B @ A)
            y, m = cord.sample(lalm, x, P["audio_mask"], 2, [0.0, 1.0], 6)  # (4, 6)
        lalm.model.train()
        logits = cord.completion_logits(lalm, x.repeat_interleave(2, 0), P["audio_mask"].repeat_interleave(2, 0), y, m)
        loss = -(cord.token_logprobs(logits, y) * m).sum() / m.sum()  # (per token, mean over real tokens)
        opt.zero_grad(), loss.backward(), opt.step()
        lalm.model.eval()
    for n, p in lalm.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # bit-identical: merging never wrote the base weights
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, lora0))  # the adapters trained


def test_merged_weight_sums_in_fp32_and_casts_once():
    """bf16 weights: W + s B A is summed in fp32 and rounded once to bf16 (peft's in-place merge would round the
    sum in bf16 and its unmerge round again, so W drifts)."""
    layer = types.SimpleNamespace(
        base_layer=nn.Linear(3, 2, bias=False, dtype=torch.bfloat16), active_adapters=["default"],
        lora_A={"default": nn.Linear(3, 1, bias=False, dtype=torch.bfloat16)},
        lora_B={"default": nn.Linear(1, 2, bias=False, dtype=torch.bfloat16)}, scaling={"default": 2.0})
    with torch.no_grad():
        layer.base_layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [256.0, 0.0, 0.0]]))
        layer.lora_A["default"].weight.fill_(0.5)
        layer.lora_B["default"].weight.copy_(torch.tensor([[0.25], [0.75]]))
    W = merged_weight(layer)
    assert W.dtype == torch.bfloat16
    assert W[0].tolist() == [1.25, 2.25, 3.25]  # row 0: W + 2 * 0.25 * 0.5 exactly representable
    assert W[1, 0].item() == 256.0 and W[1, 1].item() == 0.75  # row 1: 256.75 rounds to 256 in bf16 (8 bits)


@pytest.mark.parametrize("mode,merged", [("on", True), ("auto", False), ("off", False)])
def test_train_step_rollouts_run_merged_exactly_when_asked(mode, merged, speech_data, qwen2_audio_dir, monkeypatch):
    """--merge_lora: on merges for the rollout, auto only on CUDA (so not here), off never; the student forward
    after it runs the adapters, which get gradients."""
    lalm, params = lora_lalm(qwen2_audio_dir)
    args = cord.Args(model=str(qwen2_audio_dir), objective="cord", group_size=2, max_new_tokens=4, batch_size=2,
                     train="lora", lora_r=4, reward_ref="answer", merge_lora=mode)
    teacher, judge = cord.Teacher(lalm, args.teacher), cord.make_judge(args, lalm)
    seen, sample = [], cord.sample

    def spy(lalm_, *a, **k):  # whether the decoder held LoRA layers when the rollout sampled
        seen.append(bool(lora_layers(lalm_.model)))
        return sample(lalm_, *a, **k)

    monkeypatch.setattr(cord, "sample", spy)
    examples = load_manifest(str(speech_data))[:2]
    loss, _ = cord.train_step(lalm, teacher, judge, examples, args)
    assert seen and seen == [not merged] * len(seen)
    assert torch.isfinite(loss) and lora_layers(lalm.model)
    assert all(p.grad is not None for p in params)


def test_merge_mode_auto_means_on_cuda():
    assert wanted("auto", "cuda:0") and wanted("auto", torch.device("cuda")) and not wanted("auto", "cpu")
    assert wanted("on", "cpu") and not wanted("off", "cuda")


def test_merged_lora_refuses_what_it_cannot_merge(qwen2_audio_dir):
    lalm, _ = lora_lalm(qwen2_audio_dir)
    lora_layers(lalm.model)[0].lora_bias["default"] = True  # a variant W + s B A does not reproduce
    with pytest.raises(ValueError, match="merge_lora off"):
        with merged_lora(lalm.model, "on"):
            pass
    assert len(lora_layers(lalm.model)) == 14  # nothing swapped


# ----------------------------------------------------------------------------------------------
# bench.py: ms per decode step against the honest floor (weights + the live KV cache, read once per step)


def test_honest_floor_counts_weights_and_the_filled_cache_per_row():
    """2 layers, 2 key/value heads of size 8, fp32: keys + values of one position = 2 * 2 * 2 * 8 * 4 = 256 bytes."""
    decoder = nn.Linear(1, 1)  # only its parameters' dtype (fp32) is read
    decoder.config = types.SimpleNamespace(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                           num_hidden_layers=2)  # head_dim = 32 / 4 = 8
    lalm = types.SimpleNamespace(base=types.SimpleNamespace(get_decoder=lambda: decoder))
    assert bench.kv_bytes_per_token(lalm) == 256
    # one call: 4 decode steps of 3 rows over a prompt of S = 10 (T = 6 asked, EOS came first), 8 ms in all.
    # step i reads the 10 prompt positions and the i + 1 written so far: 11, 12, 13, 14 -> mean 12.5 per row
    calls = [(4, 3, 0.008, 10, 9, 6)]  # (steps, rows, seconds, S, tokens, T)
    r = bench.bandwidth_figures(calls, weight_bytes=1_000_000, kv_per_token=256, bandwidth_gbs=1.0)
    assert r["decode_ms_per_step"] == 2.0  # 8 ms / 4 steps
    assert r["live_kv_mb_per_step"] == 0.0096  # 3 rows x 12.5 positions x 256 B = 9,600 B
    assert r["floor_ms_per_step"] == 1.0096  # (1,000,000 + 9,600) B at 1 GB/s
    assert r["x_floor"] == round(2.0 / 1.0096, 2)  # 1.98
    assert r["weights_only_ms_per_step"] == 1.0  # the old limit, for comparison
    assert r["floor_tokens_per_s"] == round(3 / 1.0096e-3)  # 3 rows a step at the floor: 2,971
    assert r["static_kv_cache_mb"] == 0.012288  # what the fast path allocates: S + T = 16 columns a row
    two = bench.bandwidth_figures(calls + [(2, 1, 0.002, 4, 2, 2)], 1_000_000, 256, 1.0)
    # + a call of 2 steps of 1 row over S = 4: reads 5, 6 -> 11 positions in all; per step over 6 steps:
    assert two["live_kv_mb_per_step"] == round((3 * 50 + 11) * 256 / 6 / 1e6, 6)  # 3 rows x (11+12+13+14) = 150


def test_gpu_rollout_script_runs_end_to_end_on_the_tiny_model(tmp_path):
    """benchmarks/gpu_rollout.sh, the one-script GPU benchmark, with the tiny model on the CPU: every stage finishes,
    its JSON has the figures summary.md tabulates, and the profile file holds both tables (so the GPU run will not
    die on a typo)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, MODEL="tiny", PROMPTS="1", AUDIO_SECONDS="1", GROUP="1", T="4", STEPS="1", WARMUP="0",
               PROFILE_TOKENS="3", CHECK_PROMPTS="1", CHECK_T="4", BUDGET="500", PYTHON=sys.executable,
               WHEELS="")  # this Python and its packages
    proc = subprocess.run(["bash", "benchmarks/gpu_rollout.sh", str(tmp_path)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("check", "sampler"):  # check: the tiny model in fp32, whatever MODEL is
        sampler = json.loads((tmp_path / f"{name}.json").read_text())
        assert {"eager", "fast", "fast+merged", "fast+merged+b4"} <= sampler.keys()
        for fast in ("fast", "fast+merged", "fast+merged+b4"):
            assert sampler[fast]["greedy_rows_equal"] == "1/1 of eager's"
    for name in ("step_fast", "step_eager"):
        step = json.loads((tmp_path / f"{name}.json").read_text())
        assert step["t_step"] > 0 and step["decode_steps"] > 0 and "live_kv_mb_per_step" in step
    profile = (tmp_path / "profile.txt").read_text()
    assert "## graph replay: top 30" in profile and "## uncaptured (graph=False): top 30" in profile
    assert len(list(tmp_path.iterdir())) <= 8  # what a device run brings back from $OUT
    assert "== step_eager" in (tmp_path / "logs.txt").read_text()
    summary = (tmp_path / "summary.md").read_text()
    assert "torch" in summary and "did not finish" not in summary and "skipped" not in summary
    assert "| sampler fast+merged |" in summary and "| check fast+merged+b4 |" in summary
