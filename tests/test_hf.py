"""Hugging Face models end to end (built from configs, random weights: nothing is downloaded):
compress -> distill -> export -> load into a fresh skeleton -> generate(), greedy decoding token
for token equal to the frozen model's; tied embeddings stay one packed weight. Loading into a
function that builds the model equals an ordinary skeleton; a meta skeleton refuses to run."""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration,
                          WhisperConfig, WhisperForConditionalGeneration)
from transformers.utils import logging as hf_logging

import torchzip as tz

hf_logging.set_verbosity_error()  # generation-config chatter


def bert():  # all-MiniLM-L6-v2's architecture, small
    return BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, max_position_embeddings=64)).eval()


def gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                                      eos_token_id=1)).eval()


def llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True, bos_token_id=0,
                                        eos_token_id=1, max_position_embeddings=64)).eval()


def t5():
    return T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()


def whisper():
    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=32, max_target_positions=32,
        pad_token_id=0, bos_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()


def ties(model) -> list[list[str]]:
    held: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        held.setdefault(id(p), []).append(name.rsplit(".", 1)[0])
    return sorted(names for names in held.values() if len(names) > 1)


def packed_ties(model) -> list[list[str]]:
    held: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(getattr(m, "packed", None), tz.PackedWeight):
            held.setdefault(id(m.packed), []).append(name)
    return sorted(names for names in held.values() if len(names) > 1)


def generate(model, **inputs):
    return model.generate(**inputs, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_causal_lm_compress_distill_export_load_generate(make, tmp_path):
    teacher = make()
    tied = ties(teacher)
    assert tied  # wte/lm_head, embed_tokens/lm_head
    recipe = tz.Recipe([tz.Codebook(bits=4), tz.Distill(alpha=1.0, temperature=2.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = tz.compress(teacher, recipe, progress=False)
    ids = torch.randint(2, 128, (8, 12))
    history = tz.finetune(student, [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}], epochs=1, lr=1e-3,
                          callbacks=recipe.callbacks(student, teacher=teacher), progress=False)
    assert history[0]["steps"] == 2
    frozen = tz.freeze(student)
    assert packed_ties(frozen) == tied  # the tie is one packed weight
    prompt = torch.randint(2, 128, (2, 5))
    expected = generate(frozen, input_ids=prompt)
    size = tz.export(frozen, tmp_path / "lm.tzip", progress=False)
    loaded = tz.load(tmp_path / "lm.tzip", make(), progress=False)
    assert packed_ties(loaded) == tied
    assert torch.equal(generate(loaded, input_ids=prompt), expected)
    fp32 = sum(t.numel() * 4 for t in {id(p): p for p in teacher.parameters()}.values())
    assert fp32 / size > 4.5  # the shared matrix is stored once


@pytest.mark.parametrize("make,inputs", [(t5, lambda: {"input_ids": torch.randint(2, 128, (2, 7))}),
                                         (whisper, lambda: {"input_features": torch.randn(2, 16, 64)})],
                         ids=["t5", "whisper"])
def test_encoder_decoder_ties_survive_the_round_trip(make, inputs, tmp_path):
    model = make()
    frozen = tz.freeze(tz.compress(model, [tz.Quantize()], progress=False))
    assert packed_ties(frozen) == ties(model)  # T5: four modules share one matrix
    x = inputs()
    expected = generate(frozen, **x)
    size = tz.export(frozen, tmp_path / "m.tzip", progress=False)
    loaded = tz.load(tmp_path / "m.tzip", make(), progress=False)
    assert packed_ties(loaded) == ties(model) and torch.equal(generate(loaded, **x), expected)
    fp32 = sum(t.numel() * 4 for t in model.state_dict().values())
    assert fp32 / size > 3.5


def test_bf16_causal_lm_round_trip_and_cast(tmp_path):
    model = gpt2().to(torch.bfloat16)
    frozen = tz.freeze(tz.compress(model, [tz.Quantize()], progress=False))
    prompt = torch.randint(2, 128, (2, 5))
    expected = generate(frozen, input_ids=prompt)
    tz.export(frozen, tmp_path / "bf16.tzip", progress=False)
    manifest, _ = tz.read_manifest(tmp_path / "bf16.tzip")
    assert {e["tensors"]["scales"]["dtype"] for e in manifest["layers"] if "scales" in e["tensors"]} == {"bfloat16"}
    loaded = tz.load(tmp_path / "bf16.tzip", gpt2().to(torch.bfloat16), progress=False)
    assert torch.equal(generate(loaded, input_ids=prompt), expected)
    # A model frozen in fp32 runs in bf16 after .to(): packed tensors stay packed.
    fp32 = tz.freeze(tz.compress(gpt2(), [tz.Quantize()], progress=False)).to(torch.bfloat16)
    out = fp32(input_ids=prompt).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert os.path.getsize(tmp_path / "bf16.tzip") > 0


@pytest.mark.parametrize("make,left", [(bert, "embeddings.position_ids, embeddings.token_type_ids"),
                                       (llama, "model.rotary_emb.inv_freq, model.rotary_emb.original_inv_freq")],
                         ids=["bert", "llama"])
def test_load_into_a_build_function_equals_an_ordinary_skeleton_and_a_meta_one_refuses_to_run(make, left, tmp_path):
    # Their non-persistent buffers (position ids, token type ids, rotary tables) are in no state_dict.
    path = tmp_path / "m.tzip"
    tz.export(tz.compress(make(), [tz.Quantize()], progress=False), path, progress=False)
    ordinary = tz.load(path, make(), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left on meta
        built = tz.load(path, make, progress=False)
    assert packed_ties(built) == packed_ties(ordinary)
    assert [(n, b.dtype) for n, b in built.named_buffers()] == [(n, b.dtype) for n, b in ordinary.named_buffers()]
    assert all(torch.equal(a, b) for a, b in zip(built.buffers(), ordinary.buffers()))
    ids = torch.randint(2, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(built(input_ids=ids)[0], ordinary(input_ids=ids)[0])  # last_hidden_state / logits
    if make is llama:
        assert torch.equal(generate(built, input_ids=ids[:, :5]), generate(ordinary, input_ids=ids[:, :5]))
    with torch.device("meta"):
        skeleton = make()
    with pytest.warns(UserWarning, match=re.escape(f"2 tensor(s) of the skeleton are not in the file and stay on the meta "
                                                   f"device ({left})")):
        lazy = tz.load(path, skeleton, progress=False)
    with pytest.raises(tz.MetaTensorError, match=re.escape(left)), torch.no_grad():
        lazy(input_ids=ids)  # BERT computed NaN here: F.embedding of meta position ids reads uninitialised memory
