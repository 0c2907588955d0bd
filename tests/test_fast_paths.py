"""Correctness of the fast paths (never timing): they must produce what the plain path produces."""
import pytest
import torch

from minirlhf.bench.table import hf_model
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

    def run(eos_id, stop_early):
        return generate(model, prompt, pm, 28, eos_id=eos_id, pad_id=0, stop_early=stop_early, check_every=2,
                        generator=torch.Generator().manual_seed(0))
    # as EOS, a token every row samples: then every row ends and the loop must stop early
    eos = min(set.intersection(*(set(row) for row in run(-1, False)[0].tolist())))
    (fixed, lp_fixed, m_fixed), (early, lp_early, m_early) = run(eos, False), run(eos, True)
    n = early.shape[1]
    assert n < 28 and (early == eos).any(1).all()
    assert torch.equal(fixed[:, :n], early) and (fixed[:, n:] == 0).all()
    assert torch.equal(lp_fixed[:, :n], lp_early) and (lp_fixed[:, n:] == 0).all()
    assert torch.equal(m_fixed[:, :n], m_early) and (m_fixed[:, n:] == 0).all()


def test_bf16_autocast_path_runs_on_cpu():
    model, prompt, pm = model_and_prompts()
    T = 0.1  # sharp enough that the log-probs differ by far more than bf16's error
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, logp, rmask = generate(model, prompt, pm, 8, eos_id=3, pad_id=0, temperature=T,
                                  generator=torch.Generator().manual_seed(0))
        again = sequence_logprobs(model, prompt, pm, r, rmask, T)
    exact = sequence_logprobs(model, prompt, pm, r, rmask, T)  # fp32, the same tokens
    assert exact[rmask.bool()].std() > 0.5
    # bf16 matmuls: close to fp32, not bit-equal (0.012 at most when this was written)
    assert (logp * rmask - exact).abs().max() < 0.05 and (again - exact).abs().max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graph_decode_equals_eager_decode(amp):
    model, prompt, pm = model_and_prompts()
    # many rows: a graph input freed too early shows once eager tensors reuse its memory
    model, prompt, pm = model.cuda(), prompt.repeat(86, 1).cuda(), pm.repeat(86, 1).cuda()
    out = {}
    for graph in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            greedy = generate(model, prompt, pm, 12, eos_id=-1, pad_id=0, greedy=True,
                              stop_early=False, cuda_graph=graph)[0]
            sampled = generate(model, prompt, pm, 12, eos_id=3, pad_id=0, cuda_graph=graph,
                               generator=torch.Generator("cuda").manual_seed(0))
        out[graph] = greedy, sampled
    assert torch.equal(out[True][0], out[False][0])
    (r1, lp1, m1), (r0, lp0, m0) = out[True][1], out[False][1]
    assert torch.equal(r1, r0) and torch.equal(m1, m0)
    torch.testing.assert_close(lp1, lp0, atol=1e-5, rtol=0)


def test_hugging_face_generate_agrees_when_installed():
    pytest.importorskip("transformers")
    model, prompt, pm = model_and_prompts()
    hf = hf_model(model)
    with torch.no_grad():
        theirs = hf.generate(input_ids=prompt, attention_mask=pm, max_new_tokens=10, min_new_tokens=10,
                             do_sample=False, pad_token_id=0, eos_token_id=None)[:, prompt.shape[1]:]
    assert torch.equal(theirs, generate(model, prompt, pm, 10, eos_id=-1, pad_id=0, greedy=True,
                                        stop_early=False)[0])


def test_logprobs_with_the_head_on_response_positions_only_equal_the_full_logits_path():
    model, prompt, pm = model_and_prompts()
    response = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0], [8, 9, 10, 11]])
    rmask = (response != 0).long()
    logp, entropy = sequence_logprobs(model, prompt, pm, response, rmask, temperature=0.7, with_entropy=True)
    # the plain path: logits at every position, a full log-softmax, then the response's slice
    full = torch.log_softmax(model(torch.cat([prompt, response], 1), torch.cat([pm, rmask], 1)) / 0.7, -1)
    full = full[:, prompt.shape[1] - 1:-1]
    plain = full.gather(-1, response[..., None]).squeeze(-1) * rmask
    assert torch.allclose(logp, plain, atol=1e-5, rtol=0)
    assert torch.allclose(entropy, -(full.exp() * full).sum(-1) * rmask, atol=1e-5, rtol=0)
    assert torch.equal(logp, sequence_logprobs(model, prompt, pm, response, rmask, 0.7))  # one formula


def test_logprobs_in_row_chunks_equal_one_chunk(monkeypatch):
    import minirlhf.generate as gen
    model, prompt, pm = model_and_prompts()
    response = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0], [8, 9, 10, 11]])
    rmask = (response != 0).long()
    whole = sequence_logprobs(model, prompt, pm, response, rmask, 0.7, with_entropy=True)
    # room for the logits of one row at a time: three chunks
    monkeypatch.setattr(gen, "MAX_LOGITS", response.shape[1] * model.cfg.vocab_size)
    chunked = sequence_logprobs(model, prompt, pm, response, rmask, 0.7, with_entropy=True)
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_one_ppo_update_with_fused_adamw_equals_the_per_tensor_loop():
    import copy
    from dataclasses import replace

    from minirlhf.model import ScalarModel
    from minirlhf.plumbing.config import PPOConfig
    from minirlhf.plumbing.runtime import adamw
    from minirlhf.ppo_trainer import ppo_update, rollout
    model, prompt, pm = model_and_prompts()
    cfg = replace(PPOConfig(), rollout_batch=3, minibatch=2, ppo_epochs=2, max_new_tokens=6)
    critic, rm = ScalarModel(copy.deepcopy(model)), ScalarModel(copy.deepcopy(model)).eval()
    batch, _ = rollout(model, model, critic, rm, prompt, pm, 3, 0, cfg, torch.Generator().manual_seed(0), 0.05)
    results = []
    for make in (adamw, lambda params, **kw: torch.optim.AdamW(params, fused=False, foreach=False, **kw)):
        policy, value = copy.deepcopy(model), copy.deepcopy(critic)
        opts = make(policy.parameters(), lr=1e-3, eps=1e-5), make(value.parameters(), lr=1e-3, eps=1e-5)
        ppo_update(policy, value, *opts, batch, cfg, torch.Generator().manual_seed(1))
        results.append([p.detach() for p in [*policy.parameters(), *value.parameters()]])
    assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(*results))
    assert any(not torch.equal(a, b) for a, b in zip(results[0], [p for p in [*model.parameters(),
                                                                             *critic.parameters()]]))
