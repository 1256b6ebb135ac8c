"""Builds, trains and caches the tiny Qwen2-Audio LALM that `python cord.py` (no --model) starts from:
a model that hears worse than it reads.

No real audio LLM can be downloaded here and most readers have no GPU, so the CPU demo needs a model in
the *real* transformers architecture (`Qwen2AudioForConditionalGeneration`, with a real processor: a
byte-level BPE tokenizer trained on the fly, the Qwen2-Audio chat template, a Whisper feature extractor
with a 3 s chunk) in the paper's situation: the same question is answered well when read and worse
when heard. Built deterministically from a seed (for a given torch thread count: one and two threads
sum floats in a different order and give different models), in stages, each cached:

    data  two-step spoken arithmetic ("What is seven plus six minus two?"), voiced offline by
          data_gen.py with pip-installed engines only (hibari, piper, and espeak-ng speaker variants, at
          several speeds; VOICES), the training clips perturbed (speed, vocal-tract length, room, noise;
          AUGMENT) so that the model hears speakers, not one voice; eval and dev questions are disjoint
          from the training questions; data/eval-<engine>/ holds eval questions voiced by one engine;
    0     the audio encoder is pretrained as a CTC speech recogniser (as Qwen2-Audio's starts from
          Whisper; SpecAugment on its features in stages 0 and 2), until its CTC loss is low (ctc_target);
          its forced alignments turn every training clip into "pseudo-audio": the audio slot
          written in tokens, each word's token at the frame where it is spoken, <|AUDIO|> elsewhere;
    1     the language model learns the task, teacher-forced, from text prompts and (half of each
          batch) from pseudo-audio prompts, answering with a short chain:
          "7+6=13. 13-2=11. The answer is 11.";
    2     language model frozen, the encoder + projector learn to map speech onto the pseudo-audio
          (regression of the audio tokens onto the aligned words' LM embeddings, plus the CTC loss),
          and stop early once greedy audio accuracy on the dev set reaches `target_audio`: the audio
          path works, clearly worse than text — a real, partial audio-text gap for CORD to close.

The default build is shipped in tiny/ (`python tiny_lalm.py --ship` makes it): load_or_build loads it when
its settings are the ones asked for, so every user starts from the same weights and voices only the data
the demo reads. `holdout=engine` builds without one engine (leave one voice out: `python demo.py --leave-one-out`).

Usage:
    python tiny_lalm.py                          # build (or load) .cache/tiny_lalm and print the stats
    python tiny_lalm.py --holdout piper --cache-dir .cache/tiny_lalm-no-piper --data-dir .cache/tiny_lalm/data
    model, processor, train_manifest, eval_manifest = load_or_build()
    accuracy(model, processor, eval_manifest)    # {'acc_text': ..., 'acc_audio': ..., 'gap': ..., 'n': ...}

Prompts (`messages(row, modality)` builds them): the user turn is [audio, INSTRUCTION] for audio and
"<transcript>\n" + INSTRUCTION for text, in the Qwen2-Audio template (default system prompt); stage 1
also sees " " and "" as the separator, so either rendering works. Greedy completions are ~20 tokens.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import resource
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from cordkit.manifest import SR, load_audio
from judge import RuleJudge
from cordkit.families import part, qwen2_audio_encoder, tie_if_configured

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
INSTRUCTION = "Solve it."
# Voices mixed per clip ("backend:voice:speed", see data_gen.synthesize), all from pip packages: three engines
# (hibari and piper neural, espeak-ng a formant synthesiser with many speaker variants), several speeds each.
VOICES = ("hibari:heart:0.9", "hibari:heart:1.05", "hibari:heart:1.25", "piper:joe:0.9", "piper:joe:1.15",
          "espeak:en-us:175", "espeak:en-us+f3:150", "espeak:en-gb-x-rp+m3:165", "espeak:en-029+f2:170",
          "espeak:en-us+Alicia:155", "espeak:en-gb-scotland+m1:180")
# The standard perturbations of speech training (data_gen.parse_augment), on the training clips only.
AUGMENT = "speed=0.9-1.1,vtlp=0.88-1.12,rt60=0.1-0.4,snr=10-30,p=0.5"


SHIPPED = Path(__file__).parent / "tiny"   # the default build, made by `python tiny_lalm.py --ship`


def engine(voice: str) -> str:
    """The TTS engine of a voice spec: engine("espeak:en-us+f3:150") == "espeak"."""
    return voice.split(":")[0]

# The Qwen2-Audio-7B-Instruct chat template (default system prompt, "Audio N:" prefix).
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
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


# ---------------------------------------------------------------------------------------------
# The task: two-step arithmetic on spoken single digits, answered with a short chain

def chain_problems(seed: int = 0, max_operand: int = 9) -> list[dict]:
    """Every "a ± b ± c" with operands 0..max_operand and no negative step, shuffled by seed.

    Each held-out question is new, but its two one-digit facts are not: text accuracy needs the facts
    and their composition, not arithmetic beyond the training set.
    >>> p = chain_problems()[0]; sorted(p)
    ['answer', 'id', 'source', 'text', 'written']
    """
    from data_gen import spoken_form

    out = []
    for a in range(max_operand + 1):
        for b in range(max_operand + 1):
            for c in range(max_operand + 1):
                for o1 in "+-":
                    for o2 in "+-":
                        r1 = a + b if o1 == "+" else a - b
                        r2 = r1 + c if o2 == "+" else r1 - c
                        if r1 < 0 or r2 < 0:
                            continue
                        written = f"What is {a} {o1} {b} {o2} {c}?"
                        name = f"{a}{'p' if o1 == '+' else 'm'}{b}{'p' if o2 == '+' else 'm'}{c}"
                        out.append({"id": f"chain-{name}", "text": spoken_form(written), "answer": str(r2),
                                    "written": written, "source": "tiny:chain"})
    random.Random(seed).shuffle(out)
    return out


def solution(row: dict) -> str:
    """The reference completion for a row with `written` ("What is 7 + 6 - 2?"): a left-to-right chain.

    >>> solution({"written": "What is 7 + 6 - 2?"})
    '7+6=13. 13-2=11. The answer is 11.'
    """
    tokens = re.findall(r"\d+|[+-]", row["written"])
    r, steps = int(tokens[0]), []
    for op, x in zip(tokens[1::2], tokens[2::2]):
        new = r + int(x) if op == "+" else r - int(x)
        steps.append(f"{r}{op}{x}={new}.")
        r = new
    return " ".join(steps) + f" The answer is {r}."


def make_data(root, n_train: int | None = None, n_eval: int = 500, seed: int = 0, voices=VOICES,
              n_dev: int = 200, takes: int = 2, workers: int = 2, augment: str | None = AUGMENT,
              n_engine_eval: int = 0) -> tuple[Path, Path, Path]:
    """Voice the problems with data_gen into root/{train,dev,eval}/manifest.jsonl (+ wavs/, 16 kHz).

    Questions are split disjointly: n_eval for eval, n_dev for early stopping, n_train (default: all
    the rest) for training, each training question voiced `takes` times with seeded voice choices;
    `augment` (data_gen.parse_augment) perturbs the training clips only. With n_engine_eval, the first
    n_engine_eval eval questions are also voiced by each engine alone into root/eval-<engine>/ (the
    leave-one-voice-out sets). Returns the three manifest paths (train, dev, eval).
    """
    from data_gen import write_manifest

    root, problems = Path(root), chain_problems(seed)
    n_train = len(problems) - n_eval - n_dev if n_train is None else n_train
    if n_eval + n_dev + n_train > len(problems):
        raise ValueError(f"only {len(problems)} distinct questions; asked for {n_eval}+{n_dev}+{n_train}")
    eval_q, dev_q = problems[:n_eval], problems[n_eval:n_eval + n_dev]
    train_q = problems[n_eval + n_dev:n_eval + n_dev + n_train]
    train = [dict(p, id=f"{p['id']}-t{k}") for p in train_q for k in range(takes)]
    paths = []
    for name, rows in (("train", train), ("dev", dev_q), ("eval", eval_q)):
        paths.append(write_manifest(rows, root / name, voices=list(voices), workers=workers, seed=seed,
                                    augment=augment if name == "train" else None))
    for e in sorted({engine(v) for v in voices}) if n_engine_eval else ():
        write_manifest(eval_q[:n_engine_eval], root / f"eval-{e}", voices=[v for v in voices if engine(v) == e],
                       workers=workers, seed=seed)
    return tuple(paths)


def without_engine(manifest, holdout: str | None) -> Path:
    """The manifest's rows not voiced by engine `holdout`, as a manifest beside it (<name>-no-<engine>/, audio
    paths pointing into the original folder); the manifest itself when holdout is None."""
    manifest = Path(manifest)
    if not holdout:
        return manifest
    from data_gen import read_manifest
    out = manifest.parent.with_name(f"{manifest.parent.name}-no-{holdout}") / "manifest.jsonl"
    out.parent.mkdir(exist_ok=True)
    rows = [dict(r, audio=f"../{manifest.parent.name}/{r['audio']}") for r in read_manifest(manifest)
            if engine(r["voice"]) != holdout]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


# ---------------------------------------------------------------------------------------------
# Processor and model

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
    template_text = (f"system user assistant You are a helpful assistant. Audio 1: The answer is \\boxed{{}} "
                     f"{INSTRUCTION}")
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


def build_processor(corpus: list[str], vocab_size: int = 512, chunk_seconds: int = 4,
                    n_mels: int = 80) -> Qwen2AudioProcessor:
    """A Qwen2AudioProcessor: trained tokenizer + Whisper features padded to `chunk_seconds`
    (10 ms frames: the encoder sees 50 frames/s after its stride-2 conv, the LM 25 audio tokens/s)."""
    feature_extractor = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=chunk_seconds)
    tokenizer = build_tokenizer(corpus, vocab_size)
    return Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_model(
    processor: Qwen2AudioProcessor,
    d_audio: int = 128,
    audio_layers: int = 2,
    d_text: int = 128,
    text_layers: int = 4,
    seed: int = 0,
) -> Qwen2AudioForConditionalGeneration:
    """A randomly initialised Qwen2AudioForConditionalGeneration sized for a CPU (about 1.5 M params)."""
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
    tie_if_configured(model)  # transformers 5.x does not tie Qwen2-Audio's head by itself
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


# ---------------------------------------------------------------------------------------------
# Prompts and batches

def messages(row: dict, modality: str, sep: str = "\n") -> list[dict]:
    """The chat for one manifest row: x_a (audio + instruction) or x_t (transcript + same instruction)."""
    if modality == "audio":
        content = [{"type": "audio", "audio": row["audio"]}, {"type": "text", "text": INSTRUCTION}]
    else:
        content = [{"type": "text", "text": row["text"] + sep + INSTRUCTION}]
    return [{"role": "user", "content": content}]


def _prompt(processor, row, modality, sep="\n") -> str:
    return processor.apply_chat_template(messages(row, modality, sep), add_generation_prompt=True, tokenize=False)


def _load_audio(row: dict, base: Path) -> np.ndarray:
    return load_audio(base / row["audio"], SR)


def _rows(manifest) -> tuple[list[dict], Path]:
    """(rows, folder the audio paths are relative to) from a manifest path or a list of rows."""
    if isinstance(manifest, (str, Path)):
        from data_gen import read_manifest
        return read_manifest(manifest), Path(manifest).parent
    return list(manifest), Path(".")


def _pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to (B, T); returns (ids, attention mask)."""
    T = max(map(len, seqs))
    out, mask = torch.full((len(seqs), T), value, dtype=torch.long), torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return out, mask


class AudioCache:
    """Whisper features and expanded audio-prompt ids of every clip, computed once (stage 2 reuses them)."""

    def __init__(self, processor, rows: list[dict], base: Path, batch: int = 128):
        tok = processor.tokenizer
        self.rows, self.feats, self.fmask, self.ids = rows, [], [], []
        for i in range(0, len(rows), batch):
            part = rows[i:i + batch]
            enc = processor(text=[_prompt(processor, r, "audio") for r in part],
                            audio=[_load_audio(r, base) for r in part], sampling_rate=SR)
            self.feats.append(torch.tensor(np.asarray(enc["input_features"]), dtype=torch.float16))
            self.fmask.append(torch.tensor(np.asarray(enc["feature_attention_mask"]), dtype=torch.bool))
            self.ids.extend(enc["input_ids"])
        self.feats, self.fmask = torch.cat(self.feats), torch.cat(self.fmask)   # (N, n_mels, frames), (N, frames)
        self.completion = [tok(solution(r) + tok.eos_token, add_special_tokens=False).input_ids for r in rows]
        self.transcript = [tok(r["text"], add_special_tokens=False).input_ids for r in rows]


# ---------------------------------------------------------------------------------------------
# Forward pieces (the same computation as Qwen2AudioForConditionalGeneration.forward, opened up)

def audio_embeddings(model, input_features, feature_attention_mask, return_hidden: bool = False):
    """Projected audio tokens (B, Ta, D) and their valid lengths (B,), through families.qwen2_audio_encoder (the
    encoder as the model's own forward runs it); with return_hidden also the encoder output (B, Ta, d_audio)."""
    enc, projector = part(model, "audio_tower"), part(model, "multi_modal_projector")
    h, out_len = qwen2_audio_encoder(enc, input_features.to(enc.conv1.weight.dtype),
                                     feature_attention_mask)  # (B, Ta, d_audio)
    if return_hidden:
        return projector(h), out_len, h
    return projector(h), out_len                                                     # (B, Ta, D), (B,)


class _TextLM(torch.nn.Module):
    """transformers 5.x: the LALM's decoder and head, called as 4.x's `language_model` (a causal LM with logits)."""

    def __init__(self, model):
        super().__init__()
        self.decoder, self.lm_head = model.get_decoder(), model.get_output_embeddings()

    def forward(self, **kw):
        return SimpleNamespace(logits=self.lm_head(self.decoder(**kw).last_hidden_state))


def text_lm(model):
    """The language model with its head (input_ids or inputs_embeds -> .logits), on transformers 4.x and 5.x."""
    lm = part(model, "language_model")
    return lm if hasattr(lm, "lm_head") else _TextLM(model)


def _merge(model, input_ids, audio_emb, audio_len) -> torch.Tensor:
    """inputs_embeds (B, T, D) with the audio tokens' embeddings replaced by the projected audio."""
    emb = model.get_input_embeddings()(input_ids)                                     # (B, T, D)
    valid = torch.arange(audio_emb.shape[1])[None, :] < audio_len[:, None]            # (B, Ta)
    slots = (input_ids == model.config.audio_token_id).unsqueeze(-1).expand_as(emb)
    return emb.masked_scatter(slots, audio_emb[valid].to(emb.dtype))


# ---------------------------------------------------------------------------------------------
# Accuracy during the build: batched greedy decoding (model.generate), scored by judge.RuleJudge as cord.evaluate is

@torch.no_grad()
def generate_answers(model, processor, rows, base, modality, batch_size=100, max_new_tokens=40) -> list[str]:
    """Greedy completions (left padding) for rows in one modality."""
    tok, was_training = processor.tokenizer, model.training
    model.eval()
    suppress = tok.convert_tokens_to_ids(["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"])
    outs = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        prompts = [_prompt(processor, r, modality) for r in part]
        if modality == "audio":
            enc = processor(text=prompts, audio=[_load_audio(r, base) for r in part], sampling_rate=SR,
                            padding=True, return_tensors="pt")
        else:
            enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, suppress_tokens=suppress)
        outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return outs


def accuracy(model, processor, manifest, n: int | None = None, modalities=("text", "audio"),
             batch_size: int = 100) -> dict:
    """Greedy accuracy from text and from audio on the first n items: {acc_text, acc_audio, gap, n}, as fractions.

    Scored as cord.evaluate scores (judge.RuleJudge against the answer); this one is small and fast, for the
    build's early stopping and stats (cord.evaluate adds the KL analysis and runs on the demo's eval set).
    """
    rows, base = _rows(manifest)
    rows = rows[:n] if n else rows
    out, rule = {"n": len(rows)}, RuleJudge(ground_truth=True)
    for m in modalities:
        answers = generate_answers(model, processor, rows, base, m, batch_size)
        out[f"acc_{m}"] = float(np.mean(rule(answers, [r["answer"] for r in rows])))
    if "acc_text" in out and "acc_audio" in out:
        out["gap"] = out["acc_text"] - out["acc_audio"]
    return out


# ---------------------------------------------------------------------------------------------
# Stage 1: the language model learns the task from text

def _schedule(opt, steps, warmup):
    """Linear warm-up, then linear decay to 10 % of the peak learning rate."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1.0 - s / max(1, steps)))


def audio_prompt_parts(processor) -> tuple[list[int], list[int]]:
    """Token ids of the audio prompt before and after its <|AUDIO|> slot."""
    tok = processor.tokenizer
    ids = tok(_prompt(processor, {"audio": "x.wav"}, "audio"), add_special_tokens=False).input_ids
    k = ids.index(tok.convert_tokens_to_ids("<|AUDIO|>"))
    return ids[:k], ids[k + 1:]


def train_text(model, processor, examples: list[dict], steps: int = 500, batch_size: int = 64, lr: float = 5e-3,
               seed: int = 0, slots: list[list[int]] | None = None, pseudo_audio_share: float = 0.5,
               log_every: int = 50) -> list[float]:
    """Stage 1: teacher-forced SFT of the language model on text prompts; returns the loss curve.

    Loss: cross-entropy on the completion tokens only, mean over all completion tokens in the batch.
    The separator between transcript and instruction is drawn from ("\n", " ", "") so the model does
    not depend on how a caller renders the text prompt. With `slots` (one per example: its clip's
    pseudo-audio, see `pseudo_audio_slots`), a share `pseudo_audio_share` of each batch uses the audio
    prompt with that slot: the LM learns to read its audio slot as words among <|AUDIO|> blanks, laid
    out as the CTC speech recogniser hears them, the interface that stage 2 aligns the encoder to.
    """
    tok, lm = processor.tokenizer, text_lm(model)
    rng, losses = random.Random(seed), []
    torch.manual_seed(seed)
    comp = [tok(solution(r) + tok.eos_token, add_special_tokens=False).input_ids for r in examples]
    prompts = {sep: [tok(_prompt(processor, r, "text", sep), add_special_tokens=False).input_ids for r in examples]
               for sep in ("\n", " ", "")}
    before, after = audio_prompt_parts(processor)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = _schedule(opt, steps, warmup=30)
    n_pseudo = round(batch_size * pseudo_audio_share) if slots else 0
    lm.train()
    bar = tqdm(range(steps), desc="stage 1 (text SFT)", unit="step")
    for step in bar:
        idx = [rng.randrange(len(examples)) for _ in range(batch_size)]
        groups = ((idx[:n_pseudo], [before + slots[i] + after for i in idx[:n_pseudo]]),
                  (idx[n_pseudo:], [prompts[rng.choice(("\n", "\n", " ", ""))][i] for i in idx[n_pseudo:]]))
        loss = 0.0
        for group, ps in groups:                      # pseudo-audio and text prompts: two lengths, two passes
            if not group:
                continue
            (input_ids, mask), (labels, _) = (_pad([p + comp[i] for p, i in zip(ps, group)], tok.pad_token_id),
                                              _pad([[-100] * len(p) + comp[i] for p, i in zip(ps, group)], -100))
            logits = lm(input_ids=input_ids, attention_mask=mask).logits                  # (b, T, V)
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
            loss = loss + ce * len(group) / batch_size                                    # mean over examples
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.3f}")
    lm.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Stage 0 (encoder pre-training as a CTC recogniser) and its alignments

def spec_augment(feats, fmask, rng: random.Random, masks: int = 2, max_f: int = 10, max_t: int = 10) -> torch.Tensor:
    """SpecAugment (Park et al. 2019) on Whisper features (B, n_mels, frames): per clip, `masks` bands of up to
    max_f mel bins and `masks` spans of up to max_t frames (10 ms each) set to the clip's mean. Returns a copy."""
    out, (B, M, _), lens = feats.clone(), feats.shape, fmask.sum(1).tolist()
    for b in range(B):
        mean = out[b, :, :lens[b]].mean()
        for _ in range(masks):
            w = rng.randint(0, max_f)
            f0 = rng.randint(0, M - w)
            out[b, f0:f0 + w, :lens[b]] = mean
            w = rng.randint(0, max_t)
            t0 = rng.randint(0, max(0, lens[b] - w))
            out[b, :, t0:t0 + w] = mean
    return out


def ctc_head(model) -> torch.nn.Linear:
    """A linear CTC head on the audio encoder's output over the LM vocabulary (auxiliary, not saved
    in the model; blank = <|AUDIO|>)."""
    torch.manual_seed(0)
    return torch.nn.Linear(model.config.audio_config.d_model, model.config.text_config.vocab_size)


def _ctc(logp, a_len, targets, blank, reduction="mean"):
    """torch's CTC on (B, Ta, V) log-probs; reduction "mean" = mean over the batch of loss / target length."""
    return F.ctc_loss(logp.transpose(0, 1), torch.tensor([t for ts in targets for t in ts]), a_len,
                      torch.tensor([len(ts) for ts in targets]), blank=blank, reduction=reduction, zero_infinity=True)


def pretrain_encoder(model, head, cache, steps: int = 300, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                     spec_aug: bool = True, target: float | None = None) -> list[float]:
    """Stage 0: the audio encoder learns to recognise the transcripts with CTC (head on its output), as
    real LALMs start from a pretrained speech encoder (Whisper for Qwen2-Audio). The LM is not involved.
    spec_aug: SpecAugment on each batch's features (`spec_augment`). target: stop once the mean CTC loss of the
    last 50 steps is at most this (the alignments that stages 1 and 2 learn from are only as good as the
    recogniser: at a loss of ~2 they are noise); `steps` is then the cap."""
    rng, mask_rng = random.Random(seed), random.Random(seed + 1)
    torch.manual_seed(seed)
    blank = model.config.audio_token_id
    tower = part(model, "audio_tower")
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = _schedule(opt, steps, warmup=50)
    tower.train()
    losses = []
    bar = tqdm(range(steps), desc="stage 0 (encoder CTC)", unit="step")
    for step in bar:
        idx = [rng.randrange(len(cache.rows)) for _ in range(batch_size)]
        feats = cache.feats[idx].float()                                  # (B, n_mels, frames)
        feats = spec_augment(feats, cache.fmask[idx], mask_rng) if spec_aug else feats
        _, a_len, h = audio_embeddings(model, feats, cache.fmask[idx], return_hidden=True)
        loss = _ctc(head(h).log_softmax(-1), a_len, [cache.transcript[i] for i in idx], blank)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            bar.set_postfix(ctc=f"{np.mean(losses[-50:]):.3f}")
            if target is not None and np.mean(losses[-50:]) <= target:
                break
    tower.eval()
    return losses


def ctc_forced_align_batch(logp: np.ndarray, lengths, targets: list[list[int]], blank: int) -> list[list[int]]:
    """Viterbi forced alignment of a batch of CTC outputs: for each clip, the frame where each target
    token is emitted (its first frame on the best path), vectorised over clips.

    logp (B, Ta, V) log-probs, lengths (B,) valid frames, targets: B lists of token ids.
    >>> lp = np.log(np.array([[[.1, .8, .1], [.8, .1, .1], [.1, .1, .8], [.8, .1, .1]]]))   # blank = 0
    >>> ctc_forced_align_batch(lp, [4], [[1, 2]], blank=0)
    [[0, 2]]
    """
    B, Ta, _ = logp.shape
    L = max(map(len, targets))
    S = 2 * L + 1
    ext = np.full((B, S), blank, dtype=np.int64)                            # l' = b y1 b y2 ... b (padded)
    for b, tr in enumerate(targets):
        ext[b, 1:2 * len(tr):2] = tr
    n_states = np.array([2 * len(tr) + 1 for tr in targets])
    real = np.arange(S)[None, :] < n_states[:, None]                         # (B, S)
    e = np.take_along_axis(logp, np.broadcast_to(ext[:, None, :], (B, Ta, S)), axis=2)   # (B, Ta, S)
    e = np.where(real[:, None, :], e, -np.inf)
    skip = np.zeros((B, S), dtype=bool)
    skip[:, 2:] = (ext[:, 2:] != blank) & (ext[:, 2:] != ext[:, :-2])
    score = np.full((B, S), -np.inf)
    score[:, :2] = e[:, 0, :2]
    scores, back = np.empty((B, Ta, S)), np.zeros((B, Ta, S), dtype=np.int64)
    scores[:, 0] = score
    neg = np.full((B, 1), -np.inf)
    for t in range(1, Ta):
        step1 = np.concatenate([neg, score[:, :-1]], 1)
        step2 = np.where(skip, np.concatenate([neg, neg, score[:, :-2]], 1), -np.inf)
        cand = np.stack([score, step1, step2])                              # (3, B, S)
        back[:, t] = cand.argmax(0)
        score = cand.max(0) + e[:, t]
        scores[:, t] = score
    out = []
    for b in range(B):
        t_end, last = int(lengths[b]) - 1, n_states[b] - 1
        s = last if scores[b, t_end, last] >= scores[b, t_end, last - 1] else last - 1
        path = [s]
        for t in range(t_end, 0, -1):
            s -= back[b, t, s]
            path.append(s)
        path = path[::-1]
        out.append([path.index(2 * j + 1) for j in range(len(targets[b]))])
    return out


@torch.no_grad()
def pseudo_audio_slots(model, head, cache, batch_size: int = 256) -> list[list[int]]:
    """For every clip, its audio slot written in tokens: the transcript's tokens at the frames where
    the CTC recogniser emits them (forced alignment), <|AUDIO|> everywhere else; same length as the
    clip's audio tokens. This is what stage 2's aligned encoder + projector will show the LM."""
    blank, out = model.config.audio_token_id, []
    for i in range(0, len(cache.rows), batch_size):
        idx = list(range(i, min(i + batch_size, len(cache.rows))))
        _, a_len, h = audio_embeddings(model, cache.feats[idx].float(), cache.fmask[idx], return_hidden=True)
        logp = head(h).log_softmax(-1).numpy()                              # (b, Ta, V)
        targets = [cache.transcript[k] for k in idx]
        for n, tr, frames in zip(a_len.tolist(), targets, ctc_forced_align_batch(logp, a_len, targets, blank)):
            slot = [blank] * n
            for t, frame in zip(tr, frames):
                slot[frame] = t
            out.append(slot)
    return out


# ---------------------------------------------------------------------------------------------
# Stage 2: audio encoder + projector learn to map speech into the frozen language model

def pseudo_audio_loss(a_emb, a_len, slots: list[list[int]], E, blank: int):
    """Regression of the projected audio tokens onto the clip's pseudo-audio, E[slot_t] at every frame t.

    a_emb (B, Ta, D) projected audio tokens, a_len (B,) valid lengths, slots: B lists of token ids (the
    transcript's tokens at their forced-alignment frames, `blank` elsewhere), E (V, D) the LM's frozen
    input embeddings. Squared error / mean ||E_v||^2, averaged over word frames and over blank frames
    separately, then the two averaged: the ~8 word frames weigh as much as the ~50 blank ones.
    """
    B, Ta, _ = a_emb.shape
    ids = torch.full((B, Ta), blank, dtype=torch.long)
    for b, slot in enumerate(slots):
        ids[b, :len(slot)] = torch.tensor(slot)
    valid = torch.arange(Ta)[None, :] < a_len[:, None]                                     # (B, Ta)
    word = valid & (ids != blank)
    err = ((a_emb - E[ids]) ** 2).sum(-1) / (E ** 2).sum(-1).mean()                       # (B, Ta)
    return 0.5 * err[word].mean() + 0.5 * err[valid & ~word].mean()


def train_audio(model, processor, cache, slots, dev_manifest, head, max_steps: int = 1000, batch_size: int = 32,
                lr: float = 1e-3, ctc_weight: float = 1.0, emb_weight: float = 1.0, ce_weight: float = 0.0,
                target_audio: float = 0.42, eval_every: int = 10, fine_lr: float = 0.25, n_dev: int | None = None,
                seed: int = 0, spec_aug: bool = True) -> dict:
    """Stage 2: train audio_tower + multi_modal_projector (language model frozen), stop at target_audio.

    cache: the training clips (AudioCache), slots: their pseudo-audio (`pseudo_audio_slots`), head: the
    CTC head of stage 0. Loss per step = emb_weight * EMB + ctc_weight * CTC + ce_weight * CE:
    - EMB: `pseudo_audio_loss`, the projected audio tokens regress onto the clip's pseudo-audio (its
      words' LM embeddings at the frames where they are spoken, <|AUDIO|> elsewhere), which stage 1
      taught the LM to read;
    - CTC: the stage-0 objective, so the encoder keeps recognising the words (mean over the batch of
      per-sequence CTC / transcript length);
    - CE (off by default; it triples the step time): cross-entropy of the reference completion given
      the audio prompt, through the frozen LM, mean over completion tokens.
    spec_aug: SpecAugment on each batch's features (`spec_augment`).
    Every eval_every steps the greedy audio accuracy on the dev manifest is measured. The accuracy rises
    steeply once the audio tokens come close to the pseudo-audio, so from target_audio / 4 on the
    learning rate is multiplied by fine_lr and the accuracy measured twice as often; training stops at
    the first measurement >= target_audio, keeping whichever of the last two snapshots is closer to it.
    Returns {"steps", "dev_acc_audio", "curve": [(step, dev acc)], "loss": [[ce, ctc, emb] per step]}.
    """
    tok, lm = processor.tokenizer, text_lm(model)
    torch.manual_seed(seed)
    rng, mask_rng = random.Random(seed), random.Random(seed + 1)
    for p in lm.parameters():
        p.requires_grad_(False)
    tower, projector = part(model, "audio_tower"), part(model, "multi_modal_projector")
    trained = list(tower.parameters()) + list(projector.parameters())
    blank = model.config.audio_token_id                                 # CTC blank = the audio filler token
    E = model.get_input_embeddings().weight.detach()                    # (V, D) frozen token embeddings
    opt = torch.optim.AdamW(trained + list(head.parameters()), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    near = [False]                                                      # set once dev acc >= target_audio / 4
    sched = torch.optim.lr_scheduler.LambdaLR(                          # warm-up, constant, x fine_lr when near
        opt, lambda s: min(1.0, (s + 1) / 50) * (fine_lr if near[0] else 1.0))

    def snapshot():
        return {k: v.detach().clone() for k, v in model.state_dict().items()
                if "language_model." not in k and not k.startswith("lm_head")}

    curve, losses, prev = [], [], None
    tower.train(), projector.train(), lm.eval()
    bar = tqdm(range(max_steps), desc="stage 2 (audio alignment)", unit="step")
    for step in bar:
        idx = [rng.randrange(len(cache.rows)) for _ in range(batch_size)]
        feats, fmask = cache.feats[idx].float(), cache.fmask[idx]        # (B, n_mels, frames), (B, frames)
        feats = spec_augment(feats, fmask, mask_rng) if spec_aug else feats
        a_emb, a_len, h = audio_embeddings(model, feats, fmask, return_hidden=True)   # (B, Ta, D), (B,), (B, Ta, d_a)
        emb = pseudo_audio_loss(a_emb, a_len, [slots[i] for i in idx], E, blank)
        ctc = _ctc(head(h).log_softmax(-1), a_len, [cache.transcript[i] for i in idx], blank)
        ce = torch.zeros(())
        if ce_weight:
            seqs = [cache.ids[i] + cache.completion[i] for i in idx]
            labels = [[-100] * len(cache.ids[i]) + cache.completion[i] for i in idx]
            (input_ids, mask), (labels, _) = _pad(seqs, tok.pad_token_id), _pad(labels, -100)   # (B, T)
            logits = lm(inputs_embeds=_merge(model, input_ids, a_emb, a_len), attention_mask=mask).logits   # (B, T, V)
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        loss = ce_weight * ce + ctc_weight * ctc + emb_weight * emb
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append((ce.item(), ctc.item(), emb.item()))
        every = max(1, eval_every // 2) if near[0] else eval_every
        if (step + 1) % every == 0 or step + 1 == max_steps:
            acc = accuracy(model, processor, dev_manifest, n=n_dev, modalities=("audio",))["acc_audio"]
            curve.append((step + 1, acc))
            m = np.mean(losses[-eval_every:], axis=0)
            tqdm.write(f"stage 2 step {step + 1}: ce {m[0]:.3f} ctc {m[1]:.3f} emb {m[2]:.3f} dev audio acc {acc:.3f}")
            if acc >= target_audio:
                if prev is not None and abs(prev[1] - target_audio) < abs(acc - target_audio):
                    model.load_state_dict(prev[0], strict=False)
                    curve.append(curve[-2])
                break
            prev = (snapshot(), acc)
            near[0] = near[0] or acc >= target_audio / 4
    for p in lm.parameters():
        p.requires_grad_(True)
    model.eval()
    return {"steps": curve[-1][0], "dev_acc_audio": curve[-1][1], "curve": curve,
            "loss": [[round(x, 4) for x in l] for l in losses]}


# ---------------------------------------------------------------------------------------------
# Build or load, with cached stages

def _save(model, processor, path: Path, stats: dict, head=None):
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)                                        # safetensors
    processor.save_pretrained(path)
    if head is not None:
        save_file(head.state_dict(), path / "ctc_head.safetensors")    # stage 0's CTC head, for stage 2
    (path / "tiny_lalm.json").write_text(json.dumps(stats, indent=1))


def _load(path: Path):
    from transformers import AutoProcessor
    model, info = Qwen2AudioForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    tie_if_configured(model, loaded_from=path, missing=info["missing_keys"])
    return model.eval(), AutoProcessor.from_pretrained(path)


def _cached(path: Path, settings: dict):
    """The stats of a finished stage in `path` built with the same settings, else None."""
    f = path / "tiny_lalm.json"
    if f.exists() and (path / "model.safetensors").exists():
        stats = json.loads(f.read_text())
        if stats.get("settings") == settings:
            return stats
    return None


def _load_language_model(model, processor, path: Path):
    """Copy the language model (embeddings, decoder, head: everything but audio_tower and multi_modal_projector) of
    the finished stage 1 in `path` into `model`."""
    if not (path / "tiny_lalm.json").exists():
        raise FileNotFoundError(f"{path}: no finished stage 1 to share its language model; build that model first")
    other, other_processor = _load(path)
    if other_processor.tokenizer.get_vocab() != processor.tokenizer.get_vocab():
        raise ValueError(f"{path} was built with another tokenizer (other training questions); cannot share its LM")
    lm = {k: v for k, v in other.state_dict().items() if "audio_tower" not in k and "multi_modal_projector" not in k}
    missing, unexpected = model.load_state_dict(lm, strict=False)
    assert (not unexpected
            and all("audio_tower" in k or "multi_modal_projector" in k for k in missing)), (missing, unexpected)
    tie_if_configured(model)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the TTS workers)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


def load_or_build(cache_dir=".cache/tiny_lalm", seed: int = 0, n_train: int | None = None, n_eval: int = 500,
                  n_dev: int = 200, takes: int = 1, voices=VOICES, chunk_seconds: int = 3, d_audio: int = 128,
                  audio_layers: int = 2, d_text: int = 128, text_layers: int = 4, ctc_steps: int = 1500,
                  ctc_target: float | None = 0.6,
                  text_steps: int = 500, text_lr: float = 5e-3, pseudo_audio_share: float = 0.5,
                  audio_max_steps: int = 1000, audio_lr: float = 1e-3, ce_weight: float = 0.0,
                  target_audio: float = 0.42, eval_every: int = 10, batch_size: int = 64, n_stats: int | None = None,
                  workers: int = 2, threads: int | None = None, augment: str | None = AUGMENT, spec_aug: bool = True,
                  n_engine_eval: int = 200, holdout: str | None = None, data_dir=None, shared_lm=None,
                  shipped=SHIPPED, demo_train: int = 960):
    """(model, processor, train_manifest, eval_manifest) of the tiny LALM; builds and caches what is missing.

    cache_dir/ holds the final model (save_pretrained: safetensors + processor + tiny_lalm.json with the
    build stats), cache_dir/stage1/ the model after stages 0 and 1, data_dir (default cache_dir/data/) the
    voiced data. A stage is rebuilt only when it is missing or was built with other settings: changing a
    stage-2 setting reruns stage 2 from the cached stage 1. n_stats: eval items for the final stats (default
    all). holdout: an engine (hibari, piper, espeak) whose clips are left out of training, dev and the returned
    eval manifest (the leave-one-voice-out build); its own eval set data/eval-<engine>/ is scored into the stats.
    shared_lm: a finished build's folder whose tokenizer and stage-1 language model are reused (stage 1 skipped;
    the LM never hears: only stages 0 and 2, the audio encoder and projector, are trained here).
    shipped: a folder with a finished model (default: tiny/ in the repository); when its tiny_lalm.json holds
    exactly these settings it is loaded instead of building, and only the eval, dev and the first demo_train
    training questions are voiced (what `python cord.py` reads): every user starts from the same weights.
    """
    if threads:
        torch.set_num_threads(threads)
    cache = Path(cache_dir)
    data = Path(data_dir) if data_dir else cache / "data"
    data_settings = dict(seed=seed, n_train=n_train, n_eval=n_eval, n_dev=n_dev, takes=takes, voices=list(voices),
                         augment=augment, n_engine_eval=n_engine_eval)
    s1_settings = dict(data_settings, chunk_seconds=chunk_seconds, d_audio=d_audio, audio_layers=audio_layers,
                       d_text=d_text, text_layers=text_layers, ctc_steps=ctc_steps, ctc_target=ctc_target,
                       text_steps=text_steps,
                       text_lr=text_lr, pseudo_audio_share=pseudo_audio_share, batch_size=batch_size,
                       spec_aug=spec_aug, holdout=holdout, shared_lm=str(shared_lm) if shared_lm else None)
    settings = dict(s1_settings, audio_max_steps=audio_max_steps, audio_lr=audio_lr, ce_weight=ce_weight,
                    target_audio=target_audio, eval_every=eval_every, n_stats=n_stats)
    train_m, dev_m, eval_m = (data / s / "manifest.jsonl" for s in ("train", "dev", "eval"))
    stats, data_json = _cached(cache, settings), data / "data.json"
    shipped_stats = _cached(Path(shipped), settings) if stats is None and shipped else None
    if shipped_stats is not None:
        # The model in the repository was built with exactly these settings: load it, and voice only the data the
        # demo reads (the eval set, dev, and the first demo_train training questions), unless all of it is there.
        cache, stats = Path(shipped), shipped_stats
        from cordkit.plumbing import check_weights_file

        check_weights_file(cache / "model.safetensors")  # a damaged copy stops here, in one line, before any voicing
        subset = dict(data_settings, n_train=min(demo_train, len(chain_problems(seed)) - n_eval - n_dev),
                      n_engine_eval=0)
        if not (data_json.exists() and json.loads(data_json.read_text()) in (data_settings, subset)
                and eval_m.exists()):
            make_data(data, subset["n_train"], n_eval, seed, voices, n_dev=n_dev, takes=takes, workers=workers,
                      augment=augment)
            data_json.write_text(json.dumps(subset))
    if stats is not None:
        train_m, dev_m, eval_m = (without_engine(m, holdout) for m in (train_m, dev_m, eval_m))
        model, processor = _load(cache)
        print(f"tiny LALM from {cache}: " + ", ".join(f"{k} {stats[k]:.3f}" for k in ("acc_text", "acc_audio", "gap")))
        return model, processor, train_m, eval_m

    t_start, times = time.time(), {}
    cpu_start = _cpu_seconds()
    if not (data_json.exists() and json.loads(data_json.read_text()) == data_settings and eval_m.exists()):
        t0 = time.time()
        make_data(data, n_train, n_eval, seed, voices, n_dev=n_dev, takes=takes, workers=workers, augment=augment,
                  n_engine_eval=n_engine_eval)
        data_json.write_text(json.dumps(data_settings))
        times["data_s"] = time.time() - t0
    train_m, dev_m, eval_m = (without_engine(m, holdout) for m in (train_m, dev_m, eval_m))
    train_rows, train_base = _rows(train_m)

    s1 = _cached(cache / "stage1", s1_settings) if (cache / "stage1" / "ctc_head.safetensors").exists() else None
    clips = None
    if s1 is None:
        t0 = time.time()
        # the tokenizer is trained on every training question (all engines): a holdout build's equals the full one's
        corpus = ([r["text"] + " " + solution(r) for r in _rows(data / "train" / "manifest.jsonl")[0]]
                  + [INSTRUCTION] * 50)
        processor = build_processor(corpus, chunk_seconds=chunk_seconds)
        model = build_model(processor, d_audio, audio_layers, d_text, text_layers, seed)
        clips = AudioCache(processor, train_rows, train_base)
        head = ctc_head(model)
        ctc = pretrain_encoder(model, head, clips, ctc_steps, batch_size // 2, seed=seed, spec_aug=spec_aug,   # stage 0
                               target=ctc_target)
        slots = pseudo_audio_slots(model, head, clips)
        times["stage0_s"] = time.time() - t0
        t0 = time.time()
        if shared_lm:                  # another build's language model (it never hears); the hearing parts are ours
            losses = [float("nan")]
            _load_language_model(model, processor, Path(shared_lm) / "stage1")
        else:
            losses = train_text(model, processor, train_rows, text_steps, batch_size, text_lr, seed,   # stage 1
                                slots=slots, pseudo_audio_share=pseudo_audio_share)
        acc = accuracy(model, processor, dev_m, modalities=("text",))["acc_text"]
        times["stage1_s"] = time.time() - t0
        s1 = dict(settings=s1_settings, dev_acc_text=acc, ctc_loss=float(np.mean(ctc[-50:])), ctc_steps_run=len(ctc),
                  text_loss=float(np.mean(losses[-50:])), seconds=times["stage0_s"] + times["stage1_s"])
        print(f"stage 0: CTC loss {s1['ctc_loss']:.3f}; stage 1: dev text accuracy {acc:.3f}")
        _save(model, processor, cache / "stage1", s1, head)
    model, processor = _load(cache / "stage1")
    head = ctc_head(model)
    head.load_state_dict(load_file(cache / "stage1" / "ctc_head.safetensors"))
    if clips is None:                                  # stage 1 from the cache: same encoder, same slots
        clips = AudioCache(processor, train_rows, train_base)
        slots = pseudo_audio_slots(model, head, clips)

    t0 = time.time()
    # stage 2
    s2 = train_audio(model, processor, clips, slots, dev_m, head, audio_max_steps, batch_size // 2, audio_lr,
                     ce_weight=ce_weight, target_audio=target_audio, eval_every=eval_every, seed=seed,
                     spec_aug=spec_aug)
    times["stage2_s"] = time.time() - t0
    t0 = time.time()
    ev = accuracy(model, processor, eval_m, n=n_stats)
    held = data / f"eval-{holdout}" / "manifest.jsonl"
    if holdout and held.exists():
        ev["heldout"] = dict(engine=holdout, **accuracy(model, processor, held, n=n_stats))
    times["eval_s"] = time.time() - t0
    stats = dict(settings=settings, **ev, stage1=s1, stage2={k: v for k, v in s2.items() if k != "loss"},
                 params=sum(p.numel() for p in model.parameters()), times=times,
                 build_minutes=(time.time() - t_start) / 60, cpu_minutes=(_cpu_seconds() - cpu_start) / 60,
                 torch_threads=torch.get_num_threads())
    print(f"tiny LALM on {ev['n']} held-out items: text {ev['acc_text']:.3f}, audio {ev['acc_audio']:.3f}, "
          f"gap {ev['gap']:.3f} (built in {stats['build_minutes']:.1f} min)"
          + (f"; never-heard engine {holdout}: audio {ev['heldout']['acc_audio']:.3f}" if "heldout" in ev else ""))
    _save(model, processor, cache, stats)
    return model, processor, train_m, eval_m


def ship(cache_dir, dest=SHIPPED) -> list[Path]:
    """Copy a finished build (weights, processor, tiny_lalm.json; not its stages or data) into dest/."""
    dest = Path(dest)
    dest.mkdir(exist_ok=True)
    files = [f for f in Path(cache_dir).iterdir() if f.is_file()]
    for f in files:
        shutil.copy2(f, dest / f.name)
    store_tied_head(dest / "model.safetensors")
    portable_tokenizer_config(dest / "tokenizer_config.json")
    return [dest / f.name for f in files]


def portable_tokenizer_config(path: Path) -> None:
    """A tokenizer config that transformers 4.57 reads too: 5.x writes tokenizer_class TokenizersBackend and a list
    under extra_special_tokens, which 4.57 cannot load; PreTrainedTokenizerFast with additional_special_tokens gives
    the same ids, special tokens and chat template on both (tests/test_install.py loads the shipped model)."""
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    path.write_text(json.dumps(config, indent=2) + "\n")


def store_tied_head(weights: Path) -> None:
    """Write the tied lm_head into a checkpoint that stores only the embeddings (save_pretrained's way), so the
    shipped model loads on every transformers version without a 'lm_head.weight MISSING' report."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    embed = [k for k in tensors if k.endswith("embed_tokens.weight") and "audio" not in k]
    head = "language_model.lm_head.weight" if embed and embed[0].startswith("language_model.") else "lm_head.weight"
    if not any(k.endswith("lm_head.weight") for k in tensors) and len(embed) == 1:
        tensors[head] = tensors[embed[0]].clone()  # as transformers 4.x names it when the file is in 4.x's layout
        save_file(tensors, str(weights), metadata=metadata)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache-dir", default=".cache/tiny_lalm", help="where the model, its stages and data are cached")
    p.add_argument("--seed", type=int, default=0, help="seed for data, init and training")
    p.add_argument("--target-audio", type=float, default=0.42, help="stage 2 stops at this dev audio accuracy")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--holdout", default=None, choices=sorted({engine(v) for v in VOICES}),
                   help="leave this TTS engine out of training (its clips stay in the data; scored as never heard)")
    p.add_argument("--data-dir", default=None,
                   help="voiced data folder (default: CACHE_DIR/data; share it between builds)")
    p.add_argument("--shared-lm", default=None, help="a finished build whose language model (stage 1) is reused")
    p.add_argument("--ship", action="store_true",
                   help=f"build (never load the shipped one) and copy it to {SHIPPED.name}/")
    a = p.parse_args(argv)
    load_or_build(a.cache_dir, a.seed, target_audio=a.target_audio, threads=a.threads, holdout=a.holdout,
                  data_dir=a.data_dir, shared_lm=a.shared_lm, shipped=None if a.ship else SHIPPED)
    if a.ship:
        print("\n".join(f"{f} ({f.stat().st_size / 1e6:.2f} MB)" for f in ship(a.cache_dir)))
    where = Path(a.cache_dir) if (Path(a.cache_dir) / "model.safetensors").exists() else SHIPPED
    stats = json.loads((where / "tiny_lalm.json").read_text())
    print(json.dumps({k: v for k, v in stats.items() if k not in ("settings", "stage2")}, indent=1))


if __name__ == "__main__":
    main()
