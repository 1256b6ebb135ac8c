"""Builds a tiny Qwen2-Audio LALM locally (no hub download) for tests and the CPU demo of cord.py.

Nothing can be downloaded here, and most readers have no GPU, so tests and
`python cord.py` (no --model) need a model in the *real* transformers
architecture (`Qwen2AudioForConditionalGeneration`) with a real processor:
a byte-level BPE tokenizer trained on the fly, the Qwen2-Audio chat template
and a Whisper feature extractor with a short chunk.

    processor = build_processor(["what is two plus three?", ...])
    model = build_model(processor)            # random init, a few M params
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]

# The Qwen2-Audio-7B-Instruct chat template (default system prompt, "Audio N:" prefix).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(corpus: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, digits split one by one (as Qwen's tokenizer does)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    template_text = "system user assistant You are a helpful assistant. Audio 1: The answer is \\boxed{}"
    tok.train_from_iterator(list(corpus) + [template_text] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def build_processor(corpus: list[str], vocab_size: int = 512, chunk_seconds: int = 4, n_mels: int = 80) -> Qwen2AudioProcessor:
    """A Qwen2AudioProcessor: trained tokenizer + Whisper features padded to `chunk_seconds`."""
    feature_extractor = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=chunk_seconds)
    tokenizer = build_tokenizer(corpus, vocab_size)
    return Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_model(
    processor: Qwen2AudioProcessor,
    d_audio: int = 64,
    audio_layers: int = 2,
    d_text: int = 128,
    text_layers: int = 4,
    seed: int = 0,
) -> Qwen2AudioForConditionalGeneration:
    """A randomly initialised Qwen2AudioForConditionalGeneration sized for a CPU (a few M params)."""
    tok, fe = processor.tokenizer, processor.feature_extractor
    config = Qwen2AudioConfig(
        audio_config=dict(
            model_type="qwen2_audio_encoder",
            num_mel_bins=fe.feature_size,
            d_model=d_audio,
            encoder_layers=audio_layers,
            encoder_attention_heads=4,
            encoder_ffn_dim=4 * d_audio,
            max_source_positions=fe.nb_max_frames // 2,  # the encoder's conv2 has stride 2
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tok),
            hidden_size=d_text,
            intermediate_size=4 * d_text,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
            bos_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model
