"""Text <-> tensors in minirlhf's batch layout (ALGORITHMS.md, "Batch layout").

Prompts are left-padded and start with BOS; responses are right-padded and end with EOS (see
generate.py). `Batcher` holds one run's choices: its tokenizer, the room for a prompt and a
response, its device.
"""
from dataclasses import dataclass

import torch

from ..generate import left_pad, response_mask


def encode_prompts(tok, prompts, device="cpu", max_len=None):
    """BOS + prompt tokens, left-padded. A prompt longer than `max_len` keeps its last max_len
    tokens (the text nearest the response matters most); BOS is kept."""
    seqs = []
    for p in prompts:
        ids = tok.encode(p)
        if max_len is not None and len(ids) + 1 > max_len:
            ids = ids[len(ids) + 1 - max_len:]
        seqs.append([tok.bos_id] + ids)
    return left_pad(seqs, tok.pad_id, device)


def encode_responses(tok, responses, max_len, device="cpu"):
    """Responses right-padded, cut to max_len (a cut response has no EOS: it is unfinished). A
    sampled response is the token ids it was sampled as (EOS included where it finished), kept
    exactly: a byte-level BPE's decode-then-encode gives other tokens, and the RM must score the
    sequence PPO optimises. A text (a file's response, a demonstration) is encoded, then EOS."""
    seqs = [(tok.encode(r) + [tok.eos_id])[:max_len] if isinstance(r, str) else list(r)[:max_len]
            for r in responses]
    N = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), N), tok.pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    ids = ids.to(device)
    # the padding is what lies past each row's length: a PAD the policy sampled mid-response stays a
    # real token, as it is on the tensor path that scored it during PPO
    within = torch.arange(N, device=device)[None, :] < torch.tensor([len(s) for s in seqs],
                                                                    device=device)[:, None]
    return ids, response_mask(ids, tok.eos_id) * within.long()


@dataclass
class Batcher:
    """How one run turns prompts and responses into batches: its tokenizer, the room for prompt
    and response, its device."""
    tok: object
    """The tokenizer (tokenizer.Tokenizer)."""
    prompt_len: int
    """Room for a prompt (BOS included): a longer one keeps its last tokens."""
    max_new_tokens: int
    """Room for a response (EOS included)."""
    device: object = "cpu"
    """Where the batches are built."""

    @classmethod
    def of(cls, cfg, tok, device="cpu"):
        """The batcher of a run: its config's prompt room and response length."""
        return cls(tok, cfg.prompt_room, cfg.max_new_tokens, device)

    def prompts(self, prompts):
        return encode_prompts(self.tok, prompts, self.device, max_len=self.prompt_len)

    def responses(self, responses):
        return encode_responses(self.tok, responses, self.max_new_tokens, self.device)

    def batch(self, prompts, responses):
        """(prompt, prompt_mask, response, response_mask) of prompt texts and responses."""
        return (*self.prompts(prompts), *self.responses(responses))
