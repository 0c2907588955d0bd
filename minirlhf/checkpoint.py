"""Crash-safe checkpoints: atomic writes and code-free loads.

An exact resume needs no saved RNG state: every script derives each step's randomness from (seed, step)."""
import json
import os
import pickle
import tempfile
from dataclasses import asdict

import torch

from . import dist


def _atomic_write(path, write):
    """Write via a temp file in the same folder + fsync + rename: a crash leaves the old file or the new one.
    Under torchrun only rank 0 writes."""
    if not dist.is_main():
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the result the permissions open() would
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj, path):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def load(path):
    """torch.load with weights_only=True: a checkpoint that would run code is refused, never executed."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load (not a plain-tensor checkpoint): {str(e).splitlines()[0]}") from e
    except (RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: corrupt or truncated checkpoint: {e}") from e


def save_model(path, model, **meta):
    """A GPT or ScalarModel with the GPTConfig needed to rebuild it (plain dicts: weights_only-loadable)."""
    gpt = getattr(model, "gpt", model)
    atomic_save({"model": model.state_dict(), "gpt_config": asdict(gpt.cfg), **meta}, path)


def load_model(path, scalar=False):
    """Rebuild the GPT (or ScalarModel with scalar=True) saved by save_model; a mismatch names the file."""
    from .model import GPT, GPTConfig, ScalarModel
    ck = load(path)
    if "model" not in ck or "gpt_config" not in ck:
        raise ValueError(f"{path}: not a minirlhf model checkpoint (fields 'model' and 'gpt_config' needed)")
    gpt = GPT(GPTConfig(**ck["gpt_config"]))
    model = ScalarModel(gpt) if scalar else gpt
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: checkpoint does not match its model config: {str(e).splitlines()[0]}") from None
    return model, ck
