"""Benchmarks: generation, a PPO iteration, SFT/RM training throughput and MFU,
peak memory (bench.py).

Every ratio is measured within one run (ours vs a baseline on the same machine, same weights).
Greedy outputs of every generation path are checked equal before any timing is reported. The Hugging
Face row appears when `transformers` is installed (it is not a dependency).
"""
import random
import resource
import tempfile
import time

import torch
import torch.nn.functional as F

from ..data.batches import encode_prompts
from ..data.tasks import get_task
from ..generate import generate, generate_no_cache, left_pad, sequence_logprobs
from ..model import GPT, GPTConfig, ScalarModel
from ..plumbing.runtime import adamw
from ..ppo_trainer import ppo_update, rollout

SIZES = {"default": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=64, n_positions=64),
         "gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)}
# (batch, prompt length, new tokens) per size: GPT-2-small is cut down so the CPU bench
# stays within minutes
GEN_SHAPE = {"default": (64, 8, 40), "gpt2-small": (16, 16, 24)}
GEN_SHAPE_CUDA = {"default": (256, 8, 40), "gpt2-small": (64, 32, 128)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=3):
    """Best wall time of `repeat` calls after one warm-up call
    (best-of filters a shared machine's noise)."""
    return interleaved({"f": fn}, device, repeat)["f"]


def interleaved(fns, device, repeat):
    """Best wall time of each function, calling them in turn (a, b, a, b, ...) so that a slow
    spell of a shared machine hits every candidate alike: the ratios stay honest even when
    absolute times drift."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeat):
        for k, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def hf_model(model):
    """The very same weights (and dtype) in transformers' GPT2LMHeadModel, or None without
    transformers."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        p = next(model.parameters())
        return GPT2LMHeadModel.from_pretrained(d).to(p.device, p.dtype).eval()


def bench_generation(name, model, device):
    """First every path is checked against the plain one; then timed: on CPU greedy decoding in
    fp32; on CUDA sampling (temperature 1, top-k 0) in bf16, the CUDA-graph decode beside the eager
    one, each against HF generate on the same weights."""
    B, P, N = (GEN_SHAPE if device.type == "cpu" else GEN_SHAPE_CUDA)[name]
    g = torch.Generator().manual_seed(0)
    rows = [[int(t) for t in torch.randint(4, model.cfg.vocab_size, (P - (i % 4),), generator=g)]
            for i in range(B)]
    prompt, pm = left_pad(rows, pad_id=0, device=device)
    eos = 2  # random weights rarely emit it: every path generates all N tokens
    hf = hf_model(model)

    def ours():
        return generate(model, prompt, pm, N, eos, 0, greedy=True, stop_early=False)[0]

    def hf_generate(sample=False):
        with torch.no_grad():
            return hf.generate(input_ids=prompt, attention_mask=pm, max_new_tokens=N,
                               min_new_tokens=N, do_sample=sample, top_k=0 if sample else None,
                               pad_token_id=0, eos_token_id=None)[:, P:]
    if device.type == "cpu":
        check_greedy_equal(model, hf, prompt, pm, N, ours, hf_generate)
        fns = {"ours (static KV cache)": ours,
               "no cache": lambda: generate_no_cache(model, prompt, pm, N)}
        if hf is not None:
            fns["HF generate"] = hf_generate
    else:
        check_logprobs_close(model, hf, prompt, pm, N)
        model.to(torch.bfloat16)
        gen = torch.Generator(device).manual_seed(0)
        fns = {"ours (static KV cache)": lambda: generate(model, prompt, pm, N, eos, 0,
                                                          stop_early=False, generator=gen),
               "ours, eager decode": lambda: generate(model, prompt, pm, N, eos, 0,
                                                      stop_early=False, generator=gen,
                                                      cuda_graph=False)}
        if hf is not None:
            hf.to(torch.bfloat16)
            fns["HF generate"] = lambda: hf_generate(sample=True)
    results = interleaved(fns, device, repeat=5 if name == "default" or device.type == "cuda"
                          else 1)
    out = []
    for k, t in results.items():
        out.append({"size": name, "generator": k, "mode": "greedy fp32" if device.type == "cpu"
                    else "sampling bf16", "batch": B, "new_tokens": N, "tokens/s": B * N / t,
                    "ours_speedup": t / results["ours (static KV cache)"]})
    return out


def check_greedy_equal(model, hf, prompt, pm, N, ours, hf_generate):
    """CPU: the cached, uncached and HF greedy outputs are the same tokens."""
    reference = ours()
    assert torch.equal(generate_no_cache(model, prompt, pm, N).masked_fill(
        (reference == 0), 0), reference), "cache and no-cache greedy outputs differ"
    if hf is not None:
        assert torch.equal(hf_generate(), generate(model, prompt, pm, N, -1, 0, greedy=True,
                                                   stop_early=False)[0]), \
            "HF greedy output differs from ours"


@torch.no_grad()
def check_logprobs_close(model, hf, prompt, pm, N, tol=1e-4):
    """CUDA (fp32): the log-probs that the CUDA-graph and the eager decode return for their tokens
    match one uncached forward, and HF's forward, along the same tokens. (Greedy tokens are not
    compared with the uncached path or HF: their kernels differ with the key length and sum in
    another order, which on a random model's near-flat logits can flip a near-tie. The graph
    replays the eager step's kernels, so tests/test_fast_paths.py compares those two exactly.)"""
    for graph in (True, False):
        resp, logp, mask = generate(model, prompt, pm, N, -1, 0, greedy=True, stop_early=False,
                                    cuda_graph=graph)
        err = (sequence_logprobs(model, prompt, pm, resp, mask) - logp).abs().max().item()
        assert err < tol, f"decode (cuda_graph={graph}) and uncached log-probs differ by {err:.2g}"
    if hf is not None:
        ids, full = torch.cat([prompt, resp], 1), torch.cat([pm, mask], 1)
        positions = (full.cumsum(-1) - 1).clamp(min=0)
        logits = hf(input_ids=ids, attention_mask=full, position_ids=positions).logits
        logits = logits[:, prompt.shape[1] - 1:-1]  # (B, N, V): the states predicting resp
        theirs = logits.float().log_softmax(-1).gather(-1, resp[..., None]).squeeze(-1)
        err = (theirs - logp).abs().max().item()
        assert err < tol, f"HF and our log-probs differ by {err:.2g}"


def peak_flops(device):
    """Measured peak: a large matmul in the training dtype (fp32 on CPU, bf16 on CUDA)."""
    n = 2048 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype),
            torch.randn(n, n, device=device, dtype=dtype))
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeat=5)


def bench_training(name, spec, device, peak):
    """SFT and RM steps on random tokens at this size: tokens/s and MFU.
    FLOPs per token (forward + backward):
    6 x (non-embedding parameters) + 12 L T d for attention, + 6 V d for the LM head
    (SFT only: the RM never computes it). Embedding lookups cost no FLOPs."""
    B, T = (32, 64) if name == "default" else ((4, 128) if device.type == "cpu" else (16, 1024))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**spec)).to(device)
    n_params = sum(p.numel() for p in model.transformer.h.parameters())
    flops_per_token = 6 * n_params + 12 * spec["n_layer"] * T * spec["n_embd"]
    ids = torch.randint(4, spec["vocab_size"], (B, T), device=device)
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else torch.autocast("cpu", enabled=False))
    out = []
    for kind, net in (("SFT", model), ("RM", ScalarModel(model).to(device))):
        opt = adamw(net.parameters(), lr=1e-4)

        def step():
            with amp:
                if kind == "SFT":
                    logits = net(ids[:, :-1])
                    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                           ids[:, 1:].reshape(-1))
                else:
                    loss = net(ids)[:, -1].float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t = timed(step, device, repeat=2)
        tps = B * T / t
        head = 6 * spec["vocab_size"] * spec["n_embd"] if kind == "SFT" else 0
        out.append({"size": name, "stage": kind, "batch x T": f"{B}x{T}", "tokens/s": tps,
                    "MFU": (flops_per_token + head) * tps / peak})
    return out


def bench_ppo(device, cfg):
    """One PPO iteration of the default-size model at the preset's PPO shapes (random weights,
    the task's vocabulary and prompts), split into its parts."""
    task = get_task(cfg.task)
    tok = task.tokenizer
    torch.manual_seed(0)
    sft = GPT(GPTConfig(**{**SIZES["default"], "vocab_size": tok.vocab_size})).to(device).eval()
    policy, rm = GPT(sft.cfg).to(device), ScalarModel(sft).to(device).eval()
    policy.load_state_dict(sft.state_dict())
    critic = ScalarModel(GPT(sft.cfg)).to(device)
    opt_pi, opt_v = (adamw(policy.parameters(), lr=1e-5),
                     adamw(critic.parameters(), lr=1e-5))
    prompts = task.sample_prompts(cfg.rollout_batch, random.Random(0), "unlabelled")
    p, pm = encode_prompts(tok, prompts, device)
    gen = torch.Generator(device).manual_seed(0)
    t_gen = timed(lambda: generate(policy, p, pm, cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                                   generator=gen), device)
    roll = (policy, sft, critic, rm, p, pm, tok.eos_id, tok.pad_id, cfg, gen, 0.01)
    t_roll = timed(lambda: rollout(*roll), device)
    batch, _ = rollout(*roll)
    t_upd = timed(lambda: ppo_update(policy, critic, opt_pi, opt_v, batch, cfg, gen), device,
                  repeat=1)
    return [{"part": "rollout: generation", "seconds": t_gen},
            {"part": "rollout: policy+reference log-probs, values, reward",
             "seconds": t_roll - t_gen},
            {"part": f"update ({cfg.ppo_epochs} epochs x "
                     f"{cfg.rollout_batch // cfg.minibatch} minibatches)",
             "seconds": t_upd}]


def peak_memory(device):
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (CUDA, max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process max RSS)"
