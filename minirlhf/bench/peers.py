"""bench.py's peer-comparable modes: exactly the work that the project's peer scripts time (TRL's
PPOTrainer and Hugging Face generate), on random-weight GPT-2s of the same shape, as one JSON line.

`--only=ppo`: one PPO iteration = B random fixed-length prompts, N sampled tokens per row (no
stop), reference / value / reward scoring, GAE and whitening, 4 epochs x 4 minibatches of policy and
value updates; the first iteration is untimed. It also prints the iteration's FLOP count and its
floor: those FLOPs at this machine's measured matmul throughput at the iteration's own shapes.
`--only=generate`: sampling (temperature 1, no top-k) of N tokens per row from the GPT-2 folder and
prompts.pt that `hf_generate.py --save_dir DIR` writes.
"""
import copy
import os
import statistics
import time
from dataclasses import replace

import torch

from ..generate import generate
from ..model import GPT, GPTConfig, ScalarModel
from ..plumbing.checkpoint import load
from ..plumbing.config import PPOConfig
from ..plumbing.runtime import adamw
from ..ppo_trainer import ppo_update, rollout

# what hf_generate.py --save_dir writes beside the weights
PROMPT_FIELDS = ("input_ids", "attention_mask", "pad_id")


def cpu_clocks():
    """(CPU-seconds the whole machine used, this process used, wall seconds): to see other load."""
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal
        v = [int(x) for x in f.readline().split()[1:9]]
    busy = (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    return busy, time.process_time(), time.perf_counter()


def others_cpu_share(start):
    """Share of the machine's cores that other processes used since `start` (0: we had it alone)."""
    (m0, p0, w0), (m1, p1, w1) = start, cpu_clocks()
    return round(max(0.0, (m1 - m0) - (p1 - p0)) / ((w1 - w0) * os.cpu_count()), 2)


def ppo_iteration_flops(L, d, V, B, P, N, epochs=4):
    """FLOPs of TRL's iteration, counted as the work it needs: (block FLOPs, LM-head FLOPs). A
    forward over the B rows costs 24 L d^2 per token in the blocks' matmuls plus causal attention
    (2 L c d at context c); the LM head (2 V d) runs only where a log-prob is read, on the N
    response tokens;
    backward = 2 x forward. Generation is one forward's worth, the reference, value and reward
    scoring three, and each epoch a forward and backward of the policy and of the value model."""
    T = P + N
    blocks = B * T * 24 * L * d * d + B * sum(2 * L * c * d for c in range(1, T + 1))
    head = B * N * 2 * V * d
    return (1 + 3 + 6 * epochs) * blocks, (1 + 1 + 3 * epochs) * head


def matmul_rate(m, k, n, reps=5):
    """Measured FLOP/s of an (m, k) x (k, n) float32 matmul on this machine (best of reps)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def bench_ppo_peer(cfg):
    """One JSON-able dict: seconds per PPO iteration of TRL's work at this shape, and its floor."""
    start = cpu_clocks()
    torch.manual_seed(cfg.seed)
    B, P, N = cfg.batch, cfg.prompt_len, cfg.new_tokens
    gpt = GPTConfig(vocab_size=cfg.vocab, n_positions=max(1024, P + N), n_embd=cfg.n_embd,
                    n_layer=cfg.n_layer, n_head=cfg.n_head)
    policy = GPT(gpt)
    ref = copy.deepcopy(policy).eval()
    critic, rm = ScalarModel(GPT(gpt)), ScalarModel(GPT(gpt)).eval()
    ppo_cfg = replace(PPOConfig(), rollout_batch=B, minibatch=B // 4, ppo_epochs=4,
                      max_new_tokens=N, block_size=P + N, temperature=1.0)
    opt_pi = adamw(policy.parameters(), lr=1e-5, eps=1e-5)
    opt_v = adamw(critic.parameters(), lr=1e-5, eps=1e-5)
    gen = torch.Generator().manual_seed(cfg.seed)
    times = []
    for _ in range(cfg.reps + 1):  # the first iteration is warm-up
        prompt = torch.randint(2, cfg.vocab, (B, P), generator=gen)
        t = time.perf_counter()
        # eos_id -1 is never sampled: every row gets exactly N tokens, as TRL's stop_token=None
        batch, _ = rollout(policy, ref, critic, rm, prompt, torch.ones_like(prompt), -1, 0, ppo_cfg,
                           gen, 0.05)
        ppo_update(policy, critic, opt_pi, opt_v, batch, ppo_cfg, gen)
        times.append(time.perf_counter() - t)
    body, head = ppo_iteration_flops(cfg.n_layer, cfg.n_embd, cfg.vocab, B, P, N)
    rows = B // 4 * (P + N)  # an update minibatch's tokens: the shapes that dominate the iteration
    floor = (body / matmul_rate(rows, cfg.n_embd, 4 * cfg.n_embd)
             + head / matmul_rate(B // 4 * N, cfg.n_embd, cfg.vocab))
    s = statistics.mean(times[1:])
    return {"tool": "minirlhf_ppo", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "s_per_iter": round(s, 3), "iter_times_s": [round(x, 3) for x in times],
            "gflop_per_iter": round((body + head) / 1e9, 1), "floor_s": round(floor, 3),
            "floor_fraction": round(floor / s, 3),
            "config": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                       "vocab": cfg.vocab, "batch": B, "prompt_len": P, "new_tokens": N,
                       "threads": torch.get_num_threads(), "ppo_epochs": 4, "minibatch": B // 4},
            "host": {"cpus": os.cpu_count(), "others_cpu_share": others_cpu_share(start)}}


def bench_generate_peer(cfg):
    """One JSON-able dict: tokens/s sampling N tokens per row from hf_generate.py's saved weights
    and prompts (median of reps calls after one warm-up)."""
    start = cpu_clocks()
    model = GPT.from_pretrained(cfg.weights).eval()
    saved = load(os.path.join(cfg.weights, "prompts.pt"), fields=PROMPT_FIELDS)
    ids, mask = saved["input_ids"], saved["attention_mask"]
    gen = torch.Generator().manual_seed(cfg.seed)
    N = cfg.new_tokens

    def one_call():
        t = time.perf_counter()
        out = generate(model, ids, mask, N, eos_id=-1, pad_id=saved["pad_id"], temperature=1.0,
                       generator=gen, stop_early=False)[0]
        assert out.shape == (ids.shape[0], N)  # exactly N tokens per row
        return time.perf_counter() - t
    one_call()
    times = [one_call() for _ in range(cfg.reps)]
    med = statistics.median(times)
    return {"tool": "minirlhf_generate", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "tokens_per_s": round(ids.shape[0] * N / med, 1), "s_per_call": round(med, 4),
            "times_s": [round(t, 4) for t in times],
            "config": {"batch": ids.shape[0], "prompt_len": ids.shape[1], "new_tokens": N,
                       "threads": torch.get_num_threads(), **{k: getattr(model.cfg, k) for k in
                                                              ("n_layer", "n_embd", "n_head",
                                                               "vocab_size")}},
            "host": {"cpus": os.cpu_count(), "others_cpu_share": others_cpu_share(start)}}
