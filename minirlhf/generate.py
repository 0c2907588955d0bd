"""Batched sampling from left-padded prompts with a preallocated KV cache, and
log-prob recomputation.

Layout used everywhere in minirlhf: a batch is `prompt (B, P)` left-padded with
`prompt_mask (B, P)`, followed by `response (B, N)` right-padded with `response_mask (B, N)` (1 up
to and including the first EOS). The full sequence is `cat([prompt, response], 1)` with mask
`cat([prompt_mask, response_mask], 1)`.
"""
import torch
import torch.nn.functional as F

from .model import KVCache, trimmed


def left_pad(seqs, pad_id, device="cpu"):
    """List of token-id lists -> (ids (B, P), mask (B, P)) left-padded to the longest."""
    P = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), P), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, P - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, P - len(s):] = 1
    return ids.to(device), mask.to(device)


class GraphedDecodeStep:
    """One decode step (B new tokens -> next-token logits (B, V)) captured once as a CUDA graph,
    then replayed: one launch per token instead of a dozen per layer, which is what bounds
    decoding a small model on a GPU. Works because the cache keeps every shape fixed and its
    write position on the device. The eager step stays the reference (tests check them equal).
    Captured anew for each `generate` call (entering capture syncs, collects garbage and empties
    the allocator's cache: milliseconds against a rollout's seconds, and in every timing)."""

    def __init__(self, model, cache, B):
        device = cache.k.device
        self.tok = torch.zeros((B, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((B, 1), dtype=torch.long, device=device)
        # every input the graph reads must outlive it (a freed one's memory gets reused)
        self.ones = torch.ones((B, 1), dtype=torch.long, device=device)
        # weights cast by autocast must be cast inside the graph, not cached outside it
        self.amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                  enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
        start = cache.pos.clone()
        side = torch.cuda.Stream()  # warm up (kernel choice, workspaces) off the capture stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self.amp:
            model(self.tok, self.ones, self.pos, cache=cache)
        torch.cuda.current_stream().wait_stream(side)
        # the warm-up wrote slot `start` with dummy keys: the first replay overwrites it
        cache.pos.copy_(start)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), self.amp:
            self.logits = model(self.tok, self.ones, self.pos, cache=cache)[:, -1]  # (B, V)

    def __call__(self, tok, pos):
        """tok, pos (B, 1) -> logits (B, V), a buffer that the next replay overwrites."""
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(model, prompt, prompt_mask, max_new_tokens, eos_id, pad_id, temperature=1.0,
             greedy=False, stop_early=True, generator=None, check_every=8, rows=None,
             cuda_graph=True):
    """Sample up to `max_new_tokens` per row. Returns (response (B, N), logprobs (B, N),
    response_mask (B, N)).

    logprobs are under the distribution actually sampled from (the model's at `temperature`:
    PPO's ratio needs the policy's own probabilities); 0 on padding. Rows that emitted EOS read
    PAD. With `stop_early`, the loop ends once every row is done, checked only every
    `check_every` steps so that CUDA never waits on the host each token, and at each check the
    rows that finished leave the batch (not under a CUDA graph); `stop_early=False` is the
    fixed-length mode (exactly max_new_tokens steps, no host sync at all). Sampling is by
    inverse CDF with one uniform per row and step. `rows=(first, total)` says this batch is rows
    first.. of a global batch of `total` (data parallel): uniforms are drawn for the whole
    global batch, so a row gets the same tokens however the batch is split across processes. On
    CUDA the decode step is replayed as a CUDA graph unless `cuda_graph=False` (the eager
    reference).
    """
    B, P = prompt.shape
    first, total = rows or (0, B)
    device = prompt.device
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, B, P + max_new_tokens, device, dtype)
    response = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, N)
    logprobs = torch.zeros((B, max_new_tokens), device=device)  # (B, N)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) emitted EOS
    # (B, 1) position id of each row's last prompt token
    pos = prompt_mask.long().sum(-1, keepdim=True) - 1
    h = model(prompt, prompt_mask, (prompt_mask.long().cumsum(-1) - 1).clamp(min=0), cache=cache,
              return_hidden=True)[:, -1]
    logits = model.lm_head(h)  # the head on the last prompt position only: the next token's logits
    graphed = cuda_graph and device.type == "cuda" and max_new_tokens > 1
    step = (GraphedDecodeStep(model, cache, B) if graphed else
            lambda tok, pos: model(tok, torch.ones_like(tok), pos, cache=cache)[:, -1])
    # the rows still decoding (A,): without a graph, whose shapes are fixed, finished rows leave
    # the batch at each check, so the steps after it compute only on rows that still sample
    alive = torch.arange(B, device=device)
    n = max_new_tokens
    for t in range(max_new_tokens):
        logits = logits.float() / temperature  # (A, V)
        logp = F.log_softmax(logits, dim=-1)
        if greedy:
            tok = logits.argmax(-1)
        else:
            # every step draws the whole global batch's uniforms: a row's are the same however
            # the batch is split or compacted
            u = torch.rand(total, generator=generator, device=device)[first + alive, None]  # (A, 1)
            cdf = logp.exp().cumsum(-1)
            # right=True skips zero-probability tokens; the clamp covers a float cdf
            # ending just below 1
            tok = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
        tok = torch.where(done, pad_id, tok)
        response[alive, t] = tok
        logprobs[alive, t] = torch.where(done, 0.0, logp.gather(-1, tok[:, None]).squeeze(-1))
        done = done | (tok == eos_id)
        if stop_early and (t + 1) % check_every == 0:
            if bool(done.all()):
                n = t + 1
                break
            if not graphed and bool(done.any()):
                keep = ~done
                alive, done, tok, pos = alive[keep], done[keep], tok[keep], pos[keep]
                cache.keep(keep)
        if t + 1 < max_new_tokens:
            pos = pos + 1
            logits = step(tok[:, None], pos)
    response, logprobs = response[:, :n], logprobs[:, :n]
    return response, logprobs, response_mask(response, eos_id)


@torch.no_grad()
def sample_responses(model, batcher, prompts, temperature, generator=None):
    """The model's responses to prompt texts (a data.batches.Batcher encodes them), pure sampling
    at `temperature`: each the tuple of token ids it was sampled as, EOS included where it
    finished (tokenizer.Tokenizer.text reads it)."""
    prompt, prompt_mask = batcher.prompts(prompts)
    response, _, mask = generate(model, prompt, prompt_mask, batcher.max_new_tokens,
                                 batcher.tok.eos_id, batcher.tok.pad_id, temperature=temperature,
                                 generator=generator)
    return sampled_responses(response, mask)


def sampled_responses(response, mask):
    """Each row of a sampled batch (B, N) as the tuple of its token ids, EOS included where it
    finished and padding dropped: the form every later stage scores (encode_responses)."""
    return [tuple(r[m.bool()].tolist()) for r, m in zip(response.cpu(), mask.cpu())]


def policy_samples(policy, batcher, prompts, n, temperature, generator):
    """n samples per prompt, drawn in one batch: a list (per prompt) of n responses."""
    flat = sample_responses(policy, batcher, [p for p in prompts for _ in range(n)], temperature,
                            generator)
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def response_mask(response, eos_id):
    """1 for every token up to and including the first EOS; a row without EOS is all real tokens.
    (A PAD the policy sampled mid-response counts as a real token: the mask is about
    EOS, not about PAD.)"""
    is_eos = (response == eos_id).long()
    return ((is_eos.cumsum(-1) - is_eos) == 0).long()  # no EOS strictly before this token


# at most this many fp32 logits at once: one evaluation batch of GPT-2 (256 rows x 128 tokens x
# 50,261) would otherwise hold 6.6 GB of them, and as much again inside logsumexp
MAX_LOGITS = 2 ** 28


def sequence_logprobs(model, prompt, prompt_mask, response, resp_mask, temperature=1.0,
                      with_entropy=False):
    """Log-probs (B, N) of the response tokens with one forward over prompt + response
    (0 on padding). With the same temperature these equal what `generate` returned. Optionally also
    the entropy (B, N)."""
    N = response.shape[1]
    prompt, prompt_mask, response, resp_mask = trimmed(prompt, prompt_mask, response, resp_mask)
    ids = torch.cat([prompt, response], 1)
    mask = torch.cat([prompt_mask, resp_mask], 1)
    P = prompt.shape[1]
    # the LM head only where a log-prob is read: the states that predict each response token
    h = model(ids, mask, return_hidden=True)[:, P - 1:-1]  # (B, N', C), N' <= N
    rows = max(1, MAX_LOGITS // (h.shape[1] * model.cfg.vocab_size))
    parts = [head_logprobs(model.lm_head, h[i:i + rows], response[i:i + rows], temperature,
                           with_entropy) for i in range(0, len(h), rows)]
    # (B, N): the trimmed columns are padding, whose log-prob and entropy read 0
    logp = F.pad(torch.cat([lp for lp, _ in parts]) * resp_mask, (0, N - resp_mask.shape[1]))
    if not with_entropy:
        return logp
    ent = torch.cat([ent for _, ent in parts]) * resp_mask
    return logp, F.pad(ent, (0, N - resp_mask.shape[1]))


def in_length_order(fn, prompt, prompt_mask, response, resp_mask, rows=32):
    """fn(prompt, prompt_mask, response, resp_mask) over chunks of `rows` rows taken in order of
    real length, so that each chunk, trimmed by fn, holds little padding; its outputs (one row
    each: (B,) or (B, ...)) come back in the batch's order, gradients flowing through. A row's
    output does not depend on the rows beside it, so this is fn on the whole batch up to float
    rounding (dropout aside, which draws per chunk; ALGORITHMS.md, "Batch layout")."""
    order = (prompt_mask.sum(-1) + resp_mask.sum(-1)).argsort(stable=True)  # (B,)
    out = torch.cat([fn(prompt[i], prompt_mask[i], response[i], resp_mask[i])
                     for i in order.split(rows)])
    return out[order.argsort()]


def head_logprobs(lm_head, h, response, temperature, with_entropy):
    """Log-probs (B, N) of `response` from the final hidden states h (B, N, C), and the entropy
    (B, N) or None."""
    logits = lm_head(h).float() / temperature  # (B, N, V)
    lse = logits.logsumexp(-1)  # (B, N)
    logp = logits.gather(-1, response[..., None]).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    return logp, lse - (logits.softmax(-1) * logits).sum(-1)  # H = lse - E_p[logit]


@torch.no_grad()
def generate_no_cache(model, prompt, prompt_mask, n):
    """The reference for the KV cache: greedy decoding that reruns the whole sequence every step
    (tests and bench.py check the cached path against it)."""
    ids, mask = prompt, prompt_mask
    for _ in range(n):
        nxt = model(ids, mask)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids[:, prompt.shape[1]:]
