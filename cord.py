"""CORD: Bridging the Audio-Text Reasoning Gap via Weighted On-policy Cross-modal Distillation.

Hu, Zhu, Luo, Zhang, He, Lei, Zheng, Feng, He, Sun, Wu, Wang. arXiv 2601.16547 (2026).
A single-file reference implementation: one audio LLM pi_theta hears a question (x_a) and reads
its transcript (x_t); on its own audio rollouts it is pulled towards its own text-conditioned
predictions, token by token (weighted reverse KL, Eq. 2-7) and sequence by sequence (a judge
reward optimised with GRPO, Eq. 8-10).

    python cord.py                                   # CPU demo: tiny Qwen2-Audio, before/after table
    python cord.py --model Qwen/Qwen2-Audio-7B-Instruct --data data/train/manifest.jsonl --output runs/cord
    python cord.py --eval --model runs/cord/final --data data/eval/manifest.jsonl --output runs/eval

Shapes: B prompts, G = N rollouts per prompt, P prompt tokens, T completion tokens, V vocabulary,
C hidden size. A "row" is one (prompt, completion) pair; a step has B * n rows.

Departures from the paper (each switchable unless noted):
 1. Rollouts come from our own 25-line KV-cache sampler (`sample`), not `model.generate`: one
    audio-encoder call and one prefill per prompt are shared by all N samples of that prompt.
 2. The reference answer y_hat for the judge (Eq. 8) is greedy (`--ref_temperature 0`).
 3. `--reward_ref answer` (or `both`) uses the ground-truth answer instead of / besides y_hat.
 4. Eq. 7 is normalised by sum_t w_t (`--normalize weights`) so alpha = beta = 1 is exactly Eq. 3;
    `--normalize length` divides by T instead.
 5. pi_old = pi_theta (one update per batch), so rho = 1 and Eq. 10 is the plain policy gradient.
    Both the KL of Eq. 2 and the GRPO log-probs use temperature-1 logits from the training forward,
    also for rollouts sampled at 1.5 (slightly off-policy, as in the paper's own setup).
 6. GRPO advantages divide by std + 1e-4 by default (`--adv_scale none`: Dr. GRPO / the paper's
    Eq. 9 as written).
 7. The OPD rollout (tau = 1.0) and the N GRPO rollouts (tau = 1.5) share one prefill per prompt
    (`--opd_rollout separate`, the paper); `--opd_rollout group` puts the token loss on the group.
 8. `--k_frac f` (off by default) makes K in Eq. 4 a fraction of each sequence's length, for
    completions much shorter than the paper's 200 tokens (where K = 20 selects every token).
 9. Extra baselines beside the paper's ablations: `sft` (cross-entropy on y_hat from the audio
    prompt) and `fkl` (off-policy forward KL along the text-conditioned trajectory).
10. Under torchrun, gradients are averaged with all_reduce after backward rather than by a DDP
    wrapper (train_step calls the model's submodules directly; DDP's hooks need its forward).
The CPU demo (no --model) changes a few settings for a 1.5 M-parameter model: see DEMO below.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer, HfArgumentParser, PretrainedConfig

import data_gen
import judge as judge_lib


# ----------------------------------------------------------------------------------------------
# Arguments (defaults are the paper's hyperparameters)


@dataclass
class Args:
    model: Optional[str] = field(default=None, metadata={"help": "local dir or hub id; none = the tiny CPU demo"})
    data: Optional[str] = field(default=None, metadata={"help": "training manifest (JSONL), or eval manifest with --eval"})
    eval_data: Optional[str] = field(default=None, metadata={"help": "eval manifest evaluated before/after training"})
    output: str = field(default="runs/cord", metadata={"help": "output folder: metrics.jsonl, checkpoints, final/"})
    eval: bool = field(default=False, metadata={"help": "only evaluate --model on --data (audio vs text accuracy)"})
    baseline: Optional[str] = field(default=None, metadata={"help": "summary.json of the base model, for gap reduction"})
    compare: bool = field(default=False, metadata={"help": "tiny demo: every objective x --compare_seeds, table + plot"})
    compare_seeds: int = field(default=3, metadata={"help": "seeds per objective with --compare"})
    compare_objectives: str = field(default="sft,fkl,grpo,opd,opd+grpo,cord", metadata={"help": "objectives for --compare"})
    eval_every: int = field(default=0, metadata={"help": "tiny demo: evaluate every n steps (curves); 0 = before/after"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch's default (use 1 per process when several share the cores)"})
    objective: str = field(default="cord", metadata={"help": "cord | opd (Eq. 3) | grpo | opd+grpo | sft | fkl"})
    teacher: str = field(default="live", metadata={"help": "live: current weights; frozen: initial weights"})
    train: str = field(default="all", metadata={"help": "which parameters train: all | llm | audio | lora"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank with --train lora"})
    k: int = field(default=20, metadata={"help": "K in Eq. 4: top-K positions by D_t get weight alpha"})
    k_frac: float = field(default=0.0, metadata={"help": "if > 0: K = ceil(k_frac * T) per sequence (departure 8)"})
    alpha: float = field(default=2.0, metadata={"help": "alpha in Eq. 4 (importance weight)"})
    beta: float = field(default=2.0, metadata={"help": "beta in Eq. 5 (weight of the first token)"})
    normalize: str = field(default="weights", metadata={"help": "Eq. 7 reduction: weights (sum w) | length (T)"})
    group_size: int = field(default=4, metadata={"help": "N: GRPO rollouts per audio prompt (Eq. 9)"})
    temperature: float = field(default=1.0, metadata={"help": "tau of the OPD rollout"})
    grpo_temperature: float = field(default=1.5, metadata={"help": "tau of the GRPO rollouts"})
    ref_temperature: float = field(default=0.0, metadata={"help": "tau of y_hat ~ pi(.|x_t); 0 = greedy"})
    opd_rollout: str = field(default="separate", metadata={"help": "separate (paper) | group (token loss on the GRPO group)"})
    max_new_tokens: int = field(default=200, metadata={"help": "max completion length T"})
    lam: float = field(default=1.0, metadata={"help": "lambda: L = L_tok + lambda L_seq"})
    clip_eps: float = field(default=0.2, metadata={"help": "epsilon in Eq. 10"})
    adv_scale: str = field(default="std", metadata={"help": "Eq. 9: std (GRPO) | none (r - mean, Dr. GRPO)"})
    grpo_reduction: str = field(default="sequence", metadata={"help": "Eq. 10: sequence (1/|y_i| then mean) | token"})
    reward_ref: str = field(default="text", metadata={"help": "Eq. 8 reference: text (y_hat) | answer | both"})
    judge: str = field(default="rule", metadata={"help": "rule (judge.RuleJudge) | model (judge.ModelJudge)"})
    judge_model: Optional[str] = field(default=None, metadata={"help": "causal LM for --judge model; none = the LALM"})
    instruction: str = field(
        default="Solve the problem. End with: The answer is <answer>.",
        metadata={"help": "instruction after the audio / after the transcript"},
    )
    system_prompt: Optional[str] = field(default=None, metadata={"help": "system prompt; none = the template's"})
    lr: float = field(default=3e-5, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    batch_size: int = field(default=8, metadata={"help": "B: audio prompts per step"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    chunk_size: Optional[int] = field(default=32, metadata={"help": "positions per chunk in the exact KL (memory)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every this many steps"})
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint in --output"})
    eval_limit: Optional[int] = field(default=None, metadata={"help": "evaluate only the first n items"})
    eval_batch_size: int = field(default=32, metadata={"help": "prompts per eval batch"})
    seed: int = field(default=0, metadata={"help": "run seed"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | bfloat16 | float32"})
    device: Optional[str] = field(default=None, metadata={"help": "cuda / cpu; none = cuda if available"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code from the hub"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard a full fine-tune across ranks (FSDP2)"})


# ----------------------------------------------------------------------------------------------
# Model and prompt adapter: any transformers audio LLM whose audio tokens are a run of one
# placeholder token in the prompt, filled with encoder outputs. A family = one function that
# turns Whisper features into those embeddings, flattened over the clips of the batch.


def qwen2_audio_features(model, features, feature_mask):  # -> (sum of audio tokens, C)
    """Qwen2-Audio: Whisper encoder (+ avg-pool) -> projector, as in its own forward()."""
    tower = model.audio_tower
    _, n_out = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))  # (B,)
    n_conv = (features.shape[-1] - 2) // 2 + 1
    pad = torch.arange(n_conv, device=features.device)[None] >= ((feature_mask.sum(-1) - 1) // 2 + 1)[:, None]
    mask = torch.zeros(pad.shape, dtype=tower.conv1.weight.dtype, device=features.device)
    mask = mask.masked_fill(pad, float("-inf"))[:, None, None, :].expand(-1, 1, n_conv, -1)  # (B, 1, A, A)
    h = model.multi_modal_projector(tower(features, attention_mask=mask).last_hidden_state)  # (B, A', C)
    keep = torch.arange(h.shape[1], device=h.device)[None] < n_out[:, None]
    return h[keep]


def qwen2_5_omni_features(model, features, feature_mask):  # -> (sum of audio tokens, C)
    """Qwen2.5-Omni thinker: its encoder already ends in the projection to the LM width."""
    return model.get_audio_features(features, feature_attention_mask=feature_mask)


def _omni_thinker_class():
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    return Qwen2_5OmniThinkerForConditionalGeneration


def _qwen2_audio_class():
    from transformers import Qwen2AudioForConditionalGeneration

    return Qwen2AudioForConditionalGeneration


# config.model_type -> (model class, audio feature function). Add a family here (README).
AUDIO_FAMILIES: dict[str, tuple[Callable, Callable]] = {
    "qwen2_audio": (_qwen2_audio_class, qwen2_audio_features),
    "qwen2_5_omni": (_omni_thinker_class, qwen2_5_omni_features),  # loads the thinker only
    "qwen2_5_omni_thinker": (_omni_thinker_class, qwen2_5_omni_features),
}


@dataclass
class LALM:
    """The model plus everything needed to build its prompts."""

    model: torch.nn.Module
    tokenizer: object
    feature_extractor: object
    chat_template: str
    audio_features: Callable
    audio_token_id: int
    suppress_ids: list[int]  # audio special tokens: never sampled (PAPER.md pitfalls)
    eos_ids: list[int]
    processor: object = None

    @property
    def base(self):  # the transformers model under a PEFT wrapper, if any
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def device(self):
        return next(self.model.parameters()).device


def load_lalm(path: str, dtype=torch.float32, device="cpu", trust_remote_code=False) -> LALM:
    try:  # read model_type from config.json (AutoConfig does not know e.g. qwen2_5_omni_thinker)
        model_type = PretrainedConfig.get_config_dict(path)[0].get("model_type")
    except OSError as e:
        raise SystemExit(f"--model {path}: cannot read its config.json ({e})") from None
    if model_type not in AUDIO_FAMILIES:
        raise SystemExit(
            f"--model {path}: model type '{model_type}' has no audio adapter; supported: "
            f"{', '.join(AUDIO_FAMILIES)}. Add one function to AUDIO_FAMILIES in cord.py (README: adding a family)."
        )
    model_class, audio_features = AUDIO_FAMILIES[model_type]
    model = model_class().from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    config = model.config
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    feature_extractor = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:  # the processor holds the chat template for Qwen2-Audio; Omni's needs torchvision
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError, TypeError):
        processor = None
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    if template is None:
        raise SystemExit(f"--model {path}: no chat template in its processor or tokenizer; add chat_template.json")
    audio_token_id = getattr(config, "audio_token_index", None) or getattr(config, "audio_token_id", None)
    suppress = {audio_token_id} | {i for t, i in tokenizer.get_vocab().items() if "audio" in t.lower() and t.startswith("<")}
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return LALM(model, tokenizer, feature_extractor, template, audio_features, audio_token_id,
                sorted(suppress), sorted(e for e in eos if e is not None), processor)


def load_audio(path: Path, sampling_rate: int) -> np.ndarray:
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types
        raise SystemExit(f"{path}: cannot read audio ({e}); check the manifest's 'audio' field") from None
    audio = audio.mean(1)  # mono
    if sr != sampling_rate:
        if sampling_rate != 16000:
            raise SystemExit(f"{path}: sample rate {sr}, model wants {sampling_rate}; resample the data")
        audio = data_gen.to_16k(audio, sr)
    return audio


def read_manifest(path: str) -> list[dict]:
    """JSONL, one example per line: id, audio (relative to the manifest), text, answer?, choices?

    Validation is data_gen.read_manifest's; a bad line stops the run with `path:line: what is wrong`.
    """
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such manifest; make one with data_gen.py (README)")
    try:
        rows = data_gen.read_manifest(path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not rows:
        raise SystemExit(f"{path}: the manifest is empty")
    return [dict(ex, audio_path=Path(path).parent / ex["audio"]) for ex in rows]


def _render(lalm: LALM, content: list[dict], system_prompt: Optional[str]) -> str:
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": content}]
    return lalm.tokenizer.apply_chat_template(messages, chat_template=lalm.chat_template, tokenize=False, add_generation_prompt=True)


def _question(ex: dict) -> str:
    choices = ex.get("choices")
    if not choices:
        return ex["text"]
    if isinstance(choices, dict):
        choices = [f"({k}) {v}" for k, v in choices.items()]
    return ex["text"] + "\n" + "\n".join(choices)


def build_prompts(lalm: LALM, examples: list[dict], instruction: str, system_prompt: Optional[str] = None) -> dict:
    """x_a (audio + instruction) and x_t (transcript + the same instruction), same template.

    Returns left-padded `audio_ids`/`audio_mask` (B, P_a) with the audio placeholder already
    repeated once per encoder output, `features`/`feature_mask` (B, M, F)/(B, F), and
    `text_ids`/`text_mask` (B, P_t).
    """
    tok, fe = lalm.tokenizer, lalm.feature_extractor
    audio = [load_audio(ex["audio_path"], fe.sampling_rate) for ex in examples]
    feats = fe(audio, sampling_rate=fe.sampling_rate, return_attention_mask=True, padding="max_length", return_tensors="pt")
    _, n_audio = lalm.base.audio_tower._get_feat_extract_output_lengths(feats["attention_mask"].sum(-1))  # (B,)
    placeholder = tok.convert_ids_to_tokens(lalm.audio_token_id)
    audio_texts, text_texts = [], []
    for ex, n in zip(examples, n_audio.tolist()):
        choices = "\n".join(_question(ex).split("\n")[1:])  # options stay in text for both prompts
        a = _render(lalm, [{"type": "audio", "audio": str(ex["audio_path"])}, {"type": "text", "text": (choices + "\n" if choices else "") + instruction}], system_prompt)
        if a.count(placeholder) != 1:
            raise SystemExit(f"the chat template must render one {placeholder} per audio (got {a.count(placeholder)})")
        audio_texts.append(a.replace(placeholder, placeholder * n))
        text_texts.append(_render(lalm, [{"type": "text", "text": _question(ex) + "\n" + instruction}], system_prompt))
    enc = lambda texts: tok(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    a, t = enc(audio_texts), enc(text_texts)
    dev = lalm.device
    return dict(audio_ids=a["input_ids"].to(dev), audio_mask=a["attention_mask"].to(dev),
                features=feats["input_features"].to(dev, lalm.model.dtype), feature_mask=feats["attention_mask"].to(dev),
                text_ids=t["input_ids"].to(dev), text_mask=t["attention_mask"].to(dev))


def embed_prompts(lalm: LALM, ids, features=None, feature_mask=None):  # -> (B, P, C)
    """Token embeddings with the audio placeholders replaced by encoder outputs (one encoder call)."""
    x = lalm.base.get_input_embeddings()(ids)  # (B, P, C)
    if features is None:
        return x
    audio = lalm.audio_features(lalm.base, features, feature_mask).to(x.dtype)  # (n_audio_tokens, C)
    slots = (ids == lalm.audio_token_id).unsqueeze(-1).expand_as(x)
    return x.masked_scatter(slots, audio)


def _positions(mask):  # left padding -> positions 0.. on the real tokens (as generate() does)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_hidden(lalm: LALM, prompt_embeds, prompt_mask, y, y_mask):  # -> (B, T, C)
    """Hidden states whose index t predicts completion token y_t (logits = lm_head of them)."""
    P = prompt_embeds.shape[1]
    x = torch.cat([prompt_embeds, lalm.base.get_input_embeddings()(y[:, :-1])], 1)  # (B, P+T-1, C)
    mask = torch.cat([prompt_mask, y_mask[:, :-1].long()], 1)  # (B, P+T-1)
    h = lalm.base.get_decoder()(inputs_embeds=x, attention_mask=mask, position_ids=_positions(mask), use_cache=False).last_hidden_state
    return h[:, P - 1:]  # (B, T, C): position P-1+t sees x_{<P} and y_{<t}


def completion_logits(lalm: LALM, prompt_embeds, prompt_mask, y, y_mask):  # -> (B, T, V)
    return lalm.base.get_output_embeddings()(completion_hidden(lalm, prompt_embeds, prompt_mask, y, y_mask))


# ----------------------------------------------------------------------------------------------
# Loss math (Eq. 2-7). Pure functions: tensors in, tensors out; each can be copied alone.
# Logits are aligned: index t is the distribution over completion token t; mask (B, T) is True on
# real completion tokens (right padding).


class _ChunkedKL(torch.autograd.Function):
    """Exact KL over the vocabulary per row of (N, V) logits, `chunk` rows at a time in fp32.

    Saves only the inputs: the backward pass recomputes the softmaxes chunk by chunk, so no
    (N, V) fp32 intermediate outlives its chunk. Gradient flows to `s` only (t is the teacher):
      reverse KL(p_s||p_t): dD/ds = p_s * (log p_s - log p_t - D)
      forward KL(p_t||p_s): dD/ds = p_s - p_t
    """

    @staticmethod
    def forward(ctx, s, t, chunk, reverse):
        fp = torch.promote_types(s.dtype, torch.float32)  # fp32 math (fp64 stays fp64)
        D = torch.empty(s.shape[0], dtype=fp, device=s.device)  # (N,)
        for i in range(0, s.shape[0], chunk):
            ls, lt = F.log_softmax(s[i:i + chunk].to(fp), -1), F.log_softmax(t[i:i + chunk].to(fp), -1)
            D[i:i + chunk] = (ls.exp() * (ls - lt)).sum(-1) if reverse else (lt.exp() * (lt - ls)).sum(-1)
        ctx.save_for_backward(s, t, D)
        ctx.chunk, ctx.reverse = chunk, reverse
        return D

    @staticmethod
    def backward(ctx, gD):
        s, t, D = ctx.saved_tensors
        gs = torch.empty_like(s)
        for i in range(0, s.shape[0], ctx.chunk):
            ls, lt = F.log_softmax(s[i:i + ctx.chunk].to(D.dtype), -1), F.log_softmax(t[i:i + ctx.chunk].to(D.dtype), -1)
            g = ls.exp() * (ls - lt - D[i:i + ctx.chunk, None]) if ctx.reverse else ls.exp() - lt.exp()
            gs[i:i + ctx.chunk] = g * gD[i:i + ctx.chunk, None]
        return gs, None, None, None


def token_reverse_kl(student_logits, teacher_logits, mask, chunk_size=None):  # -> D (B, T)
    """Eq. 2: D_t = KL(pi(.|x_a, y_<t) || sg pi(.|x_t, y_<t)), exact over V, fp32, 0 on padding.

    >>> s = torch.tensor([[[0.0, 0.0]]]); t = torch.tensor([[[0.0, math.log(3)]]])
    >>> round(token_reverse_kl(s, t, torch.ones(1, 1, dtype=torch.bool)).item(), 4)  # 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75)
    0.1438
    """
    t = teacher_logits.detach()  # stop-gradient on the teacher
    if chunk_size is None:
        ls, lt = F.log_softmax(student_logits.float(), -1), F.log_softmax(t.float(), -1)  # (B, T, V)
        D = (ls.exp() * (ls - lt)).sum(-1)  # (B, T)
    else:
        B, T, V = student_logits.shape
        D = _ChunkedKL.apply(student_logits.reshape(B * T, V), t.reshape(B * T, V), chunk_size, True).view(B, T)
    return D * mask


def token_forward_kl(student_logits, teacher_logits, mask, chunk_size=None):  # -> (B, T)
    """KL(sg pi_t || pi_s): the off-policy Forward-KL baseline, on text-conditioned trajectories."""
    t = teacher_logits.detach()
    if chunk_size is None:
        ls, lt = F.log_softmax(student_logits.float(), -1), F.log_softmax(t.float(), -1)
        D = (lt.exp() * (lt - ls)).sum(-1)
    else:
        B, T, V = student_logits.shape
        D = _ChunkedKL.apply(student_logits.reshape(B * T, V), t.reshape(B * T, V), chunk_size, False).view(B, T)
    return D * mask


def importance_weights(D, mask, k=20, alpha=2.0):  # -> (B, T)
    """Eq. 4: w_kl = alpha on the top-K positions of each sequence by detached D_t, else 1; 0 on padding.

    `k` may be an int or a (B,) tensor (a K per sequence). T <= K gives alpha everywhere.
    >>> importance_weights(torch.tensor([[0.1, 0.9, 0.5, 0.0]]), torch.tensor([[1, 1, 1, 0]]).bool(), k=1)
    tensor([[1., 2., 1., 0.]])
    """
    T = D.shape[1]
    k = torch.as_tensor(k, device=D.device).expand(D.shape[0]).clamp(max=T)  # (B,)
    order = D.detach().masked_fill(~mask, float("-inf")).argsort(-1, descending=True)  # padding last
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=D.device).expand_as(order))  # (B, T)
    top = (rank < k[:, None]) & mask
    return torch.where(top, alpha, 1.0) * mask


def position_weights(mask, beta=2.0):  # -> (B, T)
    """Eq. 5: w_pos = beta - (beta - 1)(t - 1)/(T - 1), T = that sequence's length; 0 on padding.

    >>> position_weights(torch.tensor([[1, 1, 1], [1, 0, 0]]).bool())
    tensor([[2.0000, 1.5000, 1.0000],
            [2.0000, 0.0000, 0.0000]])
    """
    L = mask.sum(-1, keepdim=True)  # (B, 1) sequence lengths
    t = torch.arange(mask.shape[1], device=mask.device)[None]  # (1, T): t - 1 in the paper's 1-based t
    w = beta - (beta - 1) * t / (L - 1).clamp(min=1)  # a 1-token sequence gets beta
    return w * mask


def cord_token_loss(student_logits, teacher_logits, mask, k=20, alpha=2.0, beta=2.0, normalize="weights", chunk_size=None):
    """Eq. 6-7: L_tok = mean_b( sum_t w_t D_t / sum_t w_t ), w = w_kl * w_pos -> (loss, metrics).

    normalize="weights" (default): alpha = beta = 1 is exactly the uniform Eq. 3.
    normalize="length": divide by the sequence length T instead of sum_t w_t.
    Sequences are averaged with equal weight (a per-sequence mean, as Eq. 3's E_y[(1/T) sum]).
    """
    D = token_reverse_kl(student_logits, teacher_logits, mask, chunk_size)  # (B, T) Eq. 2
    return weighted_token_loss(D, mask, k, alpha, beta, normalize)


def weighted_token_loss(D, mask, k=20, alpha=2.0, beta=2.0, normalize="weights"):
    """Eq. 4-7 on given per-token KLs D (B, T) -> (loss, metrics); see cord_token_loss."""
    w_kl = importance_weights(D, mask, k, alpha)  # (B, T) Eq. 4
    w = w_kl * position_weights(mask, beta)  # (B, T) Eq. 6
    denom = w.sum(-1) if normalize == "weights" else mask.sum(-1).to(w.dtype)  # (B,)
    has = mask.any(-1)
    per_seq = (w * D).sum(-1) / denom.clamp(min=1e-8)  # (B,) Eq. 7, per sequence
    loss = per_seq[has].mean() if has.any() else D.sum() * 0  # mean over sequences
    d, top = D.detach()[mask].float(), importance_weights(D, mask, k, 2.0) > 1  # (n,), (B, T) the top-K tokens
    metrics = {"kl_mean": d.mean().item() if d.numel() else 0.0,
               "kl_top_share": (D.detach()[top].sum() / d.sum().clamp(min=1e-12)).item(),  # KL mass in the top-K
               "k_eff_frac": (top.sum() / mask.sum().clamp(min=1)).item()}  # share of tokens that top-K selects
    if d.numel():
        metrics.update({f"kl_p{q}": torch.quantile(d[:1_000_000], q / 100).item() for q in (50, 80, 95)})
    return loss, metrics


class _ChunkedLogProb(torch.autograd.Function):
    """log softmax(s)[y] per row of (N, V), chunked; backward recomputes: d/ds = onehot(y) - p."""

    @staticmethod
    def forward(ctx, s, y, chunk):
        out = torch.empty(s.shape[0], dtype=torch.promote_types(s.dtype, torch.float32), device=s.device)
        for i in range(0, s.shape[0], chunk):
            out[i:i + chunk] = F.log_softmax(s[i:i + chunk].to(out.dtype), -1).gather(-1, y[i:i + chunk, None])[:, 0]
        ctx.save_for_backward(s, y)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g):
        s, y = ctx.saved_tensors
        gs = torch.empty_like(s)
        for i in range(0, s.shape[0], ctx.chunk):
            p = torch.softmax(s[i:i + ctx.chunk].to(g.dtype), -1)
            gs[i:i + ctx.chunk] = (-p).scatter_add_(-1, y[i:i + ctx.chunk, None], torch.ones_like(p[:, :1])) * g[i:i + ctx.chunk, None]
        return gs, None, None


def token_logprobs(logits, y, chunk_size=None):  # -> (B, T)
    """log pi(y_t | ...) at temperature 1; chunk_size bounds the fp32 memory as in token_reverse_kl."""
    if chunk_size is None:
        return torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1)
    B, T, V = logits.shape
    return _ChunkedLogProb.apply(logits.reshape(B * T, V), y.reshape(B * T), chunk_size).view(B, T)


class _FusedHead(torch.autograd.Function):
    """Eq. 2 and log pi(y_t) straight from final hidden states: logits = h W^T exist one chunk at a time.

    Inputs h_s (N, C) student hidden, h_t (N, C) teacher hidden, W (V, C) student head, W_t teacher
    head, y (N,) tokens. Returns D (N,) = KL(p_s || p_t) and logp (N,) = log p_s(y). The backward
    pass recomputes each chunk's logits and accumulates dL/dh_s and dL/dW; the teacher gets none.
    """

    @staticmethod
    def forward(ctx, h_s, h_t, W, W_t, y, chunk):
        D = torch.zeros(h_s.shape[0], dtype=torch.float32, device=h_s.device)
        logp = torch.zeros_like(D)
        for i in range(0, h_s.shape[0], chunk):
            ls = F.log_softmax((h_s[i:i + chunk] @ W.T).float(), -1)  # (chunk, V)
            logp[i:i + chunk] = ls.gather(-1, y[i:i + chunk, None])[:, 0]
            if h_t is not None:
                lt = F.log_softmax((h_t[i:i + chunk] @ W_t.T).float(), -1)
                D[i:i + chunk] = (ls.exp() * (ls - lt)).sum(-1)
        ctx.save_for_backward(h_s, h_t, W, W_t, y, D)
        ctx.chunk = chunk
        return D, logp

    @staticmethod
    def backward(ctx, gD, glogp):
        h_s, h_t, W, W_t, y, D = ctx.saved_tensors
        gh = torch.empty_like(h_s)
        gW = torch.zeros(W.shape, dtype=torch.float32, device=W.device) if ctx.needs_input_grad[2] else None
        for i in range(0, h_s.shape[0], ctx.chunk):  # in-place ops: a few (chunk, V) buffers at a time
            sl = slice(i, i + ctx.chunk)
            ls = F.log_softmax((h_s[sl] @ W.T).float(), -1)  # (chunk, V)
            p = ls.exp()
            g = (p * -glogp[sl, None]).scatter_add_(-1, y[sl, None], glogp[sl, None])  # d logp / ds = onehot - p
            if h_t is not None:
                lt = F.log_softmax((h_t[sl] @ W_t.T).float(), -1)
                g += ls.sub_(lt).sub_(D[sl, None]).mul_(p).mul_(gD[sl, None])  # d D / ds = p (ls - lt - D)
            g = g.to(W.dtype)
            gh[sl] = g @ W
            if gW is not None:
                gW.addmm_(g.T.float(), h_s[sl].float())  # no (V, C) temporary
        return gh, None, None if gW is None else gW.to(W.dtype), None, None, None


def fused_kl_and_logprobs(student_hidden, teacher_hidden, weight, y, mask, chunk_size=64, teacher_weight=None):
    """D (B, T) of Eq. 2 and log pi(y_t) (B, T) from hidden states (B, T, C) and the lm_head weight (V, C).

    Same values and gradients as token_reverse_kl / token_logprobs on logits = hidden @ weight.T,
    without ever holding the (B, T, V) logits. teacher_hidden=None returns D = 0 (GRPO-only rows).
    """
    B, T, C = student_hidden.shape
    h_t = None if teacher_hidden is None else teacher_hidden.detach().reshape(B * T, C)
    W_t = (weight if teacher_weight is None else teacher_weight).detach()
    D, logp = _FusedHead.apply(student_hidden.reshape(B * T, C), h_t, weight, W_t, y.reshape(B * T), chunk_size)
    return D.view(B, T) * mask, logp.view(B, T)


# ----------------------------------------------------------------------------------------------
# GRPO (Eq. 8-10)


def grpo_advantages(rewards, group_size, scale="std", eps=1e-4):  # -> (B*G,)
    """Eq. 9: A_i = r_i - mean(r) within each contiguous group of G rows; scale="std" also / (std + eps).

    >>> grpo_advantages(torch.tensor([1., 0., 0., 0., 1., 1.]), 3, scale="none")
    tensor([ 0.6667, -0.3333, -0.3333, -0.6667,  0.3333,  0.3333])
    """
    r = rewards.float().view(-1, group_size)  # (B, G)
    A = r - r.mean(1, keepdim=True)
    if scale == "std":
        A = A / (r.std(1, keepdim=True) + eps)  # unbiased std, as TRL's GRPO
    return A.view(-1)


def grpo_loss(logp, old_logp, advantages, mask, eps=0.2, group_size=None, reduction="sequence"):
    """Eq. 10: -(1/N) sum_i (1/|y_i|) sum_t min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) -> (loss, metrics).

    logp, old_logp, mask: (B*G, T); advantages: (B*G,). reduction="sequence" is the paper's
    per-sequence token mean then mean over sequences; "token" averages over all tokens (DAPO).
    """
    A = advantages[:, None]  # (B*G, 1)
    rho = torch.exp(logp - old_logp.detach())  # (B*G, T)
    surrogate = torch.min(rho * A, rho.clamp(1 - eps, 1 + eps) * A)  # (B*G, T)
    m = mask.to(surrogate.dtype)
    if reduction == "sequence":
        loss = -((surrogate * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    else:
        loss = -(surrogate * m).sum() / m.sum().clamp(min=1)
    clipped = ((rho < 1 - eps) & (A < 0)) | ((rho > 1 + eps) & (A > 0))
    metrics = {"clip_frac": (clipped & mask).sum().item() / max(mask.sum().item(), 1)}
    if group_size:
        metrics["zero_spread_frac"] = (advantages.view(-1, group_size).abs().amax(1) == 0).float().mean().item()
    return loss, metrics


def make_judge(args: Args, lalm: LALM):
    """J of Eq. 8 as (judge of two completions, judge of a completion vs a ground-truth answer).

    rule (default): judge.RuleJudge; model: judge.ModelJudge asking --judge_model (a causal LM) or,
    without one, the LALM's own text path, whether two answers agree (P(yes) from next-token logits).
    """
    if args.judge == "rule":
        return judge_lib.RuleJudge(), judge_lib.RuleJudge(ground_truth=True)
    if args.judge_model:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(args.judge_model, trust_remote_code=args.trust_remote_code)
        mj = judge_lib.ModelJudge(lm.to(lalm.device), AutoTokenizer.from_pretrained(args.judge_model))
    else:
        mj = judge_lib.ModelJudge(lalm.base, lalm.tokenizer)  # the LALM's text path: no audio in the prompt
    return mj, mj


def rewards_for(judges, completions: list[str], refs: list, answers: list, mode: str) -> torch.Tensor:
    """Eq. 8: r_i = J(y_i, y_hat) in {0, 1}. mode answer: J(y_i, ground truth); both: the two must agree.

    Rows without a ground-truth answer fall back to y_hat.
    """
    judge_text, judge_gt = judges
    r_text = judge_text(completions, refs) if mode != "answer" else [None] * len(completions)
    if mode == "text":
        return torch.tensor(r_text, dtype=torch.float32)
    r = []
    for c, ref, a, rt in zip(completions, refs, answers, r_text):
        if a is None:
            if rt is None:
                raise SystemExit("--reward_ref answer: an example has no 'answer'; use --reward_ref text or both")
            r.append(rt)
        else:
            rg = judge_gt([c], [str(a)])[0]
            r.append(rg if mode == "answer" else min(rg, rt))
    return torch.tensor(r, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Rollout


@torch.no_grad()
def sample(lalm: LALM, prompt_embeds, prompt_mask, n: int, temperature, max_new_tokens: int):
    """y ~ pi(.|x): n samples per prompt from ONE prefill (KV cache repeated n times).

    temperature: a float or a list of n floats (row j of each prompt uses temperature[j]); 0 = greedy.
    Returns y (B*n, T) and its mask (B*n, T), True up to and including EOS.
    """
    decoder, head = lalm.base.get_decoder(), lalm.base.get_output_embeddings()
    pos = _positions(prompt_mask)  # (B, P)
    out = decoder(inputs_embeds=prompt_embeds, attention_mask=prompt_mask, position_ids=pos, use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)  # share the prompt encoding across the n samples
    h = out.last_hidden_state[:, -1].repeat_interleave(n, 0)  # (B*n, C)
    mask = prompt_mask.repeat_interleave(n, 0)  # (B*n, P)
    pos = pos[:, -1:].repeat_interleave(n, 0)  # (B*n, 1)
    taus = torch.tensor([temperature] * n if isinstance(temperature, (int, float)) else temperature, device=h.device)
    tau = taus.repeat(prompt_embeds.shape[0])[:, None].float()  # (B*n, 1)
    eos, suppress = torch.tensor(lalm.eos_ids, device=h.device), torch.tensor(lalm.suppress_ids, device=h.device)
    pad = lalm.tokenizer.pad_token_id if lalm.tokenizer.pad_token_id is not None else lalm.eos_ids[0]
    done = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
    ys, alive = [], []
    for _ in range(max_new_tokens):
        logits = head(h).float()  # (B*n, V)
        logits[:, suppress] = float("-inf")
        probs = torch.softmax(logits / tau.clamp(min=1e-5), -1)
        y = torch.where(tau[:, 0] > 0, torch.multinomial(probs, 1)[:, 0], logits.argmax(-1))  # (B*n,)
        y = y.masked_fill(done, pad)
        ys.append(y), alive.append(~done)
        done = done | torch.isin(y, eos)
        if done.all():
            break
        mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos + 1
        h = decoder(input_ids=y[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True).last_hidden_state[:, -1]
    return torch.stack(ys, 1), torch.stack(alive, 1)


def decode(lalm: LALM, y, y_mask) -> list[str]:
    return lalm.tokenizer.batch_decode([row[m].tolist() for row, m in zip(y, y_mask)], skip_special_tokens=True)


def pad_cat(tensors, value):  # right-pad (R_i, T_i) tensors to a common T and stack rows
    T = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, T - t.shape[1]), value=value) for t in tensors], 0)


# ----------------------------------------------------------------------------------------------
# Training loop


def configure_trainable(lalm: LALM, args: Args) -> list:
    """--train all | llm | audio (encoder + projector) | lora (PEFT adapters on the LM)."""
    if args.train == "lora":
        from peft import LoraConfig, get_peft_model  # optional dependency

        target = r"^(?!.*(audio_tower|visual)).*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
        lalm.model = get_peft_model(lalm.model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=target))
    else:
        for name, p in lalm.model.named_parameters():
            is_audio = "audio_tower" in name or "multi_modal_projector" in name
            p.requires_grad_({"all": "visual" not in name, "llm": not is_audio and "visual" not in name, "audio": is_audio}[args.train])
    return [p for p in lalm.model.parameters() if p.requires_grad]


class Teacher:
    """sg[pi(.|x_t, y_<t)]: no gradient, eval mode. live = current weights; frozen = initial weights
    (the base model under a LoRA adapter, else a frozen copy made at the start)."""

    def __init__(self, lalm: LALM, mode: str):
        self.lalm, self.mode, self.copy = lalm, mode, None
        if mode == "frozen" and not hasattr(lalm.model, "disable_adapter"):
            self.copy = LALM(**{**lalm.__dict__, "model": copy.deepcopy(lalm.model).requires_grad_(False).eval()})

    @torch.no_grad()
    def hidden(self, text_ids, text_mask, y, y_mask):  # -> (R, T, C) hidden states, (V, C) head weight
        lalm = self.copy or self.lalm
        was_training = lalm.model.training
        lalm.model.eval()  # no dropout in the teacher
        with lalm.model.disable_adapter() if self.mode == "frozen" and self.copy is None else contextlib.nullcontext():
            h = completion_hidden(lalm, embed_prompts(lalm, text_ids), text_mask, y, y_mask)
        lalm.model.train(was_training)
        return h, lalm.base.get_output_embeddings().weight


def _sync_time(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def train_step(lalm: LALM, teacher: Teacher, judge, examples: list[dict], args: Args) -> tuple[torch.Tensor, dict]:
    """One CORD step on B audio prompts: rollouts -> teacher -> student -> L = L_tok + lambda L_seq."""
    obj, G, dev = args.objective, args.group_size, lalm.device
    use_tok, use_seq = obj in ("cord", "opd", "opd+grpo"), obj in ("cord", "grpo", "opd+grpo")
    alpha, beta = (args.alpha, args.beta) if obj == "cord" else (1.0, 1.0)  # opd, opd+grpo: uniform Eq. 3
    tm, metrics, clock = {}, {}, _sync_time(dev)
    P = build_prompts(lalm, examples, args.instruction, args.system_prompt)
    tm["t_prompts"], clock = _sync_time(dev) - clock, _sync_time(dev)
    B = len(examples)
    lalm.model.train()
    x_a = embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])  # (B, P_a, C): the one encoder call
    m_a = P["audio_mask"]
    tm["t_encoder"] = _sync_time(dev) - clock  # part of the student forward (its graph is kept for backward)
    clock = _sync_time(dev)

    # --- rollouts from the audio prompt (eval mode, no grad), one prefill per prompt
    lalm.model.eval()
    with torch.no_grad():
        x_t = embed_prompts(lalm, P["text_ids"])  # (B, P_t, C)
        separate = use_tok and use_seq and args.opd_rollout == "separate"
        taus = ([args.temperature] if use_tok and (separate or not use_seq) else []) + ([args.grpo_temperature] * G if use_seq else [])
        rows = {}  # name -> (y, mask): "tok" rows carry L_tok, "seq" rows L_seq, "ref" rows sft / fkl
        if taus:
            y, y_mask = sample(lalm, x_a.detach(), m_a, len(taus), taus, args.max_new_tokens)  # (B*n, T)
            metrics["rollout_tokens"] = y_mask.sum().item()
            y, y_mask = y.view(B, len(taus), -1), y_mask.view(B, len(taus), -1)  # row 0 = OPD row if separate
            if use_seq:
                rows["seq"] = (y[:, -G:].flatten(0, 1), y_mask[:, -G:].flatten(0, 1))  # (B*G, T)
            if use_tok:
                rows["tok"] = (y[:, 0], y_mask[:, 0]) if separate or not use_seq else rows["seq"]
        need_ref = obj in ("sft", "fkl") or (use_seq and args.reward_ref != "answer")
        if need_ref:
            tau_ref = args.temperature if obj == "fkl" else args.ref_temperature  # fkl: y ~ pi(.|x_t)
            y_hat, y_hat_mask = sample(lalm, x_t, P["text_mask"], 1, tau_ref, args.max_new_tokens)  # (B, T)
            if obj in ("sft", "fkl"):
                rows["ref"] = (y_hat, y_hat_mask)
    tm["t_rollout"], clock = _sync_time(dev) - clock, _sync_time(dev)

    # --- judge rewards (Eq. 8) and group advantages (Eq. 9)
    if use_seq:
        completions = decode(lalm, *rows["seq"])
        refs = decode(lalm, y_hat, y_hat_mask) if need_ref else [None] * B
        r = rewards_for(judge, completions, [x for x in refs for _ in range(G)],
                        [ex.get("answer") for ex in examples for _ in range(G)], args.reward_ref).to(dev)
        A = grpo_advantages(r, G, args.adv_scale)  # (B*G,)
        metrics.update(reward_mean=r.mean().item(), completion_len=rows["seq"][1].sum(-1).float().mean().item())
    tm["t_judge"], clock = _sync_time(dev) - clock, _sync_time(dev)

    # --- teacher pass: text prompt, same completion tokens, no grad; hidden states only
    h_t = W_t = None
    if "tok" in rows or obj == "fkl":
        yt, mt = rows["tok"] if "tok" in rows else rows["ref"]
        reps = yt.shape[0] // B
        h_t, W_t = teacher.hidden(P["text_ids"].repeat_interleave(reps, 0), P["text_mask"].repeat_interleave(reps, 0), yt, mt)
    tm["t_teacher"], clock = _sync_time(dev) - clock, _sync_time(dev)

    # --- student pass: one forward over every row that carries a loss
    lalm.model.train()
    names = [n for n in ("tok", "seq", "ref") if n in rows and not (n == "seq" and rows.get("tok") is rows["seq"])]
    ys = [rows[n][0] for n in names]
    reps = [y.shape[0] // B for y in ys]
    h = completion_hidden(lalm, torch.cat([x_a.repeat_interleave(r, 0) for r in reps]),
                          torch.cat([m_a.repeat_interleave(r, 0) for r in reps]),
                          pad_cat(ys, lalm.tokenizer.pad_token_id or 0), pad_cat([rows[n][1] for n in names], False))  # (R, T, C)
    offsets = dict(zip(names, np.cumsum([0] + [y.shape[0] for y in ys]).tolist()))
    head = lalm.base.get_output_embeddings()
    fused = args.chunk_size is not None and head.bias is None

    def kl_and_logp(name, with_teacher):  # D (Eq. 2) and log pi(y_t) of a row set, from the one student forward
        y, m = rows[name]
        hs = h[offsets[name]:offsets[name] + y.shape[0], :y.shape[1]]  # (R_n, T_n, C)
        if fused:  # logits never materialised (bench.py --loss-memory)
            return fused_kl_and_logprobs(hs, h_t if with_teacher else None, head.weight, y, m, args.chunk_size, W_t)
        s = head(hs)  # (R_n, T_n, V)
        D = token_reverse_kl(s, h_t @ W_t.T, m, args.chunk_size) if with_teacher else None
        return D, token_logprobs(s, y, args.chunk_size)

    loss = h.new_zeros((), dtype=torch.float32)
    if use_tok:
        y_tok, m_tok = rows["tok"]
        D, logp = kl_and_logp("tok", True)  # (B, T) or (B*G, T) in group mode
        kk = torch.ceil(args.k_frac * m_tok.sum(-1)).long().clamp(min=1) if args.k_frac > 0 else args.k
        L_tok, tok_metrics = weighted_token_loss(D, m_tok, kk, alpha, beta, args.normalize)  # Eq. 4-7
        loss = loss + L_tok
        metrics.update(loss_tok=L_tok.item(), **tok_metrics)
    if use_seq:
        y_seq, m_seq = rows["seq"]
        if "seq" in names:
            _, logp = kl_and_logp("seq", False)  # (B*G, T) from the same student forward
        L_seq, seq_metrics = grpo_loss(logp, logp.detach(), A, m_seq, args.clip_eps, G, args.grpo_reduction)  # Eq. 10
        loss = loss + args.lam * L_seq  # L_CORD = L_tok + lambda L_seq
        metrics.update(loss_seq=L_seq.item(), **seq_metrics)
    if obj in ("sft", "fkl"):
        y_ref, m_ref = rows["ref"]
        hs = h[offsets["ref"]:, :y_ref.shape[1]]
        if obj == "sft":  # cross-entropy on y_hat from the audio prompt
            per_tok = -kl_and_logp("ref", False)[1]
        else:  # KL(pi(.|x_t) || pi(.|x_a)) along the text-conditioned trajectory
            per_tok = token_forward_kl(head(hs), h_t @ W_t.T, m_ref, args.chunk_size)
        L = ((per_tok * m_ref).sum(-1) / m_ref.sum(-1).clamp(min=1)).mean()
        loss = loss + L
        metrics[f"loss_{obj}"] = L.item()
    loss.backward()
    tm["t_student"] = _sync_time(dev) - clock + tm.pop("t_encoder")
    metrics.update(loss=loss.item(), **tm)
    return loss.detach(), metrics


def batch_at(n_examples: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of step `step`: epoch-wise permutations fixed by the seed, so a resumed run sees the same batches.

    Under torchrun this is the global batch (per-rank batch x world size); rank r takes slice r of it.
    """
    out, perms = [], {}
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(i, n_examples)
        if epoch not in perms:  # one permutation per epoch touched, not one per index
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n_examples)
        out.append(int(perms[epoch][j]))
    return out


def save_checkpoint(lalm: LALM, opt, step: int, args: Args) -> Path:
    """Write checkpoint-<step> into a temporary folder, then rename: a crash never leaves half a checkpoint.

    The folder is an ordinary save_pretrained folder plus optimizer.pt, rng.pt (one RNG state per rank)
    and state.json, written last, listing every file's size. Under torchrun every rank calls this (FSDP
    gathers its shards, each rank hands over its RNG state) and rank 0 alone writes.
    """
    import signal

    rank, world = rank_world()
    out, dev = Path(args.output), lalm.device
    final, tmp = out / f"checkpoint-{step:06d}", out / f".tmp-checkpoint-{step:06d}"
    rng = gather_objects({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None})
    weights, opt_state = fsdp_gather(lalm, opt) if args.fsdp else (None, opt.state_dict())  # dist: every rank takes part
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model_folder(lalm, lalm.model, tmp, weights)
        torch.save(opt_state, tmp / "optimizer.pt")
        torch.save(rng, tmp / "rng.pt")  # list: rank r's state at index r
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / "state.json").write_text(json.dumps({"step": step, "world_size": world, "files": files, "args": asdict(args)}, indent=1))
        fsync_tree(tmp)  # on disk before the rename publishes it (a node crash, not only a killed process)
        if os.environ.get("CORD_TEST_KILL_IN_SAVE") == str(step):  # test hook (test_cord.py): die between write and rename
            os.kill(os.getpid(), signal.SIGKILL)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: checkpoint-<step> is complete or absent
        fsync_tree(out, files=False)
    if world > 1:
        torch.distributed.barrier()  # dist: no rank goes on before the checkpoint exists
    return final


def last_checkpoint(output: str) -> Optional[Path]:
    """The newest complete checkpoint; incomplete or corrupted ones are reported and skipped.

    Complete = state.json parses, names the folder's step, and every file it lists has its recorded size
    (a truncated or missing file fails); .tmp-checkpoint-* folders (a write cut short) are never candidates.
    """
    for ckpt in sorted(Path(output).glob("checkpoint-*"), reverse=True):
        try:
            state = json.loads((ckpt / "state.json").read_text())
            assert state["step"] == int(ckpt.name.split("-")[1]) and (ckpt / "optimizer.pt").is_file()
            assert any(ckpt.glob("*.safetensors"))
            bad = [f for f, size in state.get("files", {}).items() if not (ckpt / f).is_file() or (ckpt / f).stat().st_size != size]
            assert not bad, f"{bad[0]} missing or of the wrong size"
            return ckpt
        except (OSError, ValueError, KeyError, AssertionError) as e:
            print(f"skipping {ckpt}: incomplete or corrupted checkpoint ({type(e).__name__}: {e})", file=sys.stderr)
    return None


def load_checkpoint(lalm: LALM, ckpt: Path) -> None:
    """A checkpoint's weights into the model (before FSDP shards it; load_training_state does the rest)."""
    from safetensors.torch import load_file

    if hasattr(lalm.model, "disable_adapter"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(lalm.model, load_file(ckpt / "adapter_model.safetensors"))
    else:
        from transformers.modeling_utils import load_sharded_checkpoint

        if (ckpt / "model.safetensors").is_file():
            missing, unexpected = lalm.model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
            tied = set(getattr(lalm.model, "_tied_weights_keys", None) or [])
            if unexpected or set(missing) - tied:
                raise SystemExit(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        else:
            load_sharded_checkpoint(lalm.model, ckpt, strict=False)


def load_training_state(lalm: LALM, opt, ckpt: Path, args: Args) -> int:
    """The optimizer state and this rank's RNG state from a checkpoint -> its step."""
    rank, world = rank_world()
    state = json.loads((ckpt / "state.json").read_text())
    if state.get("world_size", 1) != world:  # the global batch and each rank's sampling stream depend on it
        raise SystemExit(f"{ckpt} was written by {state.get('world_size', 1)} processes; resume it with as many (this run: {world})")
    if state["args"].get("fsdp", False) != args.fsdp:  # the two optimizer-state layouts differ
        raise SystemExit(f"{ckpt} was written with --fsdp {state['args'].get('fsdp', False)}; resume it with the same")
    if args.fsdp:  # dist: rank 0 reads the full optimizer state and FSDP scatters each rank its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        full = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True) if rank == 0 else {}
        set_optimizer_state_dict(lalm.model, opt, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    else:
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=lalm.device, weights_only=True))
    rng = torch.load(ckpt / "rng.pt", weights_only=True)[rank]  # dist: each rank continues its own stream
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], lalm.device)
    return state["step"]


# Several processes (torchrun): every rank runs train() on its own slice of the global batch. In a plain
# `python cord.py` run rank = 0 and world = 1, and the lines marked `# dist:` in train() and the
# checkpoint functions do nothing.


def rank_world() -> tuple[int, int]:
    """(rank, world size) under torchrun; (0, 1) in one process."""
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in one process."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    objs = [None] * world
    torch.distributed.all_gather_object(objs, obj)
    return objs


def all_reduce_grads(params: list) -> None:
    """Average the gradients over ranks, as DDP does: the result is the global batch's gradient.

    Not DDP(model): DDP reduces in autograd hooks that its wrapper's forward() arms, and train_step
    never calls model.forward (it calls the audio encoder and the decoder directly and uses the lm_head
    weight inside _FusedHead), so those hooks would never fire. Every loss is a mean over sequences
    and every rank holds B of them, so the mean of the ranks' gradients equals the gradient of one
    process on all B * world (exactly, except --grpo_reduction token, which is a mean over tokens).
    """
    world = torch.distributed.get_world_size()
    for p in params:  # a parameter this rank did not use still joins the sum, with zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    handles = [torch.distributed.all_reduce(p.grad, async_op=True) for p in params]  # sum; NCCL batches them
    for p, h in zip(params, handles):
        h.wait()
        p.grad.div_(world)


def shard_fsdp(lalm: LALM) -> list:
    """--fsdp: FSDP2, one unit per decoder layer plus the root (embeddings, lm_head, norm, audio encoder).

    FSDP gathers a unit's parameters in hooks around its forward(). The decoder layers are always called
    through forward(); the root's forward() never is: train_step reaches the root's modules through
    get_input_embeddings() / get_decoder() / get_output_embeddings() (and lm_head.weight inside
    _FusedHead). Registering those three getters as FSDP forward methods (the documented hook for
    entry points other than forward) gathers the root's parameters before any of them is touched; they
    stay gathered (FSDP never reshards its root after forward) until FSDP's end-of-backward callback
    reduce-scatters their gradients and reshards them. Decoder layers are not resharded after forward
    either (ZeRO-2 style): a rollout calls every layer once per generated token, and resharding would
    all-gather each layer T times per step; gradients and AdamW states stay sharded. Returns the
    trainable parameters, now DTensor shards.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if rank_world()[1] == 1 and not torch.distributed.is_initialized():
        raise SystemExit("--fsdp shards the model across processes: launch with torchrun (README: several GPUs)")
    if hasattr(lalm.model, "disable_adapter"):
        raise SystemExit("--fsdp is for full fine-tuning; with --train lora launch torchrun without --fsdp")
    for layer in lalm.base.get_decoder().layers:
        fully_shard(layer, reshard_after_forward=False)
    fully_shard(lalm.model)
    for name in ("get_input_embeddings", "get_decoder", "get_output_embeddings"):
        register_fsdp_forward_method(lalm.model, name)
    lalm.model.get_input_embeddings(), lalm.model.reshard()  # the first module FSDP sees run becomes its root
    return [p for p in lalm.model.parameters() if p.requires_grad]  # sharded: FSDP swaps gathered ones in and out


def fsdp_gather(lalm: LALM, opt=None) -> tuple[dict, Optional[dict]]:
    """--fsdp: full weights (and optimizer state) on rank 0's CPU, empty elsewhere; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(lalm.model, options=full), get_optimizer_state_dict(lalm.model, opt, options=full) if opt else None


def save_model_folder(lalm: LALM, model, folder: Path, weights: Optional[dict] = None) -> None:
    """An ordinary save_pretrained folder (model, processor or tokenizer, feature extractor); weights: gathered FSDP ones."""
    model.save_pretrained(folder, safe_serialization=True, **({} if weights is None else {"state_dict": weights}))
    for part in (lalm.processor or lalm.tokenizer, lalm.feature_extractor):
        part.save_pretrained(folder)


def fsync_tree(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (files=True) and its list of entries to disk (POSIX)."""
    for f in folder.rglob("*") if files else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def train(lalm: LALM, examples: list[dict], args: Args) -> Path:
    """The flat loop: batch -> train_step -> clip -> AdamW; a JSON line of metrics per step.

    Under torchrun every rank runs this loop on its slice of the global batch (B per rank x world size),
    gradients are averaged over ranks (all_reduce_grads, or FSDP's reduce-scatter with --fsdp), and rank 0
    alone logs and writes checkpoints (each holding every rank's RNG state).
    """
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rank, world = rank_world()  # dist: (0, 1) in one process
    B = args.batch_size  # per process; the global batch is B * world
    params = configure_trainable(lalm, args)
    if args.gradient_checkpointing:
        lalm.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = Teacher(lalm, args.teacher)  # before a checkpoint loads: a frozen teacher keeps the initial weights
    judge = make_judge(args, lalm) if args.objective in ("cord", "grpo", "opd+grpo") else None
    ckpt = last_checkpoint(args.output) if args.resume and rank == 0 else None
    ckpt = gather_objects(ckpt)[0]  # dist: every rank resumes from the checkpoint rank 0 found
    if ckpt:
        load_checkpoint(lalm, ckpt)
    if args.fsdp:
        params = shard_fsdp(lalm)  # dist: the parameters become this rank's shards
    elif world > 1:
        for p in params:  # dist: every rank starts from rank 0's weights, as DDP does
            torch.distributed.broadcast(p.data, 0)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = load_training_state(lalm, opt, ckpt, args) if ckpt else 0
    if start == 0:
        torch.manual_seed(args.seed + rank)  # dist: each rank samples its own rollouts
    log = None
    if rank == 0:
        if ckpt:
            print(f"resumed from {ckpt} at step {start}")
        print(f"global batch: {B * world} prompts per step = {B} per process x {world} process(es)")
        kept = [l for l in open(out / "metrics.jsonl")][:start] if start and (out / "metrics.jsonl").is_file() else []
        log = open(out / "metrics.jsonl", "w")  # a resumed run drops the lines of steps after its checkpoint
        log.writelines(kept)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=f"{args.objective}", dynamic_ncols=True, disable=rank > 0)
    for step in bar:
        clock = time.perf_counter()
        ids = batch_at(len(examples), step, B * world, args.seed)[rank * B:(rank + 1) * B]  # dist: this rank's slice
        batch = [examples[i] for i in ids]
        opt.zero_grad(set_to_none=True)
        _, m = train_step(lalm, teacher, judge, batch, args)
        t0 = _sync_time(lalm.device)
        if world > 1 and not args.fsdp:
            all_reduce_grads(params)  # dist: (FSDP has already reduce-scattered them in backward)
        norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        m["grad_norm"] = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()  # FSDP: a DTensor
        opt.step()
        m["t_optimizer"] = _sync_time(lalm.device) - t0
        m["t_step"] = time.perf_counter() - clock
        if world > 1:  # dist: log the mean over ranks
            ms = gather_objects(m)
            m = {k: float(np.mean([x[k] for x in ms if k in x])) for k in dict.fromkeys(k for x in ms for k in x)}
        m["step"] = step + 1
        if log:
            log.write(json.dumps(m) + "\n"), log.flush()
            bar.set_postfix(loss=f"{m['loss']:.3f}", kl=f"{m.get('kl_mean', 0):.3f}", r=f"{m.get('reward_mean', 0):.2f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            save_checkpoint(lalm, opt, step + 1, args)
    final, tmp = out / "final", out / ".tmp-final"
    model = lalm.model.merge_and_unload() if hasattr(lalm.model, "merge_and_unload") else lalm.model
    weights = fsdp_gather(lalm)[0] if args.fsdp else None  # dist: every rank takes part
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model_folder(lalm, model, tmp, weights)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if world > 1:
        torch.distributed.barrier()  # dist: final/ exists when train() returns on any rank
    return final


# ----------------------------------------------------------------------------------------------
# Evaluation: every item answered twice (audio, text), greedily; the token-KL analysis of Fig. 3


@torch.no_grad()
def evaluate(lalm: LALM, examples: list[dict], args: Args, out_dir: Optional[str] = None, baseline: Optional[dict] = None,
             kl: bool = True) -> dict:
    """acc_text, acc_audio, gap = acc_text - acc_audio, gap reduction vs a baseline, KL statistics (kl=True)."""
    rule = judge_lib.RuleJudge(ground_truth=True)
    lalm.model.eval()
    items, D_all, D_pos, tok_kl = [], [], {}, {}
    for i in tqdm(range(0, len(examples), args.eval_batch_size), desc="eval", dynamic_ncols=True):
        batch = examples[i:i + args.eval_batch_size]
        P = build_prompts(lalm, batch, args.instruction, args.system_prompt)
        x_a = embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])
        x_t = embed_prompts(lalm, P["text_ids"])
        y_a, m_a = sample(lalm, x_a, P["audio_mask"], 1, 0.0, args.max_new_tokens)  # greedy, (B, T)
        y_t, m_t = sample(lalm, x_t, P["text_mask"], 1, 0.0, args.max_new_tokens)
        D = token_reverse_kl(completion_logits(lalm, x_a, P["audio_mask"], y_a, m_a),  # Eq. 2 on the audio rollout
                             completion_logits(lalm, x_t, P["text_mask"], y_a, m_a), m_a, args.chunk_size) if kl else y_a * 0.0
        for ex, ca, ct, d, y, m in zip(batch, decode(lalm, y_a, m_a), decode(lalm, y_t, m_t), D, y_a, m_a):
            answer = None if ex.get("answer") is None else str(ex["answer"])
            score = (lambda c: bool(rule([c], [answer])[0])) if answer is not None else (lambda c: None)
            d = d[m].float().cpu()
            D_all.append(d)
            for t, (v, tok) in enumerate(zip(d.tolist(), y[m].tolist())):
                D_pos.setdefault(t, []).append(v)
                tok_kl.setdefault(tok, []).append(v)
            items.append({"id": ex["id"], "answer": answer, "audio_completion": ca, "text_completion": ct,
                          "audio_correct": score(ca), "text_correct": score(ct), "kl_mean": d.mean().item() if len(d) else 0.0})
    scored = [it for it in items if it["answer"] is not None]
    acc = lambda key: 100.0 * sum(bool(it[key]) for it in scored) / max(len(scored), 1)
    s = {"n": len(items), "n_scored": len(scored), "acc_text": acc("text_correct"), "acc_audio": acc("audio_correct")}
    s["gap"] = s["acc_text"] - s["acc_audio"]
    if baseline and baseline.get("gap"):
        s["gap_reduction"] = (baseline["gap"] - s["gap"]) / baseline["gap"]  # (gap_base - gap) / gap_base
    D = torch.cat(D_all) if D_all else torch.zeros(1)
    s.update({f"kl_p{q}": torch.quantile(D, q / 100).item() for q in (50, 80, 95)}, kl_mean=D.mean().item())
    s["kl_by_position"] = [float(np.mean(D_pos[t])) for t in sorted(D_pos) if len(D_pos[t]) >= 5]
    pos = np.array([float(t) for t in sorted(D_pos) for _ in D_pos[t]])  # Fig. 3: is the KL concentrated early?
    val = np.array([v for t in sorted(D_pos) for v in D_pos[t]])
    s["kl_position_corr"] = float(np.corrcoef(pos, val)[0, 1]) if len(pos) > 2 and pos.std() > 0 and val.std() > 0 else 0.0
    top = sorted(((np.mean(v), t) for t, v in tok_kl.items() if len(v) >= 5), reverse=True)[:15]
    s["top_kl_tokens"] = [[lalm.tokenizer.decode([t]), round(float(v), 4)] for v, t in top]
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(out_dir) / "items.jsonl", "w") as f:
            f.writelines(json.dumps(it) + "\n" for it in items)
        (Path(out_dir) / "summary.json").write_text(json.dumps(s, indent=1))
    return s


# ----------------------------------------------------------------------------------------------
# The CPU demo: a tiny Qwen2-Audio that hears worse than it reads, and CORD closing the gap
# (the paper's Tables 1 and 3 in miniature). Settings that differ from the paper's, for a 1.5 M
# parameter model with ~20-token completions; each applies only where the flag was left at its default.
# train="audio" (encoder + projector): the tiny language model barely holds the task, and training it
# too cost up to 9 points of text accuracy on one of two builds (README, "The CPU demo").

DEMO = dict(steps=60, batch_size=16, max_new_tokens=24, k=4, train="audio", eval_limit=500, save_every=20)


def demo_args(args: Args, **over) -> Args:
    from tiny_lalm import INSTRUCTION

    paper = Args()
    changed = {k: v for k, v in DEMO.items() if getattr(args, k) == getattr(paper, k)}
    if args.instruction == paper.instruction:
        changed["instruction"] = INSTRUCTION
    return replace(args, **changed, **over)


def train_with_curve(args: Args, examples, eval_examples, out: Path, base: dict) -> list[dict]:
    """Train in segments of --eval_every steps (resuming from the checkpoint) and evaluate after each."""
    lalm, curve = setup(args), [dict(step=0, **{k: base[k] for k in ("acc_text", "acc_audio", "gap")})]
    every = args.eval_every or args.steps
    for stop in range(every, args.steps + every, every):
        seg = replace(args, steps=min(stop, args.steps), resume=True, save_every=every)
        train(lalm, examples, seg)
        s = evaluate(lalm, eval_examples, seg, None, base, kl=False)
        curve.append(dict(step=seg.steps, **{k: s.get(k, float("nan")) for k in ("acc_text", "acc_audio", "gap", "gap_reduction")}))
        print(json.dumps({"objective": args.objective, "seed": args.seed, **curve[-1]}))
    (out / "curve.json").write_text(json.dumps(curve, indent=1))
    return curve


def demo(args: Args, **build):
    """python cord.py: build (or load) the tiny LALM, evaluate, train with CORD, evaluate, print the table.

    `build` goes to tiny_lalm.load_or_build (the tests use a drastically reduced budget)."""
    from tiny_lalm import load_or_build

    clock = time.time()
    model, _, train_m, eval_m = load_or_build(seed=args.seed, **build)
    args = demo_args(args, model=str(Path(train_m).parents[2]), data=str(train_m))
    built = time.time() - clock
    examples, ev = read_manifest(args.data), read_manifest(str(eval_m))[: args.eval_limit]
    out = Path(args.output)
    if args.compare:
        return compare(args, examples, ev)
    lalm = setup(args)
    base = evaluate(lalm, ev, args, str(out / "eval-base"))
    clock = time.time()
    train(lalm, examples, args)
    minutes = (time.time() - clock) / 60
    after = evaluate(lalm, ev, args, str(out / "eval-final"), base)
    print(f"\ntiny LALM ({sum(p.numel() for p in lalm.model.parameters()) / 1e6:.1f} M params), {len(ev)} held-out spoken problems,"
          f" {args.objective} for {args.steps} steps ({minutes:.1f} min; model build/load {built / 60:.1f} min)")
    print(f"{'':10}{'text acc':>10}{'audio acc':>11}{'gap':>8}")
    for name, s in (("before", base), ("after", after)):
        print(f"{name:10}{s['acc_text']:10.1f}{s['acc_audio']:11.1f}{s['gap']:8.1f}")
    print(f"gap reduction: {100 * after.get('gap_reduction', 0):.1f} %  (paper: 41.6 % Qwen2-Audio, 44.8 % Step-Audio2)")
    return {"before": base, "after": after, "minutes": minutes}


def compare(args: Args, examples, ev) -> dict:
    """Every --compare_objectives x --compare_seeds on the same tiny LALM and data: results.md, curves.png."""
    out = Path(args.output)
    base = evaluate(setup(args), ev, args, str(out / "eval-base"))
    results = {}
    for obj in args.compare_objectives.split(","):
        for seed in range(args.compare_seeds):
            run = out / f"{obj}-seed{seed}"
            if (run / "curve.json").is_file():  # resumable: finished runs are kept
                results[(obj, seed)] = json.loads((run / "curve.json").read_text())
                continue
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            results[(obj, seed)] = train_with_curve(replace(args, objective=obj, seed=seed, output=str(run)), examples, ev, run, base)
    rows = ["| objective | text acc | audio acc | gap | gap reduction |", "|---|---|---|---|---|",
            f"| base model | {base['acc_text']:.1f} | {base['acc_audio']:.1f} | {base['gap']:.1f} | – |"]
    for obj in args.compare_objectives.split(","):
        last = [results[(obj, s)][-1] for s in range(args.compare_seeds)]
        ms = lambda k, f=1.0: f"{f * np.mean([r[k] for r in last]):.1f} ± {f * np.std([r[k] for r in last]):.1f}"
        rows.append(f"| {obj} | {ms('acc_text')} | {ms('acc_audio')} | {ms('gap')} | {ms('gap_reduction', 100)} % |")
    table = "\n".join(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)
    plot_curves(results, args, out / "curves.png")
    return {"base": base, "runs": {f"{o}-seed{s}": c for (o, s), c in results.items()}}


def plot_curves(results: dict, args: Args, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for obj in args.compare_objectives.split(","):
        curves = [results[(obj, s)] for s in range(args.compare_seeds)]
        steps = [p["step"] for p in curves[0]]
        for ax, key in zip(axes, ("acc_text", "acc_audio", "gap")):
            y = np.array([[p[key] for p in c] for c in curves])
            ax.plot(steps, y.mean(0), label=obj, lw=2.5 if obj == "cord" else 1.2)
            ax.fill_between(steps, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.15)
    for ax, title in zip(axes, ("text accuracy (%)", "audio accuracy (%)", "gap = text - audio (points)")):
        ax.set_title(title), ax.set_xlabel("step"), ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"tiny Qwen2-Audio, {args.compare_seeds} seeds (mean ± std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------
# main


def setup(args: Args) -> LALM:
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)  # every rank alike: same init
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "LOCAL_RANK" in os.environ and not torch.distributed.is_initialized():  # dist: started by torchrun
        import atexit
        import datetime

        if device.type == "cuda":  # one GPU per process
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        # a long timeout: the other ranks wait while rank 0 writes a checkpoint
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))
        atexit.register(torch.distributed.destroy_process_group)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    return load_lalm(args.model, dtype, device, args.trust_remote_code)


def main(argv=None):
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.objective not in ("cord", "opd", "grpo", "opd+grpo", "sft", "fkl"):
        raise SystemExit(f"--objective {args.objective}: choose cord, opd, grpo, opd+grpo, sft or fkl")
    if args.model is None:
        return demo(args)
    lalm = setup(args)
    if args.eval:
        base = json.loads(Path(args.baseline).read_text()) if args.baseline else None
        data = read_manifest(args.data)[: args.eval_limit]
        s = evaluate(lalm, data, args, args.output, base)
        print(json.dumps({k: v for k, v in s.items() if not isinstance(v, list)}, indent=1))
        return s
    if args.data is None:
        raise SystemExit("--data: give a training manifest (JSONL; see README) or use --eval")
    final = train(lalm, read_manifest(args.data), args)
    print(f"saved {final}")
    return final


if __name__ == "__main__":
    main()
