#!/usr/bin/env bash
# Issue 27's rollout figures in one run on one GPU (H100 or H200), within 9 minutes: the README's 7B configuration
# (random-init Qwen2-Audio-7B-Instruct config, bf16, LoRA r = 16, 8 prompts of 10 s x (1 + 4) rows = 40 rows x 200
# new tokens). Run from the repository root:
#
#     bash benchmarks/gpu_rollout.sh [out_dir]              # out_dir: default $OUT, else bench_out
#
# 0. check.json: the tiny model in fp32 on the GPU, every sampler below: greedy rows must equal eager's token for
#    token (the CUDA graphs, the cache buckets and the merged LoRA checked where rounding cannot hide a bug);
# 1. sampler.json: cord.sample alone, eager | fast | fast+merged+b4 (LoRA folded in, the cache read in 4 buckets) |
#    fast+merged, 2 timed calls each after a warm-up, ms per decode step against the honest floor (weights + live KV
#    cache at the data-sheet bandwidth), greedy rows against eager's; profile.txt: torch.profiler's top kernels over
#    a 12-token call of the last sampler, as graph replays and uncaptured;
# 2. step_fast.json: the whole CORD step (gradient checkpointing, 1 warm-up + 2 steps), fast + merged;
# 3. step_eager.json: the same step, eager and unmerged (the baseline, 1 warm-up + 1 step), if time is left;
# then summary.md (GPU, versions, one table of all of it); logs.txt holds every stage's output: 7 files in all (a
# device run brings back 8 at most).
# Each stage has its own time limit inside BUDGET seconds (default 510), so a run under `timeout 540` ends with
# whatever finished. MODEL=tiny PROMPTS=1 ... (below) runs the same on a CPU in a minute (tests/test_rollout.py).
#
# The packages a bare GPU image lacks (or has at other versions) travel as wheels in .whl/ (git-ignored), installed
# first when present (WHEELS= skips it); docs/performance.md has the one command that downloads them.
set -u -o pipefail
OUT_DIR=${1:-${OUT:-bench_out}}
PY=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}
MODEL=${MODEL:-qwen2-audio-7b}
PROMPTS=${PROMPTS:-8}            # B audio prompts
AUDIO_SECONDS=${AUDIO_SECONDS:-10}
GROUP=${GROUP:-4}                # G GRPO rows per prompt (+ 1 OPD row)
T=${T:-200}                      # max new tokens
STEPS=${STEPS:-2}                # timed calls / steps
WARMUP=${WARMUP:-1}              # warm-up steps of the CORD step
PROFILE_TOKENS=${PROFILE_TOKENS:-12}
CHECK_PROMPTS=${CHECK_PROMPTS:-4}  # stage 0: tiny fp32 model, 4 prompts x 5 rows x 48 tokens
CHECK_T=${CHECK_T:-48}
BUDGET=${BUDGET:-510}            # seconds for all stages
mkdir -p "$OUT_DIR"
deadline=$((SECONDS + BUDGET))
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
common=(--model "$MODEL" --lora --prompts "$PROMPTS" --seconds "$AUDIO_SECONDS" --group-size "$GROUP"
        --max-new-tokens "$T" --steps "$STEPS")

stage() {  # name, its time limit (s), bench.py arguments: runs it within the limit and what is left of BUDGET
  local name=$1 limit=$2 left=$((deadline - SECONDS))
  shift 2
  if ((left < limit)); then limit=$left; fi
  if ((limit < 20)); then echo "$name: skipped, no time left" | tee -a "$OUT_DIR/summary.md"; return; fi
  echo "== $name (limit ${limit}s): python -m benchmarks.bench $*"
  echo "== $name: python -m benchmarks.bench $*" >>"$OUT_DIR/logs.txt"
  timeout "$limit" "$PY" -m benchmarks.bench "$@" --json "$OUT_DIR/$name.json" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  cat "$OUT_DIR/$name.log" >>"$OUT_DIR/logs.txt" && rm "$OUT_DIR/$name.log"
  echo "$name: rc=$rc after $((SECONDS - (deadline - BUDGET)))s" | tee -a "$OUT_DIR/logs.txt"
  tail -n 4 "$OUT_DIR/logs.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else
'cpu')"
} >"$OUT_DIR/summary.md" 2>&1
cat "$OUT_DIR/summary.md"

samplers=eager,fast,fast+merged+b4,fast+merged
stage check 90 --sampler --model tiny --dtype float32 --lora --prompts "$CHECK_PROMPTS" --seconds 3 --group-size 4 \
    --max-new-tokens "$CHECK_T" --steps 1 --samplers "$samplers"
stage sampler 300 --sampler "${common[@]}" --samplers "$samplers" \
    --profile "$OUT_DIR/profile.txt" --profile-tokens "$PROFILE_TOKENS"
stage step_fast 170 "${common[@]}" --gradient-checkpointing --warmup "$WARMUP" --compile-rollout on --merge-lora on
stage step_eager 200 "${common[@]}" --gradient-checkpointing --warmup "$WARMUP" --compile-rollout off --merge-lora off \
    --steps 1

"$PY" - "$OUT_DIR" <<'EOF' | tee -a "$OUT_DIR/summary.md"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
load = lambda name: json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else None
cols = ["rollout_tokens_per_s", "decode_ms_per_step", "floor_ms_per_step", "x_floor", "seconds_per_call", "merge_ms",
        "t_step", "t_rollout", "t_student", "peak_memory_gb", "greedy_rows_equal"]
print("| run | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
for name in ("check", "sampler"):
    for label, r in (load(name) or {}).items():
        if isinstance(r, dict):
            print(f"| {name} {label} | " + " | ".join(str(r.get(c, "–")) for c in cols) + " |")
s = load("sampler")
for name in ("step_fast", "step_eager"):
    r = load(name)
    print(f"| {name} | " + (" | ".join(str(r.get(c, "–")) for c in cols) if r else "did not finish") + " |")
if s:
    print(f"\n{s['device']}, {s['model']}, {s['rows']} rows x {s['max_new_tokens']} new tokens, LoRA: {s['lora']}")
EOF
