"""Benchmarks for cord.py (as nanoGPT's bench.py), run from the repository root:
the per-step time split and the memory of the exact KL.

    python -m benchmarks.bench --model tiny --steps 5                   # a CORD step on the tiny model (CPU)
    python -m benchmarks.bench --model qwen2-audio-7b --lora --gradient-checkpointing --prompts 8 --seconds 10
                                                             # random-init Qwen2-Audio-7B-Instruct config (GPU)
    python -m benchmarks.bench --model tiny --compile-rollout off       # the eager sampler (before/after the fast path)
    python -m benchmarks.bench --loss-memory                            # naive vs chunked Eq. 2 at V = 151,936,
                                                                        # T = 512, B = 2
    python -m benchmarks.bench --judge                                  # RuleJudge on 1,000 pairs
    python -m benchmarks.bench --sampler --max-new-tokens 200           # cord.sample alone: eager vs fast
                                                                        # (tokens/s, greedy rows)
    python -m benchmarks.bench --sampler --lora --samplers eager,fast,fast+merged,fast+merged+b4 --profile prof.txt
                                     # + LoRA merged for the rollout, + cache read in 4 buckets; torch.profiler tables
    bash benchmarks/gpu_rollout.sh                                      # the 7B LoRA rollout figures, one GPU script

Step mode prints the time split (rollout / judge / teacher / student fwd+bwd / optimizer), the
overhead = step - (rollout + teacher + student + optimizer), rollout tokens/s and peak memory, and
the decode loop: ms per decode step (a sampler call's time over its steps, prefill included) against
the honest floor, the time to read once what a step must read: the weights (decoder layers + head) and the live
KV cache (every row's prompt and tokens so far); the weights alone are reported beside it.
Loss-memory mode runs each variant in a fresh process and reports its peak memory (CUDA peak
on a GPU, process max-RSS on CPU) and the ratio; values and gradients are checked to agree.
"""
import argparse
import contextlib
import functools
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import cord
from cordkit import chunked
from cordkit import plumbing
from cordkit import rollout
from cordkit.families import LALM, qwen2_audio_features

# Qwen2-Audio-7B-Instruct's configuration (config.json of the released model), for random-init timing.
QWEN2_AUDIO_7B = dict(
    audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=128, d_model=1280, encoder_layers=32,
                      encoder_attention_heads=20, encoder_ffn_dim=5120, max_source_positions=1500),
    text_config=dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                     max_position_embeddings=8192, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# --loss-memory: one variant per process, so each peak is its own


VARIANTS = ["logits-naive", "logits-chunked", "hidden-naive", "hidden-chunked", "hidden-fused"]


def loss_memory_child(variant: str, V: int, T: int, B: int, C: int, dtype: str, device: str) -> dict:
    """Forward + backward of L_tok (Eq. 2-7) plus the GRPO log-probs, from logits or from hidden states.

    logits-*: (B, T, V) student and teacher logits are the inputs (what token_reverse_kl takes).
    hidden-*: the inputs are the final hidden states (B, T, C) and the lm_head weight (V, C), as in a
    training step; naive/chunked make the logits with h @ W.T, fused never makes them.
    """
    dev, dt = torch.device(device), getattr(torch, dtype)
    g = torch.Generator(device=dev).manual_seed(0)
    # no temporaries
    new = lambda *shape, scale=1.0: torch.empty(*shape, dtype=dt, device=dev).normal_(0, scale, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    mask[1, T // 2:] = False
    y = torch.randint(0, V, (B, T), generator=g, device=dev)
    if variant.startswith("logits"):
        leaf, t = new(B, T, V, scale=2.0).requires_grad_(True), new(B, T, V, scale=2.0)
    else:
        leaf, h_t, W = new(B, T, C).requires_grad_(True), new(B, T, C), new(V, C, scale=C ** -0.5).requires_grad_(True)
    if dev.type == "cuda":
        torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    inputs_mb = peak_memory_mb(dev) if dev.type == "cpu" else torch.cuda.memory_allocated() / 2**20
    clock = time.perf_counter()
    if variant == "hidden-fused":
        D, logp = chunked.fused_kl_and_logprobs(leaf, h_t, W, y, mask, chunk_size=32)
    else:
        chunk = None if variant.endswith("naive") else 32
        s, t = (leaf, t) if variant.startswith("logits") else (leaf @ W.T, h_t @ W.T)
        D, logp = chunked.kl(s, t, mask, chunk), chunked.logprobs(s, y, chunk)
    loss = cord.weighted_token_loss(D, mask)[0] + (logp * mask).sum() / mask.sum()
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    grad = leaf.grad.float()
    return {"variant": variant, "loss": loss.item(), "grad_sum": grad.abs().sum().item(),
            "grad_probe": grad.flatten()[:64].tolist(), "seconds": time.perf_counter() - clock,
            "peak_mb": peak_memory_mb(dev), "inputs_mb": inputs_mb}


def loss_memory(a) -> dict:
    rows = {}
    for variant in VARIANTS:
        cmd = [sys.executable, "-m", "benchmarks.bench", "--loss-memory-child", variant,
               "--V", str(a.V), "--T", str(a.T), "--B", str(a.B), "--C", str(a.C),
               "--dtype", a.dtype, "--device", a.device]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
        if out.returncode:
            raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    summary = {"V": a.V, "T": a.T, "B": a.B, "C": a.C, "dtype": a.dtype, "device": a.device,
               "memory": "CUDA max_memory_allocated" if a.device.startswith("cuda") else "process max-RSS"}
    for v, r in rows.items():
        base = rows[v.split("-")[0] + "-naive"]
        summary[v] = {"peak_mb": round(r["peak_mb"]), "above_inputs_mb": round(r["peak_mb"] - r["inputs_mb"]),
                      "ratio_to_naive": round(r["peak_mb"] / base["peak_mb"], 3), "seconds": round(r["seconds"], 2),
                      "same_loss": abs(r["loss"] - base["loss"]) <= 1e-5 * abs(base["loss"]),
                      "same_grad": bool(np.allclose(r["grad_probe"], base["grad_probe"], rtol=1e-3, atol=1e-8))
                      and abs(r["grad_sum"] - base["grad_sum"]) <= 1e-3 * base["grad_sum"]}
    print(json.dumps(summary, indent=1))
    return summary


# ----------------------------------------------------------------------------------------------
# --judge: RuleJudge on 1,000 pairs of ~150-word completions with mixed answer formats


def judge_bench(n: int = 1000) -> dict:
    import random

    from judge import RuleJudge

    rnd = random.Random(0)
    filler = ("First we read the problem carefully and write down what is known. "
              "Then we set up the equation, simplify both sides and check the units. ") * 5

    def answer():
        a, d = rnd.randint(1, 999), rnd.randint(2, 99)
        return rnd.choice([(f"\\boxed{{{a}}}", str(a)), (f"\\boxed{{\\frac{{{a}}}{{{d}}}}}", f"{a / d:.6f}"),
                           (f"the answer is {a:,} dollars.", f"{a} dollars"),
                           (f"The answer is ({'ABCD'[a % 4]}).", "ABCD"[a % 4]),
                           (f"so \\boxed{{{a}\\sqrt{{{d}}}}}", f"\\sqrt{{{a * a * d}}}"),
                           (f"so {a} apples in total.", f"Answer: {a}")])

    preds, refs = [], []
    for i in range(n):
        a, b = answer()
        b = str(rnd.randint(1000, 9999)) if i % 2 else b  # every other pair disagrees
        preds.append(filler + a)
        refs.append(filler + f"So the answer is \\boxed{{{b}}}." if i % 3 else b)  # 2/3 completions, 1/3 bare answers
    judge = RuleJudge()
    judge(["\\boxed{\\frac{1}{2}}"], ["0.5"])  # warm up math-verify's lazy imports
    wall, cpu = time.perf_counter(), time.process_time()
    rewards = judge(preds, refs)
    out = {"pairs": n, "wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2),
           "mean_reward": round(sum(rewards) / n, 3)}
    print(json.dumps(out, indent=1))
    return out


# ----------------------------------------------------------------------------------------------
# step mode


class DecodeTimer:
    """Stands in for cord.sample: records (decode steps, rows, seconds, prompt columns S, tokens, T asked) per call,
    synchronised on CUDA."""

    def __init__(self, sample, device):
        self.sample, self.device, self.calls = sample, device, []

    def __call__(self, *args, **kwargs):
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        clock = time.perf_counter()
        y, m = self.sample(*args, **kwargs)
        sync()
        seconds = time.perf_counter() - clock
        self.calls.append((y.shape[1], y.shape[0], seconds, args[1].shape[1], int(m.sum()), args[5]))
        return y, m


# the weights one decode step reads: decoder layers + norm + head, not the embedding table
def decode_weight_bytes(lalm) -> int:
    head = list(lalm.base.get_output_embeddings().parameters())
    skip = {id(p) for p in lalm.base.get_input_embeddings().parameters()} - {id(p) for p in head}
    params = {id(p): p for p in [*lalm.base.get_decoder().parameters(), *head] if id(p) not in skip}
    return sum(p.numel() * p.element_size() for p in params.values())


def kv_bytes_per_token(lalm) -> int:  # keys + values of one position in every layer
    cfg, p = lalm.base.get_decoder().config, next(lalm.base.get_decoder().parameters())
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (2 * cfg.num_hidden_layers * getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * head_dim
            * p.element_size())


def live_kv_positions(S: int, steps: int) -> int:  # positions a row's decode steps read in all, over one call
    """Decode step i (0-based) writes column S + i and reads the S prompt columns and the i + 1 written so far:
    sum over i < steps of (S + i + 1) = steps * S + steps * (steps + 1) / 2."""
    return steps * S + steps * (steps + 1) // 2


BANDWIDTH_GBS = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0}  # HBM, GB/s


def default_bandwidth_gbs(device_name: str):  # the data-sheet HBM bandwidth of a known GPU, else None
    return next((v for k, v in BANDWIDTH_GBS.items() if k in device_name), None)


def bandwidth_figures(calls, weight_bytes: int, kv_per_token: int, bandwidth_gbs) -> dict:
    """ms per decode step against the honest floor: each step reads, once, the weights (decoder layers + head) and
    the live KV cache (every row's filled positions: prompt + tokens so far), at the device's bandwidth.

    calls: (steps, rows, seconds, S, tokens, T) per sampler call. The floor is what an exact decoder must read;
    the fast path's static cache (rows x (S + T) positions, allocated whole) is reported beside it.
    """
    steps, seconds = sum(c[0] for c in calls), sum(c[2] for c in calls)
    kv = sum(c[1] * live_kv_positions(c[3], c[0]) for c in calls) * kv_per_token / max(steps, 1)  # B per step, mean
    static = sum(c[1] * (c[3] + c[5]) for c in calls) * kv_per_token / max(len(calls), 1)  # B, mean per call
    out = {"decode_steps": steps, "decode_ms_per_step": round(1000 * seconds / steps, 2) if steps else None,
           "decode_weight_mb": round(weight_bytes / 1e6, 6), "live_kv_mb_per_step": round(kv / 1e6, 6),
           "static_kv_cache_mb": round(static / 1e6, 6), "bandwidth_gbs": bandwidth_gbs}
    if bandwidth_gbs and steps:
        floor_ms = 1000 * (weight_bytes + kv) / (bandwidth_gbs * 1e9)  # weights + live cache, read once per step
        rows = sum(c[0] * c[1] for c in calls) / steps  # rows per step, mean
        out.update(floor_ms_per_step=round(floor_ms, 4), x_floor=round(1000 * seconds / steps / floor_ms, 2),
                   floor_tokens_per_s=round(rows / floor_ms * 1000),
                   weights_only_ms_per_step=round(1000 * weight_bytes / (bandwidth_gbs * 1e9), 4))  # the old limit
    return out


def build_bench_model(name: str, dtype, device):
    """'tiny' (the demo's size) or 'qwen2-audio-7b' (random weights, the real configuration)."""
    from demo.tiny_lalm import build_model, build_processor
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    words = "what is plus minus times the answer one two three four five six seven eight nine ten".split()
    if name == "tiny":
        processor = build_processor([" ".join(words)] * 20, vocab_size=300)
        return build_model(processor).to(device, dtype), processor
    processor = build_processor([" ".join(words)] * 20, vocab_size=300, chunk_seconds=30, n_mels=128)
    tok = processor.tokenizer
    config = Qwen2AudioConfig(**QWEN2_AUDIO_7B, audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
                              pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in bf16 on the GPU
    with torch.device(device):
        model = Qwen2AudioForConditionalGeneration(config)
    torch.set_default_dtype(default)
    model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def bench_setup(a):  # -> lalm, `a.prompts` examples of `a.seconds` of noise, build seconds
    device = torch.device(a.device)
    dtype = torch.bfloat16 if (a.dtype == "bfloat16") else torch.float32
    clock = time.perf_counter()
    if a.model in ("tiny", "qwen2-audio-7b"):
        model, processor = build_bench_model(a.model, dtype, device)
        path = tempfile.mkdtemp()
        processor.save_pretrained(path)  # tokenizer, features, template; weights stay in memory
        lalm = LALM(model, processor.tokenizer, processor.feature_extractor, processor.chat_template,
                         qwen2_audio_features, model.config.audio_token_index, [], [processor.tokenizer.eos_token_id],
                         processor)
        n_tok = len(processor.tokenizer)
        lalm.suppress_ids = [model.config.audio_token_index] + list(range(n_tok, model.config.text_config.vocab_size))
    else:
        lalm = cord.load_lalm(a.model, dtype, device)
    build_s = time.perf_counter() - clock
    # prompts of `seconds` of speech-like noise (timing does not depend on content)
    import soundfile as sf

    root = tempfile.mkdtemp()
    rng = np.random.default_rng(0)
    examples = []
    for i in range(a.prompts):
        audio = (0.05 * rng.standard_normal(int(16000 * a.seconds))).astype(np.float32)
        sf.write(f"{root}/{i}.wav", audio, 16000)
        examples.append({"id": str(i), "audio_path": Path(f"{root}/{i}.wav"), "text": "what is two plus three " * 3,
                         "answer": "5"})
    return lalm, examples, build_s


def sampler_mode(name: str) -> dict:  # "eager" | "fast" [+merged] [+b<n>] -> cord.sample's fast, merge, buckets
    parts = name.split("+")
    if parts[0] not in ("eager", "fast") or any(p != "merged" and not re.fullmatch(r"b\d+", p) for p in parts[1:]):
        raise SystemExit(f"--samplers: {name!r} is not eager | fast, optionally +merged and +b<n> (cache buckets)")
    buckets = next((int(p[1:]) for p in parts[1:] if p.startswith("b")), 1)
    return {"fast": "on" if parts[0] == "fast" else "off", "merge": "on" if "merged" in parts else "off",
            "buckets": buckets}


@contextlib.contextmanager
def sampler_setup(lalm, merge: str, buckets: int):  # inside, cord.sample decodes merged and/or with cache buckets
    static_sample = chunked.static_sample
    chunked.static_sample = functools.partial(static_sample, buckets=buckets)  # cord.sample calls it by this name
    try:
        with rollout.merged_lora(lalm.model, merge, lalm.device):
            yield
    finally:
        chunked.static_sample = static_sample


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_sampler(lalm, x, mask, taus, T: int, mode: dict, path: str):
    """torch.profiler over one cord.sample call of T tokens in `mode` (a few replayed decode steps after the
    prefill and the capture), then the same call uncaptured (graph=False: every kernel of the step by name);
    the top kernels by device time (CPU time on a CPU) go to `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = lalm.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"  # table() reads cuda as device (torch >= 2.4)
    out = [f"# cord.sample, {len(taus)} rows per prompt x {x.shape[0]} prompts, S = {x.shape[1]}, T = {T}, {mode}"]
    static_sample = chunked.static_sample
    for title, graph in (("graph replay", None), ("uncaptured (graph=False)", False)):
        try:
            with sampler_setup(lalm, mode["merge"], mode["buckets"]):
                chunked.static_sample = functools.partial(chunked.static_sample, graph=graph)
                cord.sample(lalm, x, mask, len(taus), taus, T, fast=mode["fast"])  # warm (allocator, capture path)
                sync(lalm.device)
                with profile(activities=activities) as prof:
                    cord.sample(lalm, x, mask, len(taus), taus, T, fast=mode["fast"])
                    sync(lalm.device)
            out += [f"\n## {title}: top 30 by {key}\n", prof.key_averages().table(sort_by=key, row_limit=30)]
        except RuntimeError as e:  # a profiler that cannot see inside a graph capture must not lose the other table
            out += [f"\n## {title}: failed: {e}\n"]
        finally:
            chunked.static_sample = static_sample
    Path(path).write_text("\n".join(out))
    print(f"profile -> {path}", flush=True)


def sampler_bench(a) -> dict:
    """--sampler: cord.sample alone as rollouts() calls it (B prompts x (1 + G) rows at tau 1.0 / 1.5), each of
    --samplers (eager, fast, fast+merged, ...) in turn, `a.steps` timed calls each after one warm-up (a merged
    sampler merges before every call, timed apart as merge_ms); then each sampler's greedy rows (n = 1) against
    the first's."""
    lalm, examples, build_s = bench_setup(a)
    if a.lora:
        cord.configure_trainable(lalm, "lora")
    lalm.model.eval()
    device, taus, T = lalm.device, [1.0] + [1.5] * a.group_size, a.max_new_tokens
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = {"model": a.model, "device": name, "dtype": a.dtype, "prompts": a.prompts, "rows": a.prompts * len(taus),
           "max_new_tokens": T, "lora": a.lora, "build_s": round(build_s, 1)}
    a.bandwidth_gbs = a.bandwidth_gbs or default_bandwidth_gbs(name)
    samplers = (a.samplers or "eager,fast" + ",fast+merged" * a.lora).split(",")
    greedy = {}
    with torch.no_grad():
        P = cord.build_prompts(lalm, examples, cord.Args.instruction)
        x = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])  # (B, S, C)
        for label in samplers:
            mode, timer, merge_s = sampler_mode(label), DecodeTimer(cord.sample, device), []
            for _ in range(1 + a.steps):
                sync(device)
                clock = time.perf_counter()
                with sampler_setup(lalm, mode["merge"], mode["buckets"]):
                    sync(device)
                    merge_s.append(time.perf_counter() - clock)
                    timer(lalm, x, P["audio_mask"], len(taus), taus, T, fast=mode["fast"])
            calls = timer.calls[1:]
            r = bandwidth_figures(calls, decode_weight_bytes(lalm), kv_bytes_per_token(lalm), a.bandwidth_gbs)
            r["rollout_tokens_per_s"] = round(sum(c[4] for c in calls) / sum(c[2] for c in calls), 1)
            r["seconds_per_call"] = round(sum(c[2] for c in calls) / len(calls), 3)
            r["merge_ms"] = round(1000 * float(np.mean(merge_s[1:])), 1)
            out[label] = r
            print(json.dumps({label: r}), flush=True)
            with sampler_setup(lalm, mode["merge"], mode["buckets"]):
                greedy[label] = cord.sample(lalm, x, P["audio_mask"], 1, 0.0, T, fast=mode["fast"])
    y0_label = samplers[0]
    y0, m0 = greedy[y0_label]
    for label in samplers[1:]:
        y1, m1 = greedy[label]
        n = min(y0.shape[1], y1.shape[1])
        same = ((y0[:, :n] == y1[:, :n]) | ~(m0[:, :n] | m1[:, :n])).cumprod(1).sum(1)  # (B,) equal up to a difference
        out[label].update(greedy_rows_equal=f"{int((same == n).sum())}/{len(same)} of {samplers[0]}'s",
                          greedy_tokens_equal_before_first_difference=same.tolist(),
                          speedup=round(out[label]["rollout_tokens_per_s"] / out[y0_label]["rollout_tokens_per_s"], 2))
    print(json.dumps(out, indent=1))
    if a.json:  # now: a profiler that takes the process down must not take the timings with it
        Path(a.json).write_text(json.dumps(out, indent=1))
    if a.profile:
        with torch.no_grad():
            profile_sampler(lalm, x, P["audio_mask"], taus, a.profile_tokens, sampler_mode(samplers[-1]), a.profile)
    return out


def step_bench(a) -> dict:
    lalm, examples, build_s = bench_setup(a)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if (a.dtype == "bfloat16") else torch.float32
    args = cord.Args(model="bench", objective=a.objective, group_size=a.group_size, max_new_tokens=a.max_new_tokens,
                     batch_size=a.prompts, train="lora" if a.lora else "all",
                     gradient_checkpointing=a.gradient_checkpointing,
                     chunk_size=a.chunk_size, reward_ref="answer", compile_rollout=a.compile_rollout,
                     merge_lora=a.merge_lora)
    params = cord.configure_trainable(lalm, args.train, args.lora_r)
    if a.gradient_checkpointing:
        lalm.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(params, lr=args.lr)
    teacher, judges = cord.Teacher(lalm, args.teacher), cord.make_judge(args, lalm)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rows, timer = [], DecodeTimer(cord.sample, device)
    cord.sample = timer  # rollouts() calls it by this name
    chunked.static_sample = functools.partial(chunked.static_sample, buckets=a.buckets)  # cord.sample's fast path
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            timer.calls.clear()
        clock = plumbing.Clock(device)
        with clock("t_step"):
            opt.zero_grad(set_to_none=True)
            _, m = cord.train_step(lalm, teacher, judges, examples, args)
            with clock("t_optimizer"):
                torch.nn.utils.clip_grad_norm_(params, 1.0), opt.step()
        m.update(clock.times)
        if step >= a.warmup:
            rows.append(m)
        print(json.dumps({k: round(v, 4) for k, v in m.items() if k.startswith("t_")}), flush=True)
    mean = lambda k: float(np.mean([r.get(k, 0.0) for r in rows]))
    out = {k: round(mean(k), 3)
           for k in ("t_step", "t_prompts", "t_rollout", "t_judge", "t_teacher", "t_student", "t_optimizer")}
    core = out["t_rollout"] + out["t_teacher"] + out["t_student"] + out["t_optimizer"]
    out["overhead_s"] = round(out["t_step"] - core, 3)
    out["overhead_pct"] = round(100 * out["overhead_s"] / out["t_step"], 1)
    new_tokens = mean("rollout_tokens")
    out["rollout_tokens_per_s"] = round(new_tokens / out["t_rollout"], 1) if out["t_rollout"] else None
    out["peak_memory_gb"] = round(peak_memory_mb(device) / 1024, 2)
    if a.bandwidth_gbs is None and device.type == "cuda":
        a.bandwidth_gbs = default_bandwidth_gbs(torch.cuda.get_device_name())
    out.update(bandwidth_figures(timer.calls, decode_weight_bytes(lalm), kv_bytes_per_token(lalm), a.bandwidth_gbs),
               compile_rollout=a.compile_rollout, merge_lora=a.merge_lora, buckets=a.buckets)
    out.update(model=a.model, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dtype=str(dtype),
               prompts=a.prompts, group_size=a.group_size, max_new_tokens=a.max_new_tokens, lora=a.lora,
               gradient_checkpointing=a.gradient_checkpointing, build_s=round(build_s, 1),
               params_m=round(sum(p.numel() for p in lalm.model.parameters()) / 1e6, 1),
               trainable_m=round(sum(p.numel() for p in params) / 1e6, 2))
    if device.type == "cuda":
        out["fits_80gb"] = out["peak_memory_gb"] < 80
    print(json.dumps(out, indent=1))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | qwen2-audio-7b (random init) | a model dir")
    p.add_argument("--objective", default="cord")
    p.add_argument("--prompts", type=int, default=4, help="B audio prompts per step")
    p.add_argument("--seconds", type=float, default=3.0, help="audio length per prompt")
    p.add_argument("--group-size", type=int, default=4, help="N rollouts per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--lora", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile-rollout", default="auto", choices=["auto", "on", "off"], help="cord.Args.compile_rollout")
    p.add_argument("--merge-lora", default="auto", choices=["auto", "on", "off"],
                   help="cord.Args.merge_lora (step mode)")
    p.add_argument("--buckets", type=int, default=1,
                   help="static_sample's cache buckets (step mode; 1 = the whole cache)")
    p.add_argument("--samplers", default=None, help="--sampler: comma-separated eager | fast [+merged] [+b<n>] "
                   "(default eager,fast and, with --lora, fast+merged)")
    p.add_argument("--profile", default=None, help="--sampler: write torch.profiler tables of the last sampler here")
    p.add_argument("--profile-tokens", type=int, default=12, help="decode steps of the profiled call")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="device memory bandwidth, GB/s (default: the data sheet's for H100 / H200, see BANDWIDTH_GBS)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loss-memory", action="store_true", help="naive vs chunked Eq. 2, separate processes")
    p.add_argument("--judge", action="store_true", help="time RuleJudge on 1,000 pairs")
    p.add_argument("--sampler", action="store_true",
                   help="time cord.sample alone, eager vs fast; compare their greedy rows")
    p.add_argument("--loss-memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--C", type=int, default=1024, help="hidden size for the hidden-* variants")
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args()
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") and not (a.loss_memory or a.loss_memory_child)
                          else "float32")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.loss_memory_child:
        print(json.dumps(loss_memory_child(a.loss_memory_child, a.V, a.T, a.B, a.C, a.dtype, a.device)))
        return
    if a.judge:
        result = judge_bench()
    elif a.loss_memory:
        result = loss_memory(a)
    elif a.sampler:
        result = sampler_bench(a)
    else:
        result = step_bench(a)
    if a.json:
        open(a.json, "w").write(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
