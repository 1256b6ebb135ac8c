"""Loading audio LLMs for cord.py, one entry per model family (its class and how its audio enters), bundled as the LALM
that cord.py's prompts and losses use.

Most audio LLMs follow one pattern: an audio tower (+ projector) whose outputs fill a run of one placeholder token
repeated once per output frame. The common path is read off the model itself (its get_audio_features and the mask
name its signature takes, its encoder's _get_feat_extract_output_lengths); a family that differs supplies a small
function: its token count (Voxtral: a fixed count per window; GLM-ASR: a 4-frame merge), its features (Step-Audio-2:
its own log-mel), its audio path (Qwen2-Audio, Step-Audio-2). README: adding a family. Standalone: never imports cord.
"""
from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from transformers import AutoFeatureExtractor, AutoProcessor, AutoTokenizer, PretrainedConfig


# ----------------------------------------------------------------------------------------------
# transformers 4.57 and 5.x: the one place that knows where the parts of a model live


def part(model, name: str):
    """model.<name> (transformers 4.x), or model.model.<name> (5.x moved the audio tower, the projector
    and the language model under .model)."""
    return getattr(model, name) if hasattr(model, name) else getattr(model.model, name)


def tie_if_configured(model, loaded_from=None, missing=()) -> None:
    """A config that says tie_word_embeddings gets lm_head = the input embeddings, on every version.

    transformers 5.x no longer ties Qwen2-Audio's head by itself: a tied checkpoint that stores no separate
    head would otherwise load with a randomly initialised lm_head, and no error. When the load (loaded_from)
    reported the head among its `missing` keys, a line says why that report is expected. (The shipped demo
    model stores the head, so it loads with no report at all.)
    """
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if not getattr(text_config, "tie_word_embeddings", False) or head.weight is embeddings.weight:
        return
    head.weight = embeddings.weight
    head_name = next(n for n, m in model.named_modules() if m is head) + ".weight"
    if loaded_from is not None and any(k.endswith("lm_head.weight") for k in missing):
        print(f"{loaded_from}: lm_head tied to the input embeddings (tie_word_embeddings), so the 'lm_head.weight "
              "MISSING' above is expected")
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is embeddings.weight]  # both names now
    model._tied_weights_keys = {head_name: next(n for n in names if n != head_name)}  # save_pretrained stores it once


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (transformers 5.x renamed the method; 4.x has the old name)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ----------------------------------------------------------------------------------------------
# The common pattern: an audio tower (+ projector) whose outputs fill a run of one placeholder token,
# detected from the model itself (its get_audio_features, its encoder's output-length function)

AUDIO_PARTS = ("audio_tower", "multi_modal_projector")  # parameter-name parts of the audio path (--train audio)
MASK_NAMES = ("feature_attention_mask", "input_features_mask")  # what families call the feature mask (Voxtral: none)


def whisper_features(feature_extractor, audio: list):  # -> features (B, M, F), feature_mask (B, F)
    """Whisper-style log-mel features padded to the extractor's window, with the mask of each clip's own frames."""
    fe = feature_extractor
    feats = fe(audio, sampling_rate=fe.sampling_rate, return_attention_mask=True, padding="max_length",
               return_tensors="pt")
    return feats["input_features"], feats["attention_mask"]


def _audio_owner(model):
    """The module that defines get_audio_features with its real signature (5.x: often model.model; the outer class
    forwards *args)."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "get_audio_features") else model


def model_audio_features(model, features, feature_mask):  # -> (audio tokens in the batch, C)
    """The model's own get_audio_features, the mask passed under the name its signature uses (none: Voxtral); the
    projected embeddings of the valid frames, flattened over the clips."""
    owner = _audio_owner(model)
    if not hasattr(owner, "get_audio_features"):
        raise SystemExit(f"{type(model).__name__}: no get_audio_features; give its family an audio_features function "
                         "in families.py")
    names = inspect.signature(owner.get_audio_features).parameters
    mask_kw = next((k for k in MASK_NAMES if k in names), None)
    out = owner.get_audio_features(features, **({mask_kw: feature_mask} if mask_kw else {}))
    if not isinstance(out, torch.Tensor):  # 5.x: an output object; the projected embeddings are its pooler_output
        out = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state
    return out.reshape(-1, out.shape[-1])


def encoder_output_lengths(model, feature_mask):  # -> (B,) audio tokens per clip
    """The encoder's own _get_feat_extract_output_lengths (a function of its module as in Qwen3-Omni / Qwen3-ASR, some
    taking n_window, else a method of the audio tower) applied to each clip's feature frames; its last output. The
    module function comes first: 4.57's Qwen3-Omni tower keeps a stale method copied from Qwen2.5-Omni."""
    tower = part(model, "audio_tower")
    fn = getattr(sys.modules[type(tower).__module__], "_get_feat_extract_output_lengths", None) or getattr(
        tower, "_get_feat_extract_output_lengths", None)
    if fn is None:
        raise SystemExit(f"{type(model).__name__}: its audio tower has no _get_feat_extract_output_lengths; "
                         "give its family a token_counts function in families.py")
    kw = {"n_window": tower.config.n_window} if "n_window" in inspect.signature(fn).parameters else {}
    n = fn(feature_mask.sum(-1), **kw)
    return n[-1] if isinstance(n, tuple) else n


# ----------------------------------------------------------------------------------------------
# Where a family differs: small explicit functions


def qwen2_audio_encoder(tower, features, feature_mask):  # -> (B, F', C_audio), (B,) valid outputs per clip
    """Qwen2-Audio's Whisper encoder (+ avg-pool) with the padding mask its own forward() builds."""
    feat_len, n_out = tower._get_feat_extract_output_lengths(feature_mask.sum(-1))  # (B,), (B,)
    n_conv = (features.shape[-1] - 2) // 2 + 1  # frames after the stride-2 conv
    pad = torch.arange(n_conv, device=features.device)[None] >= feat_len[:, None]  # (B, F/2)
    mask = torch.zeros(pad.shape, dtype=tower.conv1.weight.dtype, device=features.device)
    mask = mask.masked_fill(pad, float("-inf"))[:, None, None, :].expand(-1, 1, n_conv, -1)  # (B, 1, F/2, F/2)
    return tower(features, attention_mask=mask).last_hidden_state, n_out  # (B, F', C_audio)


def qwen2_audio_features(model, features, feature_mask):  # -> (audio tokens in the batch, C)
    """Qwen2-Audio: Whisper encoder -> projector, valid frames only, as in its own forward() (no get_audio_features)."""
    h, n_out = qwen2_audio_encoder(part(model, "audio_tower"), features, feature_mask)
    h = part(model, "multi_modal_projector")(h)  # (B, F', C)
    return h[torch.arange(h.shape[1], device=h.device)[None] < n_out[:, None]]


def voxtral_token_counts(model, feature_mask):  # -> (B,)
    """Voxtral: every clip fills its whole window (no feature mask): max_source_positions encoder frames, merged
    intermediate_size / d_model at a time by its projector."""
    audio = model.config.audio_config
    per_clip = audio.max_source_positions * audio.hidden_size // audio.intermediate_size
    return torch.full(feature_mask.shape[:1], per_clip, dtype=torch.long, device=feature_mask.device)


def glmasr_token_counts(model, feature_mask):  # -> (B,)
    """GLM-ASR: two convolutions (strides 1 and 2) then 4 encoder frames merged into one token (its
    get_audio_features)."""
    n = feature_mask.sum(-1)
    for padding, kernel, stride in ((1, 3, 1), (1, 3, 2)):
        n = (n + 2 * padding - kernel) // stride + 1
    return (n - 4) // 4 + 1


# Step-Audio-2 (its own model code: --trust_remote_code). Interface learnt from its published model code: model.encoder
# (Whisper-like, 128 mels, conv strides 1 and 2, avg-pool 2) -> model.adapter (conv k3/s2 + 2 linears) -> Qwen2 LM
# model.model + lm_head; forward(input_ids, wavs (B, 128, F), wav_lens = mel frames - 2); one <audio_patch> per adapter
# output between <audio_start> and <audio_end>; turns <|BOT|>role\n ... <|EOT|>; the chat's end is <|EOT|>.

STEP_AUDIO_2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|BOT|>system\nYou are a helpful assistant.<|EOT|>{% endif %}"
    "<|BOT|>{{ 'human' if message['role'] == 'user' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'audio' %}<audio_start><audio_patch><audio_end>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|EOT|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|BOT|>assistant\n{% endif %}"
)


def step_audio_2_mels(feature_extractor, audio: list):  # -> features (B, M, F), feature_mask (B, F)
    """Step-Audio-2's log-mel: 479 zero samples appended, 25 ms / 10 ms STFT, Slaney mel filters (librosa's), log10
    clipped 8 below the clip's max, (x + 4) / 4; clips zero-padded to the longest, mask = each clip's frames."""
    from transformers.audio_utils import mel_filter_bank

    n_mels = feature_extractor.feature_size
    bank = mel_filter_bank(201, n_mels, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
    filters = torch.from_numpy(bank).float().T
    mels = []
    for a in audio:
        x = torch.nn.functional.pad(torch.as_tensor(a, dtype=torch.float32), (0, 479))
        power = torch.stft(x, 400, 160, window=torch.hann_window(400), return_complex=True)[..., :-1].abs() ** 2
        log = (filters @ power).clamp(min=1e-10).log10()  # (M, F_i)
        mels.append((torch.maximum(log, log.max() - 8.0) + 4.0) / 4.0)
    F = max(m.shape[1] for m in mels)
    features = torch.stack([torch.nn.functional.pad(m, (0, F - m.shape[1])) for m in mels])  # (B, M, F)
    mask = torch.arange(F)[None] < torch.tensor([m.shape[1] for m in mels])[:, None]  # (B, F)
    return features, mask.long()


def step_audio_2_token_counts(model, feature_mask):  # -> (B,)
    """Step-Audio-2: (frames - 2) -> conv stride 2 and avg-pool 2 -> the adapter's conv (padding 1, its kernel and
    stride)."""
    cfg = model.config.audio_encoder_config
    cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
    n = (feature_mask.sum(-1) - 2 + 1) // 2 // 2
    return (n + 2 - cfg["kernel_size"]) // cfg["adapter_stride"] + 1


def step_audio_2_features(model, features, feature_mask):  # -> (audio tokens in the batch, C)
    """Step-Audio-2: encoder(wavs, wav_lens) -> adapter, the first token_counts outputs of each clip (as its
    forward())."""
    h, _ = model.encoder(features, feature_mask.sum(-1) - 2)  # (B, F', C_audio)
    h = model.adapter(h)  # (B, F'', C)
    n = step_audio_2_token_counts(model, feature_mask)  # (B,)
    return h[torch.arange(h.shape[1], device=h.device)[None] < n[:, None]]


# ----------------------------------------------------------------------------------------------
# Families: config.json's model_type -> its class and the functions where it leaves the common pattern


class Family(NamedTuple):
    """One model family: how to get its class, and how its audio enters (defaults: the common pattern). A plain
    (model_class, audio_features) pair registers too."""

    model_class: Callable  # () -> the class, imported on first use
    audio_features: Callable = model_audio_features  # (model, features, feature_mask) -> (audio tokens in the batch, C)
    token_counts: Callable = encoder_output_lengths  # (model, feature_mask) -> (B,) placeholders per clip
    extract: Callable = whisper_features  # (feature_extractor, [waveform]) -> features (B, M, F), feature_mask (B, F)
    chat_template: Optional[str] = None  # used when the checkpoint ships none
    placeholder: Optional[str] = None  # the audio token, when the config does not name it
    eos: tuple = ()  # extra end-of-turn tokens
    audio_parts: tuple = AUDIO_PARTS  # parameter-name parts of the audio path (--train audio)
    window_seconds: Optional[float] = None  # the longest clip, when no feature extractor says it


def native(name: str) -> Callable:
    """() -> transformers.<name>, or a one-line exit when the installed transformers lacks it."""
    def model_class():
        import transformers

        if not hasattr(transformers, name):
            raise SystemExit(f"{name} is not in transformers {transformers.__version__}: pip install -U transformers")
        return getattr(transformers, name)

    return model_class


def remote_code() -> type:
    """The checkpoint's own class (AutoModelForCausalLM + --trust_remote_code)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


AUDIO_FAMILIES: dict[str, Family] = {
    "qwen2_audio": Family(native("Qwen2AudioForConditionalGeneration"), qwen2_audio_features),
    "qwen2_5_omni": Family(native("Qwen2_5OmniThinkerForConditionalGeneration")),  # loads the thinker only
    "qwen2_5_omni_thinker": Family(native("Qwen2_5OmniThinkerForConditionalGeneration")),
    "qwen3_omni_moe_thinker": Family(native("Qwen3OmniMoeThinkerForConditionalGeneration")),
    "audioflamingo3": Family(native("AudioFlamingo3ForConditionalGeneration")),
    "qwen3_asr": Family(native("Qwen3ASRForConditionalGeneration")),
    "voxtral": Family(native("VoxtralForConditionalGeneration"), token_counts=voxtral_token_counts),
    "glmasr": Family(native("GlmAsrForConditionalGeneration"), token_counts=glmasr_token_counts),
    "step_audio_2": Family(remote_code, step_audio_2_features, step_audio_2_token_counts, extract=step_audio_2_mels,
                           chat_template=STEP_AUDIO_2_TEMPLATE, placeholder="<audio_patch>", eos=("<|EOT|>",),
                           audio_parts=("encoder.", "adapter."), window_seconds=25.0),  # one 25 s chunk per clip
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
    family: Family = None  # None: the common pattern

    @property
    def base(self):  # the transformers model under a PEFT wrapper, if any
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def audio_tower(self):
        return part(self.base, "audio_tower")

    def audio_token_counts(self, feature_mask):  # -> (B,) audio placeholders per clip
        return (self.family.token_counts if self.family else encoder_output_lengths)(self.base, feature_mask)

    def extract_features(self, audio: list):  # waveforms at feature_extractor.sampling_rate -> (B, M, F), (B, F)
        return (self.family.extract if self.family else whisper_features)(self.feature_extractor, audio)


def _model_type(path: str):
    try:  # read model_type from config.json (AutoConfig does not know e.g. qwen2_5_omni_thinker)
        return PretrainedConfig.get_config_dict(path)[0].get("model_type")
    except OSError as e:
        raise SystemExit(f"--model {path}: cannot read its config.json ({e})") from None


def family_of(path: str) -> tuple[str, Family]:
    model_type = _model_type(path)
    if model_type not in AUDIO_FAMILIES:
        raise SystemExit(
            f"--model {path}: model type '{model_type}' has no audio adapter; supported: "
            f"{', '.join(AUDIO_FAMILIES)}. Add one Family to AUDIO_FAMILIES in families.py (README: adding a family)."
        )
    entry = AUDIO_FAMILIES[model_type]
    return model_type, entry if isinstance(entry, Family) else Family(*entry)


def _feature_extractor(path: str, family: Family, config, trust_remote_code: bool):
    """The checkpoint's feature extractor; a Step-Audio-2 checkpoint ships none: a Whisper one holding its mel count
    and sampling rate (saved with the checkpoints cord writes)."""
    try:
        return AutoFeatureExtractor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        if family.extract is whisper_features:
            raise SystemExit(f"--model {path}: no preprocessor_config.json (its feature extractor); add it") from None
    from transformers import WhisperFeatureExtractor

    audio = config.audio_encoder_config
    n_mels = audio["n_mels"] if isinstance(audio, dict) else audio.n_mels
    return WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16000, chunk_length=int(family.window_seconds))


def load_lalm(path: str, dtype=torch.float32, device="cpu", trust_remote_code=False) -> LALM:
    model_type, family = family_of(path)
    if family.model_class is remote_code and not trust_remote_code:
        raise SystemExit(f"--model {path}: '{model_type}' ships its own model code; add --trust_remote_code true")
    model, info = family.model_class().from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                       output_loading_info=True)
    model = model.to(device)
    tie_if_configured(model, loaded_from=path, missing=info["missing_keys"])
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    feature_extractor = _feature_extractor(path, family, model.config, trust_remote_code)
    try:  # the processor holds the chat template for Qwen2-Audio; Omni's needs torchvision
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError, TypeError, AttributeError):
        processor = None
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template or family.chat_template
    if template is None:
        raise SystemExit(f"--model {path}: no chat template in its processor or tokenizer; add chat_template.json")
    audio_token_id = getattr(model.config, "audio_token_index", None) or getattr(model.config, "audio_token_id", None)
    if family.placeholder is not None:
        audio_token_id = tokenizer.convert_tokens_to_ids(family.placeholder)
    if audio_token_id is None or audio_token_id == tokenizer.unk_token_id:
        raise SystemExit(f"--model {path}: no audio placeholder token "
                         "(config audio_token_id / its family's placeholder)")
    # special tokens only: Qwen's BPE also has the text '<AudioSource'
    added = getattr(tokenizer, "added_tokens_decoder", {})
    suppress = {audio_token_id} | {i for i, t in added.items() if "audio" in str(t).lower()}
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    eos |= {tokenizer.convert_tokens_to_ids(t) for t in family.eos}
    return LALM(model, tokenizer, feature_extractor, template, family.audio_features, audio_token_id,
                sorted(suppress), sorted(e for e in eos if e is not None), processor, family)


def configure_trainable(lalm: LALM, train: str = "all", lora_r: int = 16) -> list:
    """--train all | llm | audio (encoder + projector) | lora (PEFT adapters on the LM) -> the trainable parameters."""
    if train == "lora":
        from peft import LoraConfig, get_peft_model  # optional dependency

        target = r"^(?!.*(audio_tower|visual)).*layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"
        lalm.model = get_peft_model(lalm.model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=target))
    else:
        parts = lalm.family.audio_parts if lalm.family else AUDIO_PARTS
        for name, p in lalm.model.named_parameters():
            is_audio = any(k in name for k in parts)
            trains = {"all": "visual" not in name, "llm": not is_audio and "visual" not in name, "audio": is_audio}
            p.requires_grad_(trains[train])
    return [p for p in lalm.model.parameters() if p.requires_grad]


def audio_window_seconds(path: str, trust_remote_code: bool = False):
    """The longest clip the model's feature extractor keeps (Whisper: 30 s; longer audio is cut), or its family's, or
    None."""
    family = AUDIO_FAMILIES.get(_model_type(path))
    try:
        fe = AutoFeatureExtractor.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if family is not None and family.window_seconds:
            return family.window_seconds
        raise SystemExit(f"--model {path}: cannot read its feature extractor ({e})") from None
    n = getattr(fe, "n_samples", None)
    return n / fe.sampling_rate if n else None
