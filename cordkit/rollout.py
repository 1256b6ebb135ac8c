"""LoRA folded into the weights for the rollout only: the sampler decodes with W + s B A, the training forward keeps
the adapters, and the base weights are only ever read.

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

Standalone: imports torch only; peft's LoRA linears are recognised by their attributes.
"""
import contextlib

import torch
from torch import nn


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

    mode: on | auto (on when `device`, by default the model's, is CUDA) | off. Nothing changes without LoRA layers; with mode on a LoRA
    layer `merged_weight` cannot reproduce (DoRA, LoRA bias, fan_in_fan_out, already merged) is a ValueError.
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
