"""families.py: loading audio LLMs the same way on transformers 4.57 and 5.x (parts, tied heads, save -> load)."""
import pytest
import torch

import families
from conftest import QUESTIONS


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
