"""Text <-> tensors in minirlhf's batch layout, the gold labeller, and the HH-RLHF file loader.

Layout (see generate.py): prompts left-padded and preceded by BOS; responses
right-padded, ending with EOS.
"""
import gzip
import json
import math
import os
import sys
import zlib

from dataclasses import dataclass

import torch

from .generate import left_pad, response_mask


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
    """Response tokens + EOS, cut to max_len (a cut response has no EOS: it is
    unfinished), right-padded."""
    seqs = [(tok.encode(r) + [tok.eos_id])[:max_len] for r in responses]
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


def decode_responses(tok, response, mask):
    """Response texts; EOS kept (it marks a finished response), padding dropped."""
    return [tok.tok.decode(r[m.bool()].tolist(), skip_special_tokens=False)
            for r, m in zip(response.cpu(), mask.cpu())]


@dataclass
class Codec:
    """How one run turns texts into batches: its tokenizer, the room for prompt and
    response, its device."""
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
        """The codec of a run: its config's prompt room and response length."""
        return cls(tok, cfg.prompt_room, cfg.max_new_tokens, device)

    def prompts(self, prompts):
        return encode_prompts(self.tok, prompts, self.device, max_len=self.prompt_len)

    def responses(self, responses):
        return encode_responses(self.tok, responses, self.max_new_tokens, self.device)

    def batch(self, prompts, responses):
        """(prompt, prompt_mask, response, response_mask) of (prompt, response) texts."""
        return (*self.prompts(prompts), *self.responses(responses))


def gold_label(gold_diff, tau, flip, rng):
    """The simulated annotator of a pair (a, b) whose gold difference is g(a) - g(b): returns True
    if a is preferred. P(a > b) = sigmoid((g(a) - g(b)) / tau), then each label flips with
    probability `flip` (AlpacaFarm-style extra noise)."""
    diff = gold_diff / tau
    a_wins = rng.random() < 1 / (1 + math.exp(-max(-50.0, min(50.0, diff))))
    return a_wins != (rng.random() < flip)


class DataError(ValueError):
    """Bad input file: the message names the file, the line and the field."""


def _split_dialogue(chosen, rejected):
    """HH-RLHF pairs are dialogues that agree up to some '\\n\\nAssistant:' turn: the prompt is
    their common text up to the last such marker, the responses are the rest of each (occasionally
    several turns long)."""
    marker = "\n\nAssistant:"
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(marker)
    if cut < 0:
        return None
    cut += len(marker)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def read_bytes(path):
    """The file's bytes, gunzipped if it is named .gz; a bad file is one DataError naming it.
    A .gz is read whole first, so that its checksum is verified before any line is blamed for
    bad UTF-8 or JSON."""
    try:
        if not str(path).endswith(".gz"):
            with open(path, "rb") as f:
                return f.read()
        with gzip.open(path, "rb") as f:
            return f.read()
    except EOFError:
        raise DataError(f"{path}: truncated gzip file (it ends mid-stream)") from None
    except gzip.BadGzipFile as e:
        raise DataError(f"{path}: not a valid gzip file ({e})") from None
    except zlib.error as e:
        raise DataError(f"{path}: corrupt gzip data ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None


def load_hh_pairs(path):
    """[(prompt, chosen, rejected)] from a JSONL file (optionally .gz) of HH-RLHF dialogues
    {"chosen", "rejected"}, or of {"prompt", "chosen", "rejected"} with the responses apart from
    the prompt (TRL's format). Any bad line raises DataError naming the file, line number and field.
    Pairs whose two responses are the same text teach nothing: they are dropped with a warning, and
    a file of nothing else is an error."""
    pairs, same = [], 0
    for lineno, raw in enumerate(read_bytes(path).splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start}") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object")
        for field in ("chosen", "rejected") + (("prompt",) if "prompt" in row else ()):
            if field not in row:
                raise DataError(f"{path}:{lineno}: missing field '{field}'")
            if not isinstance(row[field], str):
                raise DataError(f"{path}:{lineno}: field '{field}' must be a string, "
                                f"got {type(row[field]).__name__}")
        split = ((row["prompt"], row["chosen"], row["rejected"]) if "prompt" in row
                 else _split_dialogue(row["chosen"], row["rejected"]))
        if split is None:
            raise DataError(f"{path}:{lineno}: field 'chosen': no '\\n\\nAssistant:' turn "
                            "shared with 'rejected'")
        if split[1] == split[2]:
            same += 1
            continue
        pairs.append(split)
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs"
                        + (f" (all {same} have chosen == rejected)" if same else " (empty file)"))
    if same:
        print(f"warning: {path}: dropped {same} pairs whose chosen and rejected responses "
              "are identical", file=sys.stderr)
    return pairs
