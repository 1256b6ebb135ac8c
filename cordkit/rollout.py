"""The rollout sampler y ~ pi(.|x) (departure 1 of cord.py: one prefill per prompt, n samples from its KV cache; on
CUDA cordkit/chunked.py's static cache + CUDA graphs), and LoRA folded into the weights for the rollout only: the
sampler decodes with W + s B A, the training forward keeps the adapters, and the base weights are only ever read.

With --train lora every adapted linear runs as three matmuls in each decode step (x W^T + s (x A^T) B^T): on the 7B
model 7 linears x 32 layers, ~900 small kernels more per token (two rank-r matmuls, a scale, an add each). Inside
`merged_lora(model)` each of them is swapped for a plain nn.Linear over a merged copy of its weight, computed fresh on
entry (once per training step: the weights change once per optimizer step) and dropped on exit, when the adapters are
put back:

    with merged_lora(lalm.model, "auto", lalm.device):      # auto = on CUDA; off / CPU: nothing changes
        y, mask = cord.sample(lalm, x, x_mask, n, tau, T)    # decodes with W + s B A

Merging in place and unmerging (peft's merge_adapter) would write the base weights twice a step and, in bf16,
drift them by a rounding each time; here W is read, the sum is taken in fp32 and cast to W's dtype. The price is
one more copy of the adapted weights while the rollout runs (13 GB on the 7B model in bf16). Dropout of the
adapters is not applied (rollouts run in eval mode, where it is the identity).

Standalone (never imports cord); peft's LoRA linears are recognised by their attributes.
"""
import contextlib
import inspect

import torch
from torch import nn

from cordkit import chunked
from cordkit.families import LALM


def positions(mask):  # left padding -> positions 0.. on the real tokens (as generate() does)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def sample(lalm: LALM, prompt_embeds, prompt_mask, n: int, temperature, max_new_tokens: int, fast: str = "off"):
    """y ~ pi(.|x): n samples per prompt from ONE prefill (KV cache repeated n times).

    temperature: a float or a list of n floats (row j of each prompt uses temperature[j]); 0 = greedy.
    Returns y (B*n, T) and its mask (B*n, T), True up to and including EOS.
    fast: "on" | "auto" (on CUDA) | "off": cordkit/chunked.py's static KV cache + CUDA graphs, same semantics.
    """
    decoder, head = lalm.base.get_decoder(), lalm.base.get_output_embeddings()
    pad = lalm.tokenizer.pad_token_id if lalm.tokenizer.pad_token_id is not None else lalm.eos_ids[0]
    if fast == "on" or (fast == "auto" and prompt_embeds.is_cuda and chunked.static_supported(decoder)):
        return chunked.static_sample(decoder, head, prompt_embeds, prompt_mask, n, temperature, max_new_tokens,
                                     lalm.eos_ids, lalm.suppress_ids, pad)  # static KV cache + CUDA graph
    pos = positions(prompt_mask)  # (B, S)
    takes = inspect.signature(decoder.forward).parameters
    cache_kw = "cache" if "cache" in takes else "past_key_values"  # transformers 5.24 renamed it
    out = decoder(inputs_embeds=prompt_embeds, attention_mask=prompt_mask, position_ids=pos, use_cache=True)
    cache = getattr(out, cache_kw)  # the output field has the argument's name
    cache.batch_repeat_interleave(n)  # share the prompt encoding across the n samples
    h = out.last_hidden_state[:, -1].repeat_interleave(n, 0)  # (B*n, C)
    mask = prompt_mask.repeat_interleave(n, 0)  # (B*n, S)
    pos = pos[:, -1:].repeat_interleave(n, 0)  # (B*n, 1)
    taus = torch.tensor([temperature] * n if isinstance(temperature, (int, float)) else temperature, device=h.device)
    tau = taus.repeat(prompt_embeds.shape[0])[:, None].float()  # (B*n, 1)
    eos, suppress = torch.tensor(lalm.eos_ids, device=h.device), torch.tensor(lalm.suppress_ids, device=h.device)
    done = torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)  # (B*n,)
    ys, alive = [], []
    for _ in range(max_new_tokens):
        logits = head(h).float()  # (B*n, V)
        logits[:, suppress] = float("-inf")
        probs = torch.softmax(logits / tau.clamp(min=1e-5), -1)  # (B*n, V)
        y = torch.where(tau[:, 0] > 0, torch.multinomial(probs, 1)[:, 0], logits.argmax(-1))  # (B*n,)
        y = y.masked_fill(done, pad)
        ys.append(y), alive.append(~done)
        done = done | torch.isin(y, eos)
        if done.all():
            break
        mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos + 1
        h = decoder(input_ids=y[:, None], attention_mask=mask, position_ids=pos, **{cache_kw: cache},
                    use_cache=True).last_hidden_state[:, -1]
    return torch.stack(ys, 1), torch.stack(alive, 1)


def is_lora_linear(module) -> bool:  # a peft lora.Linear over an nn.Linear
    return hasattr(module, "lora_A") and hasattr(module, "scaling") and isinstance(getattr(module, "base_layer", None),
                                                                                   nn.Linear)


def mergeable(layer) -> bool:
    """Plain LoRA that `merged_weight` reproduces: adapters on, not merged already, (out, in) weights, no DoRA or
    other variant, no LoRA bias."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    plain = not any(a in getattr(layer, "lora_variant", {}) or getattr(layer, "lora_bias", {}).get(a) or
                    getattr(layer, "use_dora", {}).get(a) for a in active)
    return plain and not layer.disable_adapters and not layer.merged and not layer.fan_in_fan_out


@torch.no_grad()
def merged_weight(layer):  # -> (out, in) W + sum_a s_a B_a @ A_a in W's dtype, summed in fp32
    W = layer.base_layer.weight  # (out, in), read only
    acc = W.detach().to(torch.float32, copy=True)  # (out, in)
    for a in layer.active_adapters:
        if a in layer.lora_A:
            B, A = layer.lora_B[a].weight, layer.lora_A[a].weight  # (out, r), (r, in)
            acc.addmm_(B.float(), A.float(), alpha=layer.scaling[a])
    return acc.to(W.dtype)


def merged_linear(layer) -> nn.Linear:  # a plain nn.Linear computing what `layer` computes in eval mode
    W = layer.base_layer.weight
    lin = torch.nn.utils.skip_init(nn.Linear, W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype)
    lin.weight = nn.Parameter(merged_weight(layer), requires_grad=False)
    lin.bias = layer.base_layer.bias  # shared, not copied (None for most)
    return lin


def wanted(mode: str, device) -> bool:  # --merge_lora on | auto (= on CUDA) | off
    return mode == "on" or (mode == "auto" and device is not None and torch.device(device).type == "cuda")


@contextlib.contextmanager
def merged_lora(model, mode: str = "on", device=None):
    """Inside, every LoRA linear of `model` is a plain nn.Linear over W + s B A (fresh); on exit the adapters are back.

    mode: on | auto (on when `device`, by default the model's, is CUDA) | off. Nothing changes without LoRA layers;
    with mode on, a LoRA layer `merged_weight` cannot reproduce (DoRA, LoRA bias, fan_in_fan_out, already merged)
    is a ValueError.
    """
    swaps = []  # (parent, attribute, LoRA layer)
    device = device if device is not None else next(model.parameters()).device
    if wanted(mode, device):
        layers = [(name, m) for name, m in model.named_modules() if is_lora_linear(m) and not m.disable_adapters]
        odd = [name for name, m in layers if not mergeable(m)]
        if odd:
            raise ValueError(f"--merge_lora: cannot merge {odd[0]} (DoRA, LoRA bias or merged): use --merge_lora off")
        for name, layer in layers:
            parent, _, attr = name.rpartition(".")
            swaps.append((model.get_submodule(parent), attr, layer))
    try:
        for parent, attr, layer in swaps:
            setattr(parent, attr, merged_linear(layer))
        yield model
    finally:
        for parent, attr, layer in swaps:  # the same module objects as before: optimizer and hooks see no change
            setattr(parent, attr, layer)
