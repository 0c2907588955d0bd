"""Correctness of the fast paths (never timing): they must produce what the plain path produces."""
import pytest
import torch

from minirlhf.benchmark import hf_model
from minirlhf.generate import generate, generate_no_cache, left_pad, sequence_logprobs
from minirlhf.model import GPT, GPTConfig


def model_and_prompts():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    prompt, pm = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_id=0)
    return model, prompt, pm


def test_static_cache_greedy_equals_no_cache_greedy():
    model, prompt, pm = model_and_prompts()
    ours = generate(model, prompt, pm, 12, eos_id=-1, pad_id=0, greedy=True, stop_early=False)[0]
    assert torch.equal(ours, generate_no_cache(model, prompt, pm, 12))


def test_early_stop_equals_fixed_length_up_to_eos():
    model, prompt, pm = model_and_prompts()
    fixed = generate(model, prompt, pm, 16, eos_id=3, pad_id=0, greedy=True, stop_early=False)[0]
    early = generate(model, prompt, pm, 16, eos_id=3, pad_id=0, greedy=True, stop_early=True, check_every=2)[0]
    assert torch.equal(fixed[:, :early.shape[1]], early) and (fixed[:, early.shape[1]:] == 0).all()


def test_bf16_autocast_path_runs_on_cpu():
    model, prompt, pm = model_and_prompts()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, logp, rmask = generate(model, prompt, pm, 8, eos_id=3, pad_id=0, generator=torch.Generator().manual_seed(0))
        again = sequence_logprobs(model, prompt, pm, r, rmask)
    assert torch.isfinite(again).all()
    assert (again - logp * rmask).abs().max() < 0.1  # bf16 matmuls: close, not bit-equal


def test_hugging_face_generate_agrees_when_installed():
    pytest.importorskip("transformers")
    model, prompt, pm = model_and_prompts()
    hf = hf_model(model)
    with torch.no_grad():
        theirs = hf.generate(input_ids=prompt, attention_mask=pm, max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, pad_token_id=0, eos_token_id=None)[:, prompt.shape[1]:]
    assert torch.equal(theirs, generate(model, prompt, pm, 10, eos_id=-1, pad_id=0, greedy=True,
                                        stop_early=False)[0])
