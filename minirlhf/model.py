"""A GPT-2-architecture decoder, small enough to read in one sitting.

Parameter names and shapes follow Hugging Face's GPT-2
(`transformer.h.0.attn.c_attn.weight`, ...), so a GPT-2 checkpoint loads with
`GPT.from_pretrained(folder)`. Two things RLHF needs beyond nanoGPT:
- left padding: every forward takes `attention_mask` (B, T) and `position_ids`
  (B, T) = cumsum(mask) - 1, so a padded row computes exactly what it would compute alone;
- a preallocated KV cache (`KVCache`) that decoding writes into in place, so every decode step
  has the same shapes.
`ScalarModel` puts a Linear(d, 1) head on the backbone: the reward model and the PPO critic.
"""
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .plumbing.checkpoint import atomic_save, load, unreadable


@dataclass
class GPTConfig:
    """The model's shape, under Hugging Face GPT-2's names (the defaults are GPT-2 small's)."""
    vocab_size: int = 50257
    """Rows of the token embedding, tied to the LM head."""
    n_positions: int = 1024
    """Rows of the learned position embedding: the longest sequence."""
    n_embd: int = 768
    """Width of the residual stream (C)."""
    n_layer: int = 12
    """Transformer blocks."""
    n_head: int = 12
    """Attention heads per block; each is n_embd // n_head wide."""
    dropout: float = 0.0
    """On attention weights, residual branches and embeddings; 0 at RL time."""
    layer_norm_epsilon: float = 1e-5
    """LayerNorm's epsilon (GPT-2's 1e-5)."""


class KVCache:
    """Keys and values of every layer for `max_len` positions, allocated once:
    decoding writes in place."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # which cached positions hold real tokens; padding and not-yet-written positions stay False
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        # the next slot to write, kept on the device: a decode step captured as a CUDA graph
        # (generate.py) advances it itself on every replay, with no host sync
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.slots = None  # (T,) the slots the forward in progress fills

    def keep(self, rows):
        """Keep only `rows` (B,) bool of the batch: the rows that still decode."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.key_mask = self.key_mask[rows]

    def write(self, layer, k, v):
        """Store this chunk's keys and values (B, H, T, hd) in `layer`'s slots; return the whole
        buffers (B, H, max_len, hd): attention always sees the same shape."""
        self.k[layer].index_copy_(2, self.slots, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.dropout = cfg.dropout

    def forward(self, x, allowed, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in (q, k, v))  # (B, H, T, hd)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        if cache is not None and T == 1 and x.device.type == "cpu":
            # a CPU decode step, one query per row, written out: PyTorch's CPU flash kernel loops
            # over the B * H tiny problems (sampling 6-8% faster at 4L x 128d, 4-6% at 6L x 384d;
            # on CUDA, where the step is a graph, SDPA stays: written out, the eager step was
            # slower)
            # only the slots written so far (L): the rest hold no key yet
            L = int(cache.slots[-1]) + 1
            k, v = k[:, :, :L], v[:, :, :L]
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, H, 1, L)
            y = att.masked_fill(~allowed[..., :L], float("-inf")).softmax(-1) @ v  # (B, H, 1, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, allowed, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), allowed, cache, layer)
        return x + self.mlp(self.ln_2(x))


def attention_allowed(key_mask, q_pos):
    """Which keys each query may see: real keys at or before the query's slot,
    plus the query itself.

    key_mask (B, Tk) bool, q_pos (Tq,) slot index of each query. Returns (B, 1, Tq, Tk) bool. The
    diagonal is always allowed so that a padding query (no real key before it) stays finite instead
    of softmax-ing over nothing.
    """
    k_pos = torch.arange(key_mask.shape[1], device=key_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (Tq, Tk)
    own = k_pos[None, :] == q_pos[:, None]
    return ((key_mask[:, None, :] & causal[None]) | own[None])[:, None]


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.n_positions, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_dropout(self, p):
        """Dropout must be off in every RL-time model (it would make the PPO ratio != 1
        before any update)."""
        self.cfg.dropout = p
        for m in self.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            if isinstance(m, Attention):
                m.dropout = p

    def forward(self, idx, attention_mask=None, position_ids=None, cache=None, return_hidden=False):
        """idx (B, T) token ids; attention_mask (B, T) 1 for real tokens, 0 for left padding;
        position_ids (B, T), by default cumsum(mask) - 1; cache: a KVCache to extend by these T
        positions. Returns logits (B, T, V), or the final hidden states (B, T, C) with
        return_hidden=True."""
        T = idx.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if cache is None:
            allowed = attention_allowed(attention_mask.bool(), torch.arange(T, device=idx.device))
        else:
            cache.slots = cache.pos + torch.arange(T, device=idx.device)  # (T,)
            cache.key_mask.index_copy_(1, cache.slots, attention_mask.bool())
            allowed = attention_allowed(cache.key_mask, cache.slots)
        x = self.transformer.drop(self.transformer.wte(idx)
                                  + self.transformer.wpe(position_ids))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, allowed, cache, i)
        if cache is not None:
            cache.pos += T  # in place: a captured step replays this too
        x = self.transformer.ln_f(x)
        return x if return_hidden else self.lm_head(x)

    @torch.no_grad()
    def resize_vocab(self, n):
        """Grow the (tied) token embedding to n rows, keeping the existing ones: a pretrained
        GPT-2 gets rows for the special tokens minirlhf appends after its 50257 (PAD, BOS, EOS,
        UNK), initialised like fresh embeddings."""
        old = self.transformer.wte.weight
        wte = nn.Embedding(n, old.shape[1]).to(old.device, old.dtype)
        nn.init.normal_(wte.weight, mean=0.0, std=0.02)
        wte.weight[:old.shape[0]] = old
        self.transformer.wte, self.lm_head.weight = wte, wte.weight
        self.cfg.vocab_size = n
        return self

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # ---- Hugging Face GPT-2 layout ---------------------------------------------------------------
    # HF stores these four as Conv1D weights, shaped (in, out): transpose them
    # to and from nn.Linear.
    _CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def save_pretrained(self, folder, weights="bin", token_ids=None):
        """Write `config.json` and the weights in Hugging Face's GPT-2 layout: `pytorch_model.bin`,
        or with weights="safetensors" `model.safetensors` (needs the optional safetensors).
        `token_ids` ({bos,eos,pad}_token_id) are the tokenizer's, which the model does not know:
        without them they are None (transformers' GPT-2 default, 50256, is outside a small
        vocabulary and warns)."""
        os.makedirs(folder, exist_ok=True)
        hf_cfg = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"],
                      activation_function="gelu_new", n_ctx=self.cfg.n_positions,
                      **{k: v for k, v in asdict(self.cfg).items() if k != "dropout"},
                      resid_pdrop=self.cfg.dropout, embd_pdrop=self.cfg.dropout,
                      attn_pdrop=self.cfg.dropout, tie_word_embeddings=True,
                      **(token_ids or dict(bos_token_id=None, eos_token_id=None)))
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        sd = {k: (v.t() if k.endswith(self._CONV1D) else v).contiguous()
              for k, v in self.state_dict().items()}
        if weights == "safetensors":
            from safetensors.torch import save_file  # optional dependency, only for this format
            del sd["lm_head.weight"]  # tied to wte (config.json says so): stored once
            save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        else:
            atomic_save(sd, os.path.join(folder, "pytorch_model.bin"))

    @classmethod
    def from_pretrained(cls, folder, dropout=0.0):
        """Load a local Hugging Face GPT-2 folder (config.json + pytorch_model.bin or
        model.safetensors)."""
        with open(os.path.join(folder, "config.json")) as f:
            hf_cfg = json.load(f)
        names = {f.name for f in fields(GPTConfig)}
        cfg = GPTConfig(**{k: v for k, v in hf_cfg.items() if k in names and k != "dropout"},
                        dropout=dropout)
        st_path, bin_path = (os.path.join(folder, "model.safetensors"),
                             os.path.join(folder, "pytorch_model.bin"))
        if os.path.exists(bin_path):
            sd = load(bin_path)
        elif os.path.exists(st_path):
            try:
                from safetensors.torch import load_file  # optional dependency, only for this format
            except ImportError:
                raise OSError(f"{st_path}: reading it needs the optional package safetensors "
                              "(pip install safetensors)") from None
            try:
                sd = load_file(st_path)
            except Exception as e:  # safetensors raises its own error types
                raise unreadable(st_path, e) from None
        else:
            raise FileNotFoundError(f"{folder}: neither pytorch_model.bin nor model.safetensors")
        model = cls(cfg)
        ours = model.state_dict()
        loaded = {}
        for k, v in sd.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # HF's causal-mask buffers, not parameters
            # GPT2Model has no prefix
            key = k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k
            if key not in ours:
                raise ValueError(f"{folder}: unexpected tensor {k!r}")
            v = v.t() if key.endswith(cls._CONV1D) else v
            if v.shape != ours[key].shape:
                raise ValueError(f"{folder}: {k!r} has shape {tuple(v.shape)}, "
                                 f"config needs {tuple(ours[key].shape)}")
            loaded[key] = v
        loaded.setdefault("lm_head.weight", loaded["transformer.wte.weight"])
        missing = set(ours) - set(loaded)
        if missing:
            raise ValueError(f"{folder}: missing tensors {sorted(missing)[:5]}")
        model.load_state_dict(loaded)
        return model


class ScalarModel(nn.Module):
    """Backbone + Linear(d, 1): one scalar per position. Reward model and critic."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        d = gpt.cfg.n_embd
        self.head = nn.Linear(d, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(d + 1))  # ALGORITHMS.md §5.1
        nn.init.zeros_(self.head.bias)

    def forward(self, idx, attention_mask=None, return_hidden=False):
        h = self.gpt(idx, attention_mask, return_hidden=True)  # (B, T, C)
        values = self.head(h).squeeze(-1)  # (B, T)
        return (values, h) if return_hidden else values

    def score(self, prompt, prompt_mask, response, resp_mask, return_hidden=False):
        """r(x, y) (B,) read at the last real token of prompt + response: see `score_with`."""
        return score_with(self, prompt, prompt_mask, response, resp_mask, return_hidden)

    @property
    def members(self):
        """The RMs behind this score (an Ensemble has several): the critic starts from the first."""
        return [self]


def score_with(forward, prompt, prompt_mask, response, resp_mask, return_hidden=False):
    """r(x, y) (B,) of a ScalarModel's `forward` read at the last real token of prompt + response
    (the EOS of a finished response). With return_hidden, also that token's final hidden state
    (B, C), the feature the head reads. (MetaRM's second-order step passes a functional forward at
    shifted weights.)"""
    prompt, prompt_mask, response, resp_mask = trimmed(prompt, prompt_mask, response, resp_mask)
    ids = torch.cat([prompt, response], 1)
    mask = torch.cat([prompt_mask, resp_mask], 1)
    values, hidden = forward(ids, mask, return_hidden=True)  # (B, T), (B, T, C)
    idx = last_token_index(mask)
    rows = torch.arange(ids.shape[0], device=ids.device)
    return (values[rows, idx], hidden[rows, idx]) if return_hidden else values[rows, idx]


def trimmed(prompt, prompt_mask, response, resp_mask):
    """A batch without the columns where no row has a real token: the left-padded prompt's first
    ones and the right-padded response's last ones. Positions come from the mask, so every row
    computes what it computed in the wider batch, on fewer columns."""
    P = int(prompt_mask.any(0).long().argmax())  # the first column holding a real token
    N = max(1, int(resp_mask.sum(-1).max()))  # a response's real tokens come first
    return prompt[:, P:], prompt_mask[:, P:], response[:, :N], resp_mask[:, :N]


def last_token_index(mask):
    """Index of the last 1 in each row of mask (B, T): works for left, right and
    both-sided padding."""
    T = mask.shape[1]
    return T - 1 - mask.long().flip(-1).argmax(-1)


def save_model(path, model, **meta):
    """A GPT or ScalarModel with the GPTConfig needed to rebuild it (plain dicts:
    weights_only-loadable)."""
    gpt = getattr(model, "gpt", model)
    atomic_save({"model": model.state_dict(), "gpt_config": asdict(gpt.cfg), **meta}, path)


def load_model(path, scalar=False, expect=None):
    """Rebuild the GPT (or ScalarModel with scalar=True) saved by save_model; a
    mismatch names the file."""
    ck = load(path, expect, fields=("model", "gpt_config"))
    try:
        gpt = GPT(GPTConfig(**ck["gpt_config"]))
        model = ScalarModel(gpt) if scalar else gpt
        model.load_state_dict(ck["model"])
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: checkpoint does not match its model config: "
                         f"{str(e).splitlines()[0]}") from None
    return model, ck
