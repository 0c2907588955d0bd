"""Correctness of the fast paths (never timing): they must produce what the plain path produces."""
import pytest
import torch
import torch.nn.functional as F

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
    # the early-stopping run also drops finished rows from the batch: other shapes, so float
    # rounding may differ
    assert torch.allclose(lp_fixed[:, :n], lp_early, atol=1e-5) and (lp_fixed[:, n:] == 0).all()
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


def padded_batch(rows=12, seed=0):
    """Prompts of 1-7 tokens and responses of 1-9 tokens, padded to widths well past the longest
    (3 extra prompt columns, 4 extra response columns), the way batches of mixed lengths come."""
    g = torch.Generator().manual_seed(seed)
    prompt, pm = left_pad([torch.randint(4, 40, (int(n),), generator=g).tolist()
                           for n in torch.randint(1, 8, (rows,), generator=g)], pad_id=0)
    prompt, pm = F.pad(prompt, (3, 0)), F.pad(pm, (3, 0))
    lengths = torch.randint(1, 10, (rows,), generator=g)
    rmask = (torch.arange(13)[None] < lengths[:, None]).long()
    return prompt, pm, torch.randint(4, 40, (rows, 13), generator=g) * rmask, rmask


def row_alone(fn, seqs, i):
    """fn on row i of the batch with no padding at all, its (1, N') output padded back to N."""
    prompt, pm, response, rmask = seqs
    P, N = int(pm[i].sum()), int(rmask[i].sum())
    out = fn(prompt[i:i + 1, -P:], pm[i:i + 1, -P:], response[i:i + 1, :N], rmask[i:i + 1, :N])
    return out if out.dim() == 1 else F.pad(out, (0, response.shape[1] - N))


def test_passes_on_trimmed_length_ordered_chunks_equal_the_padded_batch():
    """Log-probs, entropies, critic values and RM scores: the same on the whole padded batch, on
    each row alone (no padding at all), and in chunks of rows taken in length order."""
    import copy

    from minirlhf.generate import in_length_order
    from minirlhf.model import ScalarModel
    from minirlhf.ppo_trainer import critic_values
    model = model_and_prompts()[0]
    scalar = ScalarModel(copy.deepcopy(model)).eval()
    seqs = padded_batch()
    passes = {"logp": lambda *b: sequence_logprobs(model, *b, 0.7),
              "entropy": lambda *b: sequence_logprobs(model, *b, 0.7, with_entropy=True)[1],
              "values": lambda *b: critic_values(scalar, *b), "score": scalar.score}
    for name, fn in passes.items():
        with torch.no_grad():
            padded = fn(*seqs)
            alone = torch.cat([row_alone(fn, seqs, i) for i in range(12)])
            ordered = in_length_order(fn, *seqs, rows=5)
        assert padded.shape == ordered.shape == alone.shape, name
        torch.testing.assert_close(ordered, padded, atol=1e-5, rtol=0, msg=name)
        torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0, msg=name)
        if padded.dim() == 2:  # past every response's end: padding, which reads 0
            assert (padded[:, 9:] == 0).all(), name


def test_in_length_order_gives_each_row_its_own_output_in_the_batch_order():
    from minirlhf.generate import in_length_order
    seqs = padded_batch()
    # an fn that reads only the row's lengths: in the batch's order, whatever chunk they were in
    out = in_length_order(lambda p, pm, r, rm: pm.sum(-1) * 100 + rm.sum(-1), *seqs, rows=5)
    assert torch.equal(out, seqs[1].sum(-1) * 100 + seqs[3].sum(-1))


def test_a_rows_tokens_do_not_depend_on_its_batch_or_on_rows_that_finished():
    """The same prompts sampled as one batch of 12, as two batches of 6 (each told where its rows
    sit), and with different rows finishing early (another EOS, so other rows leave the batch at
    each check): every row gets the same tokens up to where it stops."""
    model = model_and_prompts()[0]
    prompt, pm = padded_batch()[:2]

    def sample(eos, parts):
        out = []
        for first, rows in parts:  # each batch draws from the same seed, as each rank does
            out.append(generate(model, prompt[first:first + rows], pm[first:first + rows], 16,
                                eos_id=eos, pad_id=0, generator=torch.Generator().manual_seed(3),
                                check_every=2, rows=(first, 12)))
        N = max(r.shape[1] for r, _, _ in out)
        return [torch.cat([F.pad(x[i], (0, N - x[i].shape[1])) for x in out])
                for i in range(3)]
    whole, halves = sample(7, [(0, 12)]), sample(7, [(0, 6), (6, 6)])
    assert torch.equal(whole[0], halves[0]) and torch.equal(whole[2], halves[2])
    torch.testing.assert_close(whole[1], halves[1], atol=1e-5, rtol=0)
    never = sample(-1, [(0, 12)])  # no row ever finishes: no row leaves the batch
    mask = whole[2].bool()
    assert whole[2].sum(-1).min() < 8 < whole[2].sum(-1).max()  # rows left the batch, others went on
    assert torch.equal(whole[0][mask], never[0][:, :whole[0].shape[1]][mask])


def test_gradients_through_length_ordered_chunks_equal_the_whole_batch():
    """The RM's training step scores its pairs in length order: the same loss and gradients."""
    import copy

    from minirlhf.generate import in_length_order
    from minirlhf.model import ScalarModel
    from minirlhf.reward import bt_loss
    seqs = padded_batch(rows=12)
    grads = []
    for score in (lambda rm: rm.score(*seqs), lambda rm: in_length_order(rm.score, *seqs, rows=5)):
        rm = ScalarModel(copy.deepcopy(model_and_prompts()[0]))
        bt_loss(*score(rm).chunk(2)).backward()  # rows 0-5 chosen, 6-11 rejected
        grads.append([p.grad for p in rm.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
