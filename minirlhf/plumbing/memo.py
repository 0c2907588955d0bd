"""Draws that several runs in one process repeat exactly, made once and reused: every method of a
report seed starts from the same SFT policy (its win-rate baseline, its first evaluation), and the
one-shot RLP methods all learn from the same vanilla PPO policy's samples."""
import copy
import hashlib

import torch

MEMO = {}
SIZE = 8  # a few seeds' worth: a process runs its seeds one after another


def fingerprint(model):
    """A digest of a model's weights: equal digests, equal models."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.digest()


def reused(key, make, generator=None):
    """make() the first time `key` (and the generator's state) comes, a copy of that after: bit for
    bit what making it again would give, the generator left where make() left it. The key must
    hold everything make() reads besides the generator and autocast (fingerprints for models)."""
    # what autocast would change in make()'s numbers
    key = (key, *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                  for d in ("cpu", "cuda")))
    if generator is not None:
        key = (key, str(generator.device), generator.get_state().numpy().tobytes())
    if key not in MEMO:
        MEMO[key] = make(), generator.get_state() if generator is not None else None
        while len(MEMO) > SIZE:
            MEMO.pop(next(iter(MEMO)))
    out, state = MEMO[key]
    if generator is not None:
        generator.set_state(state)
    return copy.deepcopy(out)
