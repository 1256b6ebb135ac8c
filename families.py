"""Loading audio LLMs for cord.py, one entry per model family (its class and its audio path), bundled as the LALM that cord.py's prompts and losses use.

Any transformers audio LLM whose audio tokens are a run of one placeholder token in the prompt,
filled with encoder outputs, fits: a family = its model class + one function that turns Whisper
features (B, M, F) into those embeddings, flattened over the clips of the batch (README: adding a
family). Standalone: never imports cord.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer, PretrainedConfig


# ----------------------------------------------------------------------------------------------
# transformers 4.57 and 5.x: the one place that knows where the parts of a model live


def part(model, name: str):
    """model.<name> (transformers 4.x), or model.model.<name> (5.x moved the audio tower, the projector
    and the language model under .model)."""
    return getattr(model, name) if hasattr(model, name) else getattr(model.model, name)


def tie_if_configured(model) -> None:
    """A config that says tie_word_embeddings gets lm_head = the input embeddings, on every version.

    transformers 5.x no longer ties Qwen2-Audio's head by itself: a tied checkpoint (which stores no separate
    head) would otherwise load with a randomly initialised lm_head, and no error.
    """
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(text_config, "tie_word_embeddings", False) or head.weight is embeddings.weight:
        return
    head.weight = embeddings.weight
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is embeddings.weight]  # both names now
    head_name = next(n for n, m in model.named_modules() if m is head) + ".weight"
    model._tied_weights_keys = {head_name: next(n for n in names if n != head_name)}  # save_pretrained stores it once


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (transformers 5.x renamed the method; 4.x has the old name)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------------------------
# Families


def qwen2_audio_encoder(tower, features, feature_mask):  # -> (B, F', C_audio), (B,) valid outputs per clip
    """Qwen2-Audio's Whisper encoder (+ avg-pool) with the padding mask its own forward() builds."""
    feat_len, n_out = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))  # (B,), (B,)
    n_conv = (features.shape[-1] - 2) // 2 + 1  # frames after the stride-2 conv
    pad = torch.arange(n_conv, device=features.device)[None] >= feat_len[:, None]  # (B, F/2)
    mask = torch.zeros(pad.shape, dtype=tower.conv1.weight.dtype, device=features.device)
    mask = mask.masked_fill(pad, float("-inf"))[:, None, None, :].expand(-1, 1, n_conv, -1)  # (B, 1, F/2, F/2)
    return tower(features, attention_mask=mask).last_hidden_state, n_out  # (B, F', C_audio)


def qwen2_audio_features(model, features, feature_mask):  # -> (audio tokens in the batch, C)
    """Qwen2-Audio: Whisper encoder -> projector, valid frames only, as in its own forward()."""
    h, n_out = qwen2_audio_encoder(part(model, "audio_tower"), features, feature_mask)
    h = part(model, "multi_modal_projector")(h)  # (B, F', C)
    return h[torch.arange(h.shape[1], device=h.device)[None] < n_out[:, None]]


def qwen2_5_omni_features(model, features, feature_mask):  # -> (audio tokens in the batch, C)
    """Qwen2.5-Omni thinker: its encoder already ends in the projection to the LM width."""
    out = model.get_audio_features(features, feature_attention_mask=feature_mask)
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state  # 5.x returns an output object


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
    suppress_ids: list[int]  # audio special tokens: never sampled (a sampled placeholder breaks the next forward)
    eos_ids: list[int]
    processor: object = None

    @property
    def base(self):  # the transformers model under a PEFT wrapper, if any
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def audio_tower(self):
        return part(self.base, "audio_tower")


def load_lalm(path: str, dtype=torch.float32, device="cpu", trust_remote_code=False) -> LALM:
    try:  # read model_type from config.json (AutoConfig does not know e.g. qwen2_5_omni_thinker)
        model_type = PretrainedConfig.get_config_dict(path)[0].get("model_type")
    except OSError as e:
        raise SystemExit(f"--model {path}: cannot read its config.json ({e})") from None
    if model_type not in AUDIO_FAMILIES:
        raise SystemExit(
            f"--model {path}: model type '{model_type}' has no audio adapter; supported: "
            f"{', '.join(AUDIO_FAMILIES)}. Add one function to AUDIO_FAMILIES in families.py (README: adding a family)."
        )
    model_class, audio_features = AUDIO_FAMILIES[model_type]
    model = model_class().from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    tie_if_configured(model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    feature_extractor = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=trust_remote_code)
    try:  # the processor holds the chat template for Qwen2-Audio; Omni's needs torchvision
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError, TypeError):
        processor = None
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    if template is None:
        raise SystemExit(f"--model {path}: no chat template in its processor or tokenizer; add chat_template.json")
    audio_token_id = getattr(model.config, "audio_token_index", None) or getattr(model.config, "audio_token_id", None)
    added = getattr(tokenizer, "added_tokens_decoder", {})  # special tokens only: Qwen's BPE also has the text '<AudioSource'
    suppress = {audio_token_id} | {i for i, t in added.items() if "audio" in str(t).lower()}
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    return LALM(model, tokenizer, feature_extractor, template, audio_features, audio_token_id,
                sorted(suppress), sorted(e for e in eos if e is not None), processor)


def configure_trainable(lalm: LALM, train: str = "all", lora_r: int = 16) -> list:
    """--train all | llm | audio (encoder + projector) | lora (PEFT adapters on the LM) -> the trainable parameters."""
    if train == "lora":
        from peft import LoraConfig, get_peft_model  # optional dependency

        target = r"^(?!.*(audio_tower|visual)).*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
        lalm.model = get_peft_model(lalm.model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=target))
    else:
        for name, p in lalm.model.named_parameters():
            is_audio = "audio_tower" in name or "multi_modal_projector" in name
            p.requires_grad_({"all": "visual" not in name, "llm": not is_audio and "visual" not in name, "audio": is_audio}[train])
    return [p for p in lalm.model.parameters() if p.requires_grad]


def audio_window_seconds(path: str, trust_remote_code: bool = False):
    """The longest clip the model's feature extractor keeps (Whisper: 30 s; longer audio is cut), or None."""
    try:
        fe = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model {path}: cannot read its feature extractor ({e})") from None
    n = getattr(fe, "n_samples", None)
    return n / fe.sampling_rate if n else None
