"""Crash-safe checkpoints: atomic writes, code-free loads, and the RNG states an exact resume needs."""
import json
import os
import pickle
import random
import tempfile

import numpy as np
import torch


def _atomic_write(path, write):
    """Write via a temp file in the same folder + fsync + rename: a crash leaves the old file or the new one.
    Under torchrun only rank 0 writes."""
    from . import dist
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


def rng_state():
    """Every RNG a run draws from, as tensors and plain containers (so weights_only loading accepts it)."""
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": int(np.random.get_state()[2]),
             "python": torch.tensor(list(random.getstate()[1]), dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(path, model, **meta):
    """A GPT or ScalarModel with the GPTConfig needed to rebuild it (plain dicts: weights_only-loadable)."""
    from dataclasses import asdict
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
