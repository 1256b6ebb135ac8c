"""CORD: Bridging the Audio-Text Reasoning Gap via Weighted On-policy Cross-modal Distillation.

Hu, Zhu, Luo, Zhang, He, Lei, Zheng, Feng, He, Sun, Wu, Wang. arXiv 2601.16547 (2026).
One audio LLM pi_theta hears a question (x_a) and reads its transcript (x_t); on its own audio
rollouts it is pulled towards its own text-conditioned predictions, token by token (weighted
reverse KL, Eq. 2-7) and sequence by sequence (a judge reward optimised with GRPO, Eq. 8-10).
This file is the paper; the files beside it hold what is not (README: the file tree).

    python cord.py                      # CPU demo (demo/run.py): tiny Qwen2-Audio, before/after table
    python cord.py --model Qwen/Qwen2-Audio-7B-Instruct --data data/train/manifest.jsonl --output runs/cord
    python cord.py --eval true --model runs/cord/final --data data/eval/manifest.jsonl --output runs/eval

Shapes: B prompts per step, G rollouts per prompt (the paper's N), R rows (one row = one prompt +
one completion; R = B, B * G or B * (1 + G)), S prompt tokens (S_a audio prompt, S_t text prompt),
T completion tokens, V vocabulary, C hidden size, M mel bins, F feature frames.

Departures from the paper (each switchable unless noted):
 1. Rollouts come from our own 25-line KV-cache sampler (cordkit/rollout.py `sample`), not `model.generate`: one
    audio-encoder call and one prefill per prompt are shared by all samples of that prompt.
 2. The reference answer y_hat for the judge (Eq. 8) is greedy (`--ref_temperature 0`).
 3. `--reward_ref answer` (or `both`) uses the ground-truth answer instead of / besides y_hat.
 4. Eq. 7 is normalised by sum_t w_t (`--normalize weights`) so alpha = beta = 1 is exactly Eq. 3;
    `--normalize length` divides by T instead.
 5. pi_old = pi_theta (one update per batch), so rho = 1 and Eq. 10 is the plain policy gradient, at a
    temperature the paper does not give: the GRPO log-probs use logits / tau_grpo, the policy that sampled
    the rollouts (`--grpo_logp_temperature sampling`, as TRL and verl do), for only then is
    A_i grad log pi(y_i) the policy gradient of the distribution whose rewards were measured
    (`one`: tau = 1). Eq. 2's KL uses temperature 1.
 6. GRPO advantages divide by std + 1e-4 by default (`--adv_scale none`: Dr. GRPO / the paper's
    Eq. 9 as written).
 7. The OPD rollout (tau = 1.0) and the G GRPO rollouts (tau = 1.5) share one prefill per prompt
    (`--opd_rollout separate`, the paper); `--opd_rollout group` puts the token loss on the group.
 8. `--k_frac f` (off by default) makes K in Eq. 4 a fraction of each sequence's length, for
    completions much shorter than the paper's 200 tokens (where K = 20 selects every token).
 9. Extra baselines beside the paper's ablations: `sft` (cross-entropy on y_hat from the audio
    prompt) and `fkl` (off-policy forward KL along the text-conditioned trajectory).
10. Under torchrun, gradients are averaged with all_reduce after backward rather than by a DDP
    wrapper (train_step calls the model's submodules directly; DDP's hooks need its forward).
11. Training computes Eq. 2 and log pi(y_t) with cordkit/chunked.py (`head_terms`, `kl`): bounded memory, the
    reference functions' values and gradients (`--chunk_size 0`: one piece). On CUDA, rollouts use a static KV cache
    and CUDA graphs (`--compile_rollout off`: eager) and LoRA merged into a weight copy (`--merge_lora off`: adapters).
The CPU demo (no --model) changes a few settings for a 1.5 M-parameter model: demo/run.py says which.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import HfArgumentParser

import judge as judge_lib
from cordkit import chunked, evaluation, plumbing, rollout
from cordkit.families import LALM, audio_window_seconds, configure_trainable, enable_gradient_checkpointing, load_lalm
from cordkit.manifest import check_durations, load_audio, load_manifest, with_transcripts
from cordkit.rollout import positions, sample

OBJECTIVES = ("cord", "opd", "grpo", "opd+grpo", "sft", "fkl")
# value ranges, checked at parse time: POSITIVE's > 0, MIN_VALUE's >= their value
POSITIVE = ("alpha", "clip_eps", "lr", "max_grad_norm")
MIN_VALUE = dict(eval_every=0, threads=0, lora_r=1, k=1, k_frac=0, beta=1, group_size=1, temperature=0,
                 grpo_temperature=0, ref_temperature=0, max_new_tokens=1, weight_decay=0, batch_size=1, steps=1,
                 chunk_size=0, save_every=1, save_total_limit=0, eval_limit=1, eval_batch_size=1)


# ----------------------------------------------------------------------------------------------
# Arguments (defaults are the paper's hyperparameters)


def arg(default, text: str):  # a field whose --help line is `text`
    return field(default=default, metadata={"help": text})


@dataclass
class Args:
    model: Optional[str] = arg(None, "local dir or hub id; none = the tiny CPU demo")
    data: Optional[str] = arg(None, "training manifest (JSONL), or eval manifest with --eval")
    eval_data: Optional[str] = arg(None, "manifests (comma-separated) evaluated during training: eval.jsonl")
    output: str = arg("runs/cord", "output folder: metrics.jsonl, checkpoints, final/")
    eval: bool = arg(False, "only evaluate --model on --data (audio vs text accuracy)")
    baseline: Optional[str] = arg(None, "summary.json of the base model, for gap reduction")
    eval_every: int = arg(0, "evaluate --eval_data (the demo: its eval set) every n steps; 0 = before/after")
    threads: int = arg(0, "torch CPU threads; 0 = torch's default (use 1 per process when several share the cores)")
    objective: Literal[OBJECTIVES] = arg("cord", "cord | opd (Eq. 3) | grpo | opd+grpo | sft | fkl")
    teacher: Literal["live", "frozen"] = arg("live", "live: current weights; frozen: initial weights")
    train: Literal["all", "llm", "audio", "lora"] = arg("all", "which parameters train")
    lora_r: int = arg(16, "LoRA rank with --train lora")
    k: int = arg(20, "K in Eq. 4: top-K positions by D_t get weight alpha")
    k_frac: float = arg(0.0, "if > 0: K = ceil(k_frac * T) per sequence (departure 8)")
    alpha: float = arg(2.0, "alpha in Eq. 4 (importance weight)")
    beta: float = arg(2.0, "beta in Eq. 5 (weight of the first token)")
    normalize: Literal["weights", "length"] = arg("weights", "Eq. 7 reduction: sum_t w_t | T")
    group_size: int = arg(4, "G (the paper's N): GRPO rollouts per audio prompt (Eq. 9)")
    temperature: float = arg(1.0, "tau of the OPD rollout")
    grpo_temperature: float = arg(1.5, "tau of the GRPO rollouts")
    grpo_logp_temperature: Literal["sampling", "one"] = arg("sampling", "Eq. 10: log pi at tau_grpo | 1 (departure 5)")
    ref_temperature: float = arg(0.0, "tau of y_hat ~ pi(.|x_t); 0 = greedy")
    opd_rollout: Literal["separate", "group"] = arg("separate", "separate (paper) | group (L_tok on the GRPO group)")
    max_new_tokens: int = arg(200, "max completion length T")
    lam: float = arg(1.0, "lambda: L = L_tok + lambda L_seq")
    clip_eps: float = arg(0.2, "epsilon in Eq. 10")
    adv_scale: Literal["std", "none"] = arg("std", "Eq. 9: std (GRPO) | none (r - mean, Dr. GRPO)")
    grpo_reduction: Literal["sequence", "token"] = arg("sequence", "Eq. 10: sequence (1/|y_i| then mean) | token")
    reward_ref: Literal["text", "answer", "both"] = arg("text", "Eq. 8 reference: text (y_hat) | answer | both")
    judge: Literal["rule", "model"] = arg("rule", "rule (judge.RuleJudge) | model (judge.ModelJudge)")
    judge_model: Optional[str] = arg(None, "causal LM for --judge model; none = the LALM")
    instruction: str = arg("Solve the problem. End with: The answer is <answer>.", "after the audio / the transcript")
    system_prompt: Optional[str] = arg(None, "system prompt; none = the template's")
    lr: float = arg(3e-5, "AdamW learning rate")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    batch_size: int = arg(8, "B: audio prompts per step")
    steps: int = arg(1000, "optimizer steps")
    chunk_size: Optional[int] = arg(32, "positions per chunk of the exact KL (cordkit/chunked.py); 0 = one piece")
    compile_rollout: Literal["auto", "on", "off"] = arg("auto", "static KV cache + CUDA graph rollouts; auto = on CUDA")
    merge_lora: Literal["auto", "on", "off"] = arg("auto", "LoRA rollouts use a merged copy W + s B A; auto = on CUDA")
    save_every: int = arg(100, "checkpoint every this many steps")
    long_audio: Literal["refuse", "drop", "cut"] = arg("refuse", "clips over the audio window: cut = hear their start")
    resume: bool = arg(False, "continue from the last complete checkpoint in --output")
    overwrite: bool = arg(False, "start over in an --output that holds a run (its checkpoints are deleted)")
    save_total_limit: int = arg(3, "keep the newest n checkpoints; 0 = all")
    eval_limit: Optional[int] = arg(None, "evaluate only the first n items")
    eval_batch_size: int = arg(32, "prompts per eval batch")
    seed: int = arg(0, "run seed")
    dtype: Literal["auto", "bfloat16", "float32"] = arg("auto", "auto = bf16 on GPU, fp32 on CPU")
    device: Optional[str] = arg(None, "cuda / cpu; none = cuda if available")
    gradient_checkpointing: bool = arg(False, "recompute activations in backward")
    trust_remote_code: bool = arg(False, "allow custom model code from the hub")
    fsdp: bool = arg(False, "under torchrun: shard a full fine-tune across ranks (FSDP2)")
    report_to: Literal["none", "tensorboard", "wandb"] = arg("none", "also log to <output>/tensorboard | W&B")


# ----------------------------------------------------------------------------------------------
# Prompts: x_a and x_t for one LALM (families.py loads it: the model, its tokenizer, its audio path)


def _render(lalm: LALM, content: list[dict], system_prompt: Optional[str]) -> str:
    """One user turn in the model's chat template, ending where the model's answer starts."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages = system + [{"role": "user", "content": content}]
    return lalm.tokenizer.apply_chat_template(messages, chat_template=lalm.chat_template, tokenize=False,
                                              add_generation_prompt=True)


def build_prompts(lalm: LALM, examples: list[dict], instruction: str, system_prompt: Optional[str] = None) -> dict:
    """x_a = [audio] + prompt + instruction; x_t = transcript + the same prompt + instruction; one template.
    The instruction is the row's `instruction` when it has one (data_gen.py writes the benchmark's own), else
    `instruction`.

    A row's `text` is exactly what its audio says: the teacher reads it in place of hearing it, and none of
    it enters x_a. Its optional `prompt` (e.g. MMAU's question and options) is shown in both. An audio-only
    row (no `text`) gets x_t = prompt + instruction; its text answers are not scored. Returns left-padded
    `audio_ids`/`audio_mask` (B, S_a) with the audio placeholder already repeated once per encoder output,
    `features`/`feature_mask` (B, M, F)/(B, F), and `text_ids`/`text_mask` (B, S_t).
    """
    tok, fe = lalm.tokenizer, lalm.feature_extractor
    audio = [load_audio(ex["audio_path"], fe.sampling_rate) for ex in examples]
    features, feature_mask = lalm.extract_features(audio)  # (B, M, F), (B, F): the family's features (families.py)
    n_audio = lalm.audio_token_counts(feature_mask)  # (B,) placeholders per clip
    placeholder = tok.convert_ids_to_tokens(lalm.audio_token_id)
    audio_texts, text_texts = [], []
    for ex, n in zip(examples, n_audio.tolist()):
        own = ex.get("instruction", instruction)  # a row's own instruction ("": none) replaces --instruction
        shown = "\n".join(filter(None, [ex.get("prompt"), own]))  # in both prompts
        heard = [{"type": "audio", "audio": str(ex["audio_path"])}, {"type": "text", "text": shown}]
        a = _render(lalm, heard, system_prompt)
        if a.count(placeholder) != 1:
            raise SystemExit(f"the chat template must render one {placeholder} per audio (got {a.count(placeholder)})")
        audio_texts.append(a.replace(placeholder, placeholder * n))
        read = "\n".join(filter(None, [ex.get("text"), shown]))  # the transcript in place of the audio
        text_texts.append(_render(lalm, [{"type": "text", "text": read}], system_prompt))
    enc = lambda texts: tok(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    a, t = enc(audio_texts), enc(text_texts)
    dev = lalm.device
    return dict(audio_ids=a["input_ids"].to(dev), audio_mask=a["attention_mask"].to(dev),
                features=features.to(dev, lalm.model.dtype), feature_mask=feature_mask.to(dev),
                text_ids=t["input_ids"].to(dev), text_mask=t["attention_mask"].to(dev))


def embed_prompts(lalm: LALM, ids, features=None, feature_mask=None):  # -> (B, S, C)
    """Token embeddings with the audio placeholders replaced by encoder outputs (one encoder call)."""
    x = lalm.base.get_input_embeddings()(ids)  # (B, S, C)
    if features is None:
        return x
    audio = lalm.audio_features(lalm.base, features, feature_mask).to(x.dtype)  # (audio tokens, C)
    slots = (ids == lalm.audio_token_id).unsqueeze(-1).expand_as(x)
    return x.masked_scatter(slots, audio)


def completion_hidden(lalm: LALM, prompt_embeds, prompt_mask, y, y_mask):  # -> (R, T, C)
    """Hidden states whose index t predicts completion token y_t (logits = lm_head of them).

    The two prompts differ in length: aligning on the completion makes index t of x_a's and of
    x_t's output the distributions over the same token y_t, given the same prefix y_<t (Eq. 2)."""
    S = prompt_embeds.shape[1]
    x = torch.cat([prompt_embeds, lalm.base.get_input_embeddings()(y[:, :-1])], 1)  # (R, S+T-1, C)
    mask = torch.cat([prompt_mask, y_mask[:, :-1].long()], 1)  # (R, S+T-1)
    decoder = lalm.base.get_decoder()
    h = decoder(inputs_embeds=x, attention_mask=mask, position_ids=positions(mask), use_cache=False).last_hidden_state
    return h[:, S - 1:]  # (R, T, C): position S-1+t sees x_{<S} and y_{<t}


def completion_logits(lalm: LALM, prompt_embeds, prompt_mask, y, y_mask):  # -> (R, T, V)
    return lalm.base.get_output_embeddings()(completion_hidden(lalm, prompt_embeds, prompt_mask, y, y_mask))


# ----------------------------------------------------------------------------------------------
# Loss math (Eq. 2-7). Pure functions: tensors in, tensors out; each can be copied alone.
# Logits are aligned: index t is the distribution over completion token t; mask (B, T) is True on
# real completion tokens (right padding). These are the reference versions, written for reading;
# training calls their memory-bounded twins in cordkit/chunked.py (`head_terms`, `kl`).


def token_reverse_kl(student_logits, teacher_logits, mask):  # -> D (B, T)
    """Eq. 2: D_t = KL(pi(.|x_a, y_<t) || sg pi(.|x_t, y_<t)), exact over V, fp32, 0 on padding.

    >>> s = torch.tensor([[[0.0, 0.0]]]); t = torch.tensor([[[1.0, 3.0]]]).log()
    >>> one = torch.ones(1, 1, dtype=torch.bool)
    >>> round(token_reverse_kl(s, t, one).item(), 4)  # 0.5 log(0.5/0.25) + 0.5 log(0.5/0.75)
    0.1438
    """
    log_p_a = F.log_softmax(student_logits.float(), -1)  # (B, T, V) student: heard
    log_p_t = F.log_softmax(teacher_logits.detach().float(), -1)  # (B, T, V) teacher: read, stop-gradient
    return (log_p_a.exp() * (log_p_a - log_p_t)).sum(-1) * mask  # (B, T) sum_v p_a (log p_a - log p_t)


def token_forward_kl(student_logits, teacher_logits, mask):  # -> (B, T)
    """KL(sg pi_t || pi_s): the off-policy Forward-KL baseline, on text-conditioned trajectories."""
    log_p_s = F.log_softmax(student_logits.float(), -1)  # (B, T, V) student
    log_p_t = F.log_softmax(teacher_logits.detach().float(), -1)  # (B, T, V) teacher, stop-gradient
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * mask  # (B, T) sum_v p_t (log p_t - log p_s)


def token_logprobs(logits, y):  # -> (B, T)
    """log pi(y_t | ...) at temperature 1 (GRPO's log pi_theta in Eq. 10)."""
    return torch.log_softmax(logits.float(), -1).gather(-1, y[..., None]).squeeze(-1)  # (B, T)


def top_k_mask(D, mask, k=20):  # -> (B, T) bool
    """The top-K positions of each sequence by detached D_t (Eq. 4's selection); padding never enters.

    `k` may be an int or a (B,) tensor (a K per sequence). T <= K selects every real token.
    >>> top_k_mask(torch.tensor([[0.1, 0.9, 0.5, 0.0]]), torch.tensor([[1, 1, 1, 0]]).bool(), k=2)
    tensor([[False,  True,  True, False]])
    """
    T = D.shape[1]
    k = torch.as_tensor(k, device=D.device).expand(D.shape[0]).clamp(max=T)  # (B,)
    order = D.detach().masked_fill(~mask, float("-inf")).argsort(-1, descending=True)  # (B, T) padding last
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=D.device).expand_as(order))  # (B, T)
    return (rank < k[:, None]) & mask  # (B, T)


def importance_weights(D, mask, k=20, alpha=2.0):  # -> (B, T)
    """Eq. 4: w_kl = alpha on the top-K positions of each sequence by detached D_t, else 1; 0 on padding.

    `k` may be an int or a (B,) tensor (a K per sequence). T <= K gives alpha everywhere.
    >>> importance_weights(torch.tensor([[0.1, 0.9, 0.5, 0.0]]), torch.tensor([[1, 1, 1, 0]]).bool(), k=1)
    tensor([[1., 2., 1., 0.]])
    """
    return torch.where(top_k_mask(D, mask, k), alpha, 1.0) * mask  # (B, T)


def position_weights(mask, beta=2.0):  # -> (B, T)
    """Eq. 5: w_pos = beta - (beta - 1)(t - 1)/(T - 1), T = that sequence's length; 0 on padding.

    >>> position_weights(torch.tensor([[1, 1, 1], [1, 0, 0]]).bool())
    tensor([[2.0000, 1.5000, 1.0000],
            [2.0000, 0.0000, 0.0000]])
    """
    L = mask.sum(-1, keepdim=True)  # (B, 1) each sequence's own T
    t = torch.arange(mask.shape[1], device=mask.device)[None]  # (1, T): t - 1 in the paper's 1-based t
    w = beta - (beta - 1) * t / (L - 1).clamp(min=1)  # (B, T); a 1-token sequence gets beta
    return w * mask


def cord_token_loss(student_logits, teacher_logits, mask, k=20, alpha=2.0, beta=2.0, normalize="weights"):
    """Eq. 6-7: L_tok = mean_b( sum_t w_t D_t / sum_t w_t ), w = w_kl * w_pos -> (loss, metrics).

    normalize="weights" (default): alpha = beta = 1 is exactly the uniform Eq. 3.
    normalize="length": divide by the sequence length T instead of sum_t w_t.
    >>> s, t, m = torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2, dtype=torch.bool)
    >>> cord_token_loss(s, t, m)[0].item()  # identical distributions: no divergence
    0.0
    """
    D = token_reverse_kl(student_logits, teacher_logits, mask)  # (B, T) Eq. 2
    return weighted_token_loss(D, mask, k, alpha, beta, normalize)


def weighted_token_loss(D, mask, k=20, alpha=2.0, beta=2.0, normalize="weights"):
    """Eq. 4-7 on given per-token KLs D (B, T) -> (loss, metrics); see cord_token_loss.

    Reduction: per sequence, sum_t w_t D_t / sum_t w_t (or / T); then the mean over sequences, each
    with equal weight (as Eq. 3's E_y[(1/T) sum_t]). Below w = (2 * 2, 1 * 1): 4 * 1.0 / 5.
    >>> round(weighted_token_loss(torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool), k=1)[0].item(), 4)
    0.8
    """
    w_kl = importance_weights(D, mask, k, alpha)  # (B, T) Eq. 4
    w = w_kl * position_weights(mask, beta)  # (B, T) Eq. 6: w_kl * w_pos
    denom = w.sum(-1) if normalize == "weights" else mask.sum(-1).to(w.dtype)  # (B,)
    has = mask.any(-1)  # (B,) sequences with at least one token
    per_seq = (w * D).sum(-1) / denom.clamp(min=1e-8)  # (B,) Eq. 7, per sequence
    loss = per_seq[has].mean() if has.any() else D.sum() * 0  # mean over sequences
    d = D.detach()[mask].float()  # (n tokens,)
    top = top_k_mask(D, mask, k)  # (B, T) the tokens Eq. 4 weights by alpha
    metrics = {"kl_mean": d.mean().item() if d.numel() else 0.0,
               "kl_top_share": (D.detach()[top].sum() / d.sum().clamp(min=1e-12)).item(),  # KL mass in the top-K
               "k_eff_frac": (top.sum() / mask.sum().clamp(min=1)).item()}  # share of tokens that top-K selects
    if d.numel():
        metrics.update({f"kl_p{q}": torch.quantile(d[:1_000_000], q / 100).item() for q in (50, 80, 95)})
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# GRPO (Eq. 8-10)


def grpo_advantages(rewards, group_size, scale="std", eps=1e-4):  # -> (B*G,)
    """Eq. 9: A_i = r_i - mean(r) within each contiguous group of G rows; scale="std" also / (std + eps).

    >>> grpo_advantages(torch.tensor([1., 0., 0., 0., 1., 1.]), 3, scale="none")
    tensor([ 0.6667, -0.3333, -0.3333, -0.6667,  0.3333,  0.3333])
    """
    r = rewards.float().view(-1, group_size)  # (B, G)
    A = r - r.mean(1, keepdim=True)  # (B, G)
    if scale == "std":
        A = A / (r.std(1, keepdim=True) + eps)  # unbiased std, as TRL's GRPO
    return A.view(-1)


def grpo_loss(logp, old_logp, advantages, mask, eps=0.2, group_size=None, reduction="sequence"):
    """Eq. 10: -(1/N) sum_i (1/|y_i|) sum_t min(rho A_i, clip(rho, 1-eps, 1+eps) A_i) -> (loss, metrics).

    logp, old_logp, mask: (B*G, T); advantages: (B*G,). reduction="sequence" is the paper's
    per-sequence token mean then mean over sequences; "token" averages over all tokens (DAPO).
    >>> lp, one = torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool)
    >>> grpo_loss(lp, lp, torch.tensor([1.0, -1.0]), one)[0].item()
    -0.0
    """
    A = advantages[:, None]  # (B*G, 1)
    rho = torch.exp(logp - old_logp.detach())  # (B*G, T)
    surrogate = torch.min(rho * A, rho.clamp(1 - eps, 1 + eps) * A)  # (B*G, T)
    m = mask.to(surrogate.dtype)  # (B*G, T)
    if reduction == "sequence":
        loss = -((surrogate * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()  # per sequence, then over sequences
    else:
        loss = -(surrogate * m).sum() / m.sum().clamp(min=1)  # over all tokens
    clipped = ((rho < 1 - eps) & (A < 0)) | ((rho > 1 + eps) & (A > 0))  # (B*G, T)
    metrics = {"clip_frac": (clipped & mask).sum().item() / max(mask.sum().item(), 1)}
    if group_size:
        metrics["zero_spread_frac"] = (advantages.view(-1, group_size).abs().amax(1) == 0).float().mean().item()
    return loss, metrics


def make_judge(args: Args, lalm: LALM):
    """J of Eq. 8 (judge.py): rule, or model (P(yes) that two answers agree, from --judge_model or the LALM's text)."""
    return judge_lib.make_judges(args.judge, lalm.base, lalm.tokenizer, args.judge_model, args.trust_remote_code,
                                 lalm.device)


def rewards_for(judges, completions: list[str], refs: list, answers: list, mode: str, rows=None) -> torch.Tensor:
    """Eq. 8: r_i = J(y_i, y_hat) in {0, 1}. mode answer: J(y_i, ground truth); both: the two must agree.

    Rows without a ground-truth answer fall back to y_hat. With the rule judge and the manifest `rows`, answers are
    read as evaluation reads them (judge.score_row, judge.judge_pairs: letters, option texts, numbers).
    """
    judge_text, judge_gt = judges
    if mode == "answer" and None in answers:
        raise SystemExit("--reward_ref answer: an example has no 'answer'; use --reward_ref text or both")

    def right(i):  # J(y_i, ground truth)
        if rows is not None and isinstance(judge_gt, judge_lib.RuleJudge):
            return float(judge_lib.score_row(completions[i], rows[i]))
        return judge_gt([completions[i]], [str(answers[i])])[0]

    if mode == "text":
        r = judge_lib.judge_pairs(judge_text, completions, refs, rows)  # J(y_i, y_hat)
    elif mode == "answer":
        r = [right(i) for i in range(len(completions))]
    else:  # both: y_hat and the ground truth must agree; y_hat alone where a row has no answer
        r_text = judge_lib.judge_pairs(judge_text, completions, refs, rows)
        r = [t if answers[i] is None else min(right(i), t) for i, t in enumerate(r_text)]
    return torch.tensor(r, dtype=torch.float32)  # (B*G,)


# ----------------------------------------------------------------------------------------------
# Rollout


def decode(lalm: LALM, y, y_mask) -> list[str]:
    return lalm.tokenizer.batch_decode([row[m].tolist() for row, m in zip(y, y_mask)], skip_special_tokens=True)


def pad_cat(tensors, value):  # right-pad (R_i, T_i) tensors to a common T and stack rows -> (sum R_i, T)
    T = max(t.shape[1] for t in tensors)
    return torch.cat([F.pad(t, (0, T - t.shape[1]), value=value) for t in tensors], 0)


@dataclass
class Rollouts:
    """One step's completions, each a (y, mask) pair of (R, T) tensors, by the loss they carry."""
    opd: Optional[tuple] = None  # (B, T) y ~ pi(.|x_a) at tau: the token loss (Eq. 2-7); None with --opd_rollout group
    group: Optional[tuple] = None  # (B*G, T) y_i ~ pi(.|x_a) at tau_grpo: GRPO (Eq. 10)
    ref: Optional[tuple] = None  # (B, T) y_hat ~ pi(.|x_t): the judge's reference (Eq. 8); sft / fkl target
    tokens: int = 0  # audio rollout tokens sampled


@torch.no_grad()
def rollouts(lalm: LALM, x_a, prompts: dict, args: Args, use_tok: bool, use_seq: bool) -> Rollouts:
    """Sample every completion a step needs, in eval mode (no dropout), without gradient; the OPD row and the G GRPO
    rows of a prompt share one prefill (departures 1, 7)."""
    B, G, obj = x_a.shape[0], args.group_size, args.objective
    lalm.model.eval()
    out = Rollouts()
    opd_row = use_tok and not (use_seq and args.opd_rollout == "group")
    taus = [args.temperature] * opd_row + [args.grpo_temperature] * (G if use_seq else 0)
    if taus:
        y, m = sample(lalm, x_a, prompts["audio_mask"], len(taus), taus, args.max_new_tokens,
                      fast=args.compile_rollout)  # (B*n, T)
        out.tokens = m.sum().item()
        y, m = y.view(B, len(taus), -1), m.view(B, len(taus), -1)  # (B, n, T): row 0 is the OPD row
        if opd_row:
            out.opd = (y[:, 0], m[:, 0])  # (B, T)
        if use_seq:
            out.group = (y[:, -G:].flatten(0, 1), m[:, -G:].flatten(0, 1))  # (B*G, T)
    if obj in ("sft", "fkl") or (use_seq and args.reward_ref != "answer"):
        tau_ref = args.temperature if obj == "fkl" else args.ref_temperature  # fkl: y ~ pi(.|x_t) on-text
        x_t = embed_prompts(lalm, prompts["text_ids"])  # (B, S_t, C)
        out.ref = sample(lalm, x_t, prompts["text_mask"], 1, tau_ref, args.max_new_tokens,
                         fast=args.compile_rollout)  # (B, T)
    return out


# ----------------------------------------------------------------------------------------------
# Training


class Teacher:
    """sg[pi(.|x_t, y_<t)], no gradient, eval mode: live = current weights; frozen = initial ones (LoRA: base)."""

    def __init__(self, lalm: LALM, mode: str):
        self.lalm, self.mode, self.copy = lalm, mode, None
        if mode == "frozen" and not hasattr(lalm.model, "disable_adapter"):
            self.copy = replace(lalm, model=copy.deepcopy(lalm.model).requires_grad_(False).eval())

    @torch.no_grad()
    def hidden(self, text_ids, text_mask, y, y_mask):  # -> (R, T, C) hidden states, (V, C) head weight
        lalm = self.copy or self.lalm
        was_training = lalm.model.training
        lalm.model.eval()  # no dropout in the teacher
        adapter_off = self.mode == "frozen" and self.copy is None  # frozen under LoRA: the base model's weights
        with lalm.model.disable_adapter() if adapter_off else contextlib.nullcontext():
            h = completion_hidden(lalm, embed_prompts(lalm, text_ids), text_mask, y, y_mask)  # (R, T, C)
        lalm.model.train(was_training)
        return h, lalm.base.get_output_embeddings().weight


def baseline_loss(lalm: LALM, h, y, mask, h_t, W_t, objective: str, chunk_size=None):
    """The extra baselines on y_hat ~ pi(.|x_t) (departure 9), a per-sequence token mean then mean over sequences:
    sft = cross-entropy of y_hat from the audio prompt; fkl = KL(pi(.|x_t) || pi(.|x_a)) along that text trajectory."""
    head = lalm.base.get_output_embeddings()
    if objective == "sft":
        per_tok = -chunked.head_terms(head, h, y, mask, chunk_size=chunk_size)[1]  # (B, T) -log pi(y_hat_t | x_a)
    else:
        per_tok = chunked.kl(head(h), h_t @ W_t.T, mask, chunk_size, reverse=False)  # (B, T) on (B, T, V) logits
    return ((per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def loss_rows(ro: Rollouts, objective: str) -> dict:
    """The rollouts that carry a loss for this objective: name -> (y, mask), in the order they are stacked."""
    rows = {}
    if ro.opd is not None:
        rows["opd"] = ro.opd  # (B, T) L_tok
    if ro.group is not None:
        rows["group"] = ro.group  # (B*G, T) L_seq (and L_tok with --opd_rollout group)
    if ro.ref is not None and objective in ("sft", "fkl"):
        rows["ref"] = ro.ref  # (B, T) the baselines' y_hat
    return rows


def student_hidden(lalm: LALM, x_a, m_a, rows: dict) -> dict:
    """One student forward on x_a (B, S_a, C) over every set of rows at once -> name -> hidden states (R_i, T_i, C).

    Each set's rows are prompt-major (R_i = B * reps); the sets are right-padded to one T and stacked."""
    B = x_a.shape[0]
    reps = [y.shape[0] // B for y, _ in rows.values()]  # rollouts per prompt in each set
    x = torch.cat([x_a.repeat_interleave(r, 0) for r in reps])  # (R, S_a, C)
    m = torch.cat([m_a.repeat_interleave(r, 0) for r in reps])  # (R, S_a)
    y = pad_cat([y_i for y_i, _ in rows.values()], lalm.tokenizer.pad_token_id or 0)  # (R, T)
    y_mask = pad_cat([m_i for _, m_i in rows.values()], False)  # (R, T)
    h = completion_hidden(lalm, x, m, y, y_mask)  # (R, T, C)
    out, start = {}, 0
    for name, (y_i, _) in rows.items():
        R_i, T_i = y_i.shape
        out[name] = h[start:start + R_i, :T_i]  # (R_i, T_i, C)
        start += R_i
    return out


def student_loss(lalm: LALM, x_a, m_a, ro: Rollouts, h_t, W_t, A, args: Args) -> tuple[torch.Tensor, dict]:
    """One student forward on x_a over every row that carries a loss -> L = L_tok + lambda L_seq (or a baseline)."""
    obj = args.objective
    rows = loss_rows(ro, obj)
    lalm.model.train()
    h = student_hidden(lalm, x_a, m_a, rows)  # name -> (R_i, T_i, C)
    head = lalm.base.get_output_embeddings()  # (V, C) lm_head: the logits of h
    loss, metrics, logp = x_a.new_zeros((), dtype=torch.float32), {}, None
    if obj in ("cord", "opd", "opd+grpo"):
        on = "opd" if "opd" in rows else "group"  # departure 7: --opd_rollout group puts L_tok on the group
        y, m = rows[on]
        D, logp_on = chunked.head_terms(head, h[on], y, m, h_t, W_t, args.chunk_size)  # (R, T) Eq. 2
        alpha, beta = (args.alpha, args.beta) if obj == "cord" else (1.0, 1.0)  # opd, opd+grpo: uniform Eq. 3
        if args.k_frac > 0:  # departure 8: K of Eq. 4 per sequence
            k = torch.ceil(args.k_frac * m.sum(-1)).long().clamp(min=1)  # (R,)
        else:
            k = args.k
        L_tok, tok_metrics = weighted_token_loss(D, m, k, alpha, beta, args.normalize)  # Eq. 4-7
        loss = loss + L_tok
        if on == "group":
            logp = logp_on  # log pi(y_i) at tau = 1, reusable by Eq. 10
        metrics.update(loss_tok=L_tok.item(), **tok_metrics)
    if A is not None:
        y, m = rows["group"]
        use_tau = args.grpo_logp_temperature == "sampling" and args.grpo_temperature > 0
        tau = args.grpo_temperature if use_tau else 1.0
        if logp is None or tau != 1.0:  # departure 5: log pi at the temperature the rollouts were sampled at
            logp = chunked.head_terms(head, h["group"], y, m, chunk_size=args.chunk_size, temperature=tau)[1]
            # (B*G, T) log pi(y_i) at tau
        L_seq, seq_metrics = grpo_loss(logp, logp.detach(), A, m, args.clip_eps, args.group_size,
                                       args.grpo_reduction)  # Eq. 10
        loss = loss + args.lam * L_seq  # L_CORD = L_tok + lambda L_seq
        metrics.update(loss_seq=L_seq.item(), **seq_metrics)
    if obj in ("sft", "fkl"):
        L = baseline_loss(lalm, h["ref"], *rows["ref"], h_t, W_t, obj, args.chunk_size)
        loss = loss + L
        metrics[f"loss_{obj}"] = L.item()
    return loss, metrics


def train_step(lalm: LALM, teacher: Teacher, judge, examples: list[dict], args: Args) -> tuple[torch.Tensor, dict]:
    """One step on B audio prompts; gradients accumulate in .grad -> (loss, metrics).

    1. rollouts: y ~ pi(.|x_a) (the OPD row at tau, G GRPO rows at tau_grpo), y_hat ~ pi(.|x_t);
    2. rewards and advantages: r_i = J(y_i, y_hat) (Eq. 8), A_i within each prompt's group (Eq. 9);
    3. L = L_tok + lambda L_seq: teacher pass on x_t (no grad), one student forward on x_a (Eq. 2-7, 10).
    """
    obj, G, B = args.objective, args.group_size, len(examples)
    use_tok, use_seq = obj in ("cord", "opd", "opd+grpo"), obj in ("cord", "grpo", "opd+grpo")
    clock = plumbing.Clock(lalm.device)
    with clock("t_prompts"):
        prompts = build_prompts(lalm, examples, args.instruction, args.system_prompt)
    lalm.model.train()
    with clock("t_student"):  # the one audio-encoder call of the step; its graph is kept for backward
        x_a = embed_prompts(lalm, prompts["audio_ids"], prompts["features"], prompts["feature_mask"])  # (B, S_a, C)
    with clock("t_rollout"), rollout.merged_lora(lalm.model, args.merge_lora, lalm.device):  # 1.
        ro = rollouts(lalm, x_a.detach(), prompts, args, use_tok, use_seq)
    metrics = {"rollout_tokens": ro.tokens} if ro.tokens else {}
    A, h_t, W_t = None, None, None  # what the objective does not use stays None
    with clock("t_judge"):  # 2.
        if use_seq:
            completions = decode(lalm, *ro.group)  # B*G
            refs = decode(lalm, *ro.ref) if ro.ref else [None] * B  # y_hat per prompt; none with --reward_ref answer
            refs = [ref for ref in refs for _ in range(G)]  # B*G: each rollout beside its prompt's y_hat
            rows = [ex for ex in examples for _ in range(G)]  # B*G
            answers = [ex.get("answer") for ex in rows]
            r = rewards_for(judge, completions, refs, answers, args.reward_ref, rows).to(lalm.device)  # (B*G,) Eq. 8
            A = grpo_advantages(r, G, args.adv_scale)  # (B*G,) Eq. 9
            metrics.update(reward_mean=r.mean().item(), completion_len=ro.group[1].sum(-1).float().mean().item())
    with clock("t_teacher"):  # 3. sg[pi(.|x_t, y_<t)] on the rows of the token loss (fkl: on y_hat)
        on = None
        if use_tok:
            on = ro.opd or ro.group
        elif obj == "fkl":
            on = ro.ref
        if on is not None:
            reps = on[0].shape[0] // B  # rows per prompt
            text_ids = prompts["text_ids"].repeat_interleave(reps, 0)  # (R, S_t)
            text_mask = prompts["text_mask"].repeat_interleave(reps, 0)  # (R, S_t)
            h_t, W_t = teacher.hidden(text_ids, text_mask, *on)  # (R, T, C), (V, C)
    with clock("t_student"):
        loss, loss_metrics = student_loss(lalm, x_a, prompts["audio_mask"], ro, h_t, W_t, A, args)
        loss.backward()
    metrics.update(**loss_metrics, loss=loss.item(), **clock.times)
    return loss.detach(), metrics


def train(lalm: LALM, examples: list[dict], args: Args, eval_sets: Optional[dict] = None) -> Path:
    """The flat loop: batch -> train_step -> clip -> AdamW, a JSON line of metrics per step, checkpoints.

    Under torchrun every rank runs this loop on its slice of the global batch (B per rank x world size);
    plumbing.py averages the gradients over ranks and lets rank 0 alone log and write.
    """
    rank, world = plumbing.rank_world()  # (0, 1) in one process
    B = args.batch_size  # per process
    params = configure_trainable(lalm, args.train, args.lora_r)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(lalm.base)
    teacher = Teacher(lalm, args.teacher)  # before a checkpoint loads: a frozen teacher keeps the initial weights
    judge = make_judge(args, lalm) if args.objective in ("cord", "grpo", "opd+grpo") else None
    params, opt, start = plumbing.start_or_resume(
        lalm.model, params, lambda ps: torch.optim.AdamW(ps, lr=args.lr, weight_decay=args.weight_decay),
        args.output, args.resume, args.fsdp, lalm.base.get_decoder().layers, B)
    if start == 0:
        torch.manual_seed(args.seed + rank)  # each rank samples its own rollouts
    log = plumbing.MetricsLog(args.output, start, args.report_to, asdict(args))
    parts = (lalm.processor or lalm.tokenizer, lalm.feature_extractor)  # saved beside the weights

    def evaluate_set(rows, baseline):  # one --eval_data set: acc and gap (eval.jsonl, eval.md), no KL statistics
        return evaluate(lalm, rows, args, None, baseline, kl=False)

    if eval_sets and start == 0:
        evaluation.log_evaluations(evaluate_set, eval_sets, args.output, 0, log)
    guard = plumbing.NonFiniteGuard(max_in_a_row=3)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.objective, dynamic_ncols=True,
               disable=rank > 0)
    for step in bar:
        t0, clock = time.perf_counter(), plumbing.Clock(lalm.device)
        ids = plumbing.batch_at(len(examples), step, B * world, args.seed)[rank * B:(rank + 1) * B]  # this rank's slice
        opt.zero_grad(set_to_none=True)
        _, m = train_step(lalm, teacher, judge, [examples[i] for i in ids], args)
        with clock("t_optimizer"):
            m["grad_norm"] = plumbing.sync_and_clip(params, args.max_grad_norm, args.fsdp)
            if guard.finite(m["loss"], m["grad_norm"], [examples[i]["id"] for i in ids]):  # a NaN step is never applied
                opt.step()
        m = plumbing.mean_over_ranks({**m, **clock.times, "t_step": time.perf_counter() - t0})
        m["step"] = step + 1
        log.log(m, step + 1)
        bar.set_postfix(loss=f"{m['loss']:.3f}", kl=f"{m.get('kl_mean', 0):.3f}", r=f"{m.get('reward_mean', 0):.2f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            plumbing.save_checkpoint(lalm.model, opt, step + 1, args.output, parts, asdict(args), args.fsdp,
                                     args.save_total_limit)
        if eval_sets and ((step + 1) % (args.eval_every or args.steps) == 0 or step + 1 == args.steps):
            evaluation.log_evaluations(evaluate_set, eval_sets, args.output, step + 1, log)
    log.close()
    return plumbing.save_final(lalm.model, args.output, parts, args.fsdp)


# ----------------------------------------------------------------------------------------------
# Evaluation: every item answered twice (audio, text), greedily; summaries in cordkit/evaluation.py


@torch.no_grad()
def evaluate(lalm: LALM, examples: list[dict], args: Args, out_dir: Optional[str] = None,
             baseline: Optional[dict] = None, kl: bool = True) -> dict:
    """Every item answered greedily twice, on its audio (x_a) and on its transcript (x_t); each completion scored
    by judge.score_row -> evaluation.summarize: acc_text, acc_audio, gap = acc_text - acc_audio, the gap reduction
    vs a baseline, the benchmark's own metric beside ours, and (kl=True) the token-KL statistics of Fig. 3."""
    lalm.model.eval()
    items, token_kl = [], []
    for i in tqdm(range(0, len(examples), args.eval_batch_size), desc="eval", dynamic_ncols=True):
        batch = examples[i:i + args.eval_batch_size]
        prompts = build_prompts(lalm, batch, args.instruction, args.system_prompt)
        x_a = embed_prompts(lalm, prompts["audio_ids"], prompts["features"], prompts["feature_mask"])  # (B, S_a, C)
        x_t = embed_prompts(lalm, prompts["text_ids"])  # (B, S_t, C)
        y_a, m_a = sample(lalm, x_a, prompts["audio_mask"], 1, 0.0, args.max_new_tokens,
                          fast=args.compile_rollout)  # (B, T) greedy
        y_t, m_t = sample(lalm, x_t, prompts["text_mask"], 1, 0.0, args.max_new_tokens, fast=args.compile_rollout)
        D = y_a * 0.0  # (B, T) without the KL statistics
        if kl:  # (B, T) Eq. 2 on the audio rollout
            D = chunked.kl(completion_logits(lalm, x_a, prompts["audio_mask"], y_a, m_a),
                           completion_logits(lalm, x_t, prompts["text_mask"], y_a, m_a), m_a, args.chunk_size)
        for ex, ca, ct, d, y, m in zip(batch, decode(lalm, y_a, m_a), decode(lalm, y_t, m_t), D, y_a, m_a):
            token_kl.append((d[m].float().cpu(), y[m].tolist()))  # D_t and y_t along the audio rollout
            items.append({"id": ex["id"], "category": ex.get("category"), "answer": ex.get("answer"),  # a str or None
                          "audio_completion": ca, "text_completion": ct, "audio_correct": judge_lib.score_row(ca, ex),
                          "text_correct": judge_lib.score_row(ct, ex) if ex.get("text") else None})
    return evaluation.summarize(items, examples, token_kl, lalm.tokenizer, baseline, out_dir)


# ----------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> Args:
    """Args from the command line; a bad flag, value or pair of flags stops here, in one line, before a model loads."""
    parser = HfArgumentParser(Args)
    parser.error = lambda message: parser.exit(
        2, f"cord.py: error: {message} (python cord.py --help lists the flags)\n")
    try:
        (args,) = parser.parse_args_into_dataclasses(argv)
    except ValueError as e:  # flags that no field takes
        parser.error(str(e).replace("Some specified arguments are not used by the HfArgumentParser", "unknown flags"))
    bad = plumbing.out_of_range(asdict(args), MIN_VALUE, POSITIVE)  # each value in its range, in this order
    problems = [  # (bad, message): pairs of flags, files, packages
        (args.objective in ("cord", "grpo", "opd+grpo") and args.group_size < 2,
         "--group_size: GRPO needs >= 2 rollouts per prompt (Eq. 9)"),
        (args.eval and not args.data, "--eval true needs --data (the manifest to evaluate)"),
        (args.baseline and not Path(args.baseline).is_file(),
         f"--baseline {args.baseline}: no such file (a summary.json of --eval)"),
        (args.resume and args.overwrite, "--resume and --overwrite exclude each other"),
        (args.report_to != "none" and not importlib.util.find_spec(args.report_to),
         f"--report_to {args.report_to}: pip install {args.report_to}")]
    bad += [message for is_bad, message in problems if is_bad]
    if bad:
        parser.error(f"argument {bad[0]}")
    return replace(args, chunk_size=args.chunk_size or None)  # 0: no chunking, (R, T, V) tensors in one piece


def setup(args: Args) -> LALM:
    plumbing.seed_all(args.seed)  # every rank alike: the same initial weights
    device = plumbing.init_distributed(torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32  # --dtype auto
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(args.dtype, auto)
    return load_lalm(args.model, dtype, device, args.trust_remote_code)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from demo.run import demo  # the CPU demo (demo/run.py imports this module: imported here only)

        return demo(args)
    if args.data is None:
        raise SystemExit("--data: give a training manifest (JSONL; see README) or use --eval")
    window = audio_window_seconds(args.model, args.trust_remote_code)  # all checks before the model loads; none cuts
    load = lambda path: check_durations(load_manifest(path), window, args.long_audio, path)
    data = load(args.data)
    eval_sets = {p: load(p)[: args.eval_limit] for p in (args.eval_data or "").split(",") if p}
    if args.eval:
        with plumbing.RunLock(args.output):  # one writer per folder; Ctrl-C or a full disk: one line
            plumbing.prepare_eval_output(args.output, args.baseline, args.overwrite)  # never over its --baseline
            base = json.loads(Path(args.baseline).read_text()) if args.baseline else None
            s = evaluate(setup(args), data[: args.eval_limit], args, args.output, base)
        print(json.dumps({k: v for k, v in s.items() if not isinstance(v, list)}, indent=1))
        if not s["n_scored"]:
            print(f"not scored: no item of {args.data} has an 'answer' (acc and gap are null)")
        return s
    data = with_transcripts(data, args.data)  # no transcript, no teacher: nothing to distil
    with plumbing.RunLock(args.output):  # one writer per run folder; Ctrl-C or a full disk end in one line
        plumbing.prepare_output(args.output, args.resume, args.overwrite, asdict(args))  # resume: the same run
        final = train(setup(args), data, args, eval_sets)
    print(f"saved {final}")
    if eval_sets:
        print(f"\n{(Path(args.output) / 'eval.md').read_text()}")
    return final


if __name__ == "__main__":
    import cord  # run main() of the module named `cord`: the demo's `from cord import Args` must see the same classes

    cord.main()
