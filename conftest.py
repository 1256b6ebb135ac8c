"""Shared fixtures of the test suite (all CPU): real TTS speech, tiny models of the real architectures built here.

The suite, one file per module (STYLE.md): test_cord.py (loss math against slow loops and hand tables,
the whole method on tiny Qwen2-Audio / Qwen2.5-Omni thinker) at the top, the others in tests/ (test_chunked.py,
test_plumbing.py: checkpoints, resume, torchrun, SIGKILL; test_judge.py, test_data_gen.py, test_tiny_lalm.py,
test_demo.py, test_install.py, ...); the docstring examples run too (`--doctest-modules`). Helpers that several
files use are imported from here (`from conftest import QUESTIONS, rand_case, run_main`). Before anything of ours
is imported, no file of ours may shadow an installed distribution (kernels.py did: transformers 5.25 imports
`kernels`, and every import of transformers failed).
"""
import importlib.metadata
import json
import os
from pathlib import Path

import pytest


def our_import_names(root: Path) -> dict:
    """Every name of ours that `import name` can reach -> the path that provides it.

    The top level is on sys.path (`python cord.py`, pytest's rootdir conftest): its modules and its regular
    packages (folders with __init__.py) are importable by name. pytest also puts tests/ on sys.path (no
    __init__.py there), so the test modules are top-level names too. Folders without __init__.py (docs/) are
    namespace portions: any installed package of that name wins over them, so they shadow nothing.
    """
    names = {}
    for folder in (root, root / "tests"):
        for path in folder.iterdir():
            if path.suffix == ".py":
                names[path.stem] = path
            elif path.is_dir() and (path / "__init__.py").is_file():
                names[path.name] = path
    return names


def shadowed(root: Path) -> dict:
    """Our import names that an installed distribution also provides -> (our path, [distributions])."""
    installed = importlib.metadata.packages_distributions()  # top-level import name -> distributions
    return {name: (path, installed[name]) for name, path in our_import_names(root).items() if name in installed}


_clash = shadowed(Path(__file__).resolve().parent)  # before the imports below: a shadowing file breaks transformers
if _clash:
    raise pytest.UsageError("; ".join(f"{path.name} shadows the import name {name!r} of the installed {', '.join(d)}: "
                                      "rename it" for name, (path, d) in _clash.items()))

import soundfile as sf  # noqa: E402
import torch  # noqa: E402

import cord  # noqa: E402
import data_gen  # noqa: E402

torch.set_num_threads(int(os.environ.get("CORD_TEST_THREADS", 2)))  # 1 when mutmut runs two workers on two cores


def rand_case(B=3, T=7, V=11, seed=0):  # student, teacher logits (B, T, V); mask (B, T) with lengths T, 3, 1
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(B, T, V, generator=g) * 2, torch.randn(B, T, V, generator=g) * 2
    lengths = torch.tensor([T, 3, 1][:B])
    mask = torch.arange(T)[None] < lengths[:, None]
    return s, t, mask


QUESTIONS = [("What is two plus three?", "5"), ("What is seven minus four?", "3"), ("What is six plus one?", "7"),
             ("What is nine minus five?", "4"), ("What is eight plus two?", "10"), ("What is three plus three?", "6")]


@pytest.fixture(scope="session")
def speech_data(tmp_path_factory):
    """A manifest of real TTS speech (hibari, installed from PyPI by CI)."""
    root = tmp_path_factory.mktemp("speech")
    (root / "wavs").mkdir()
    rows = []
    for i, (q, a) in enumerate(QUESTIONS):
        audio, sr = data_gen.synthesize(q, "hibari")
        sf.write(root / f"wavs/q{i}.wav", data_gen.to_16k(audio, sr), 16000, subtype="PCM_16")
        rows.append({"id": f"q{i}", "audio": f"wavs/q{i}.wav", "text": q, "answer": a})
    (root / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "manifest.jsonl"


@pytest.fixture(scope="session")
def qwen2_audio_dir(tmp_path_factory):
    from demo.tiny_lalm import build_model, build_processor

    corpus = [q for q, _ in QUESTIONS] * 10 + [f"The answer is {a}." for _, a in QUESTIONS] * 10
    processor = build_processor(corpus, vocab_size=300)
    model = build_model(processor, d_audio=32, audio_layers=1, d_text=64, text_layers=2, seed=0)
    path = tmp_path_factory.mktemp("qwen2_audio")
    model.save_pretrained(path), processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def omni_dir(tmp_path_factory, qwen2_audio_dir):
    """A tiny Qwen2.5-Omni thinker, saved with tokenizer + feature extractor (no processor: torchvision)."""
    from transformers import (AutoFeatureExtractor, AutoTokenizer, Qwen2_5OmniThinkerConfig,
                              Qwen2_5OmniThinkerForConditionalGeneration)

    tok = AutoTokenizer.from_pretrained(qwen2_audio_dir)
    fe = AutoFeatureExtractor.from_pretrained(qwen2_audio_dir)
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=fe.feature_size, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          d_model=32, output_dim=64, n_window=50, max_source_positions=fe.nb_max_frames // 2),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "default", "mrope_section": [2, 3, 3]}),
        audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"),
        audio_start_token_id=tok.convert_tokens_to_ids("<|audio_bos|>"),
        audio_end_token_id=tok.convert_tokens_to_ids("<|audio_eos|>"),
        vision_start_token_id=tok.pad_token_id, vision_end_token_id=tok.pad_token_id,  # unused: no images
    )
    torch.manual_seed(0)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    path = tmp_path_factory.mktemp("omni")
    model.save_pretrained(path), tok.save_pretrained(path), fe.save_pretrained(path)
    return path


# `python cord.py --model ...` in this process, 2 prompts x 2 rollouts
def run_main(tmp_path, model_dir, manifest, *extra, steps=2):
    argv = ["--model", str(model_dir), "--data", str(manifest), "--output", str(tmp_path / "run"),
            "--steps", str(steps), "--batch_size", "2", "--group_size", "2", "--max_new_tokens", "6", "--lr", "1e-3",
            "--chunk_size", "4", *extra]
    return cord.main(argv)
