"""Crash-safe checkpoints: atomic writes and code-free loads.

An exact resume needs no saved RNG state: every script derives each step's randomness
from (seed, step)."""
import json
import os
import pickle
import tempfile
import zipfile

import torch

from . import dist
from .config import UsageError


def _atomic_write(path, write):
    """Write via a temp file in the same folder + fsync + rename: a crash leaves the old file or the
    new one. Under torchrun only rank 0 writes."""
    if not dist.is_main():
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    # mkstemp makes 0600 files; give the result the permissions open() would
    os.chmod(tmp, 0o666 & ~umask)
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


def atomic_write_json(obj, path, indent=2):
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


def load(path, expect=None, fields=()):
    """torch.load with weights_only=True: a checkpoint that would run code is refused, never
    executed. Any file that is not a readable checkpoint, or lacks one of `fields`, is one error
    naming it. With `expect` ({field: value}), a checkpoint that records other values for those
    fields is refused (see `check_made_with`)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch reads any file that is not its zip archive as a legacy (pre-1.6) checkpoint, and a
        # text file then fails as a "refused" pickle: say what it is instead
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: corrupt or truncated checkpoint (not the zip archive "
                             "torch.save writes, nor a legacy one of plain tensors)") from None
        raise ValueError(f"{path}: refused to load (not a plain-tensor checkpoint): "
                         f"{str(e).splitlines()[0]}") from e
    except Exception as e:  # a torn zip, a text file, a directory: torch raises many kinds
        raise unreadable(path, e) from None
    if not isinstance(ck, dict):
        raise ValueError(f"{path}: not a minirlhf checkpoint "
                         f"(expected a dict, got {type(ck).__name__})")
    missing = [f for f in fields if f not in ck]
    if missing:
        raise ValueError(f"{path}: not the checkpoint this stage writes (no field "
                         f"{', '.join(map(repr, missing))})")
    if expect is not None:
        check_made_with(path, ck.get("config"), expect)
    return ck


def unreadable(path, error):
    """The one-line error for a weights file that failed to load (torch and safetensors raise
    many kinds)."""
    detail = str(error).splitlines()[0] if str(error) else "no detail"
    return ValueError(f"{path}: corrupt or truncated checkpoint ({type(error).__name__}: {detail})")


def check_made_with(path, made, expect):
    """Refuse to reuse a checkpoint made under other settings: the error names each
    differing field. A checkpoint from before checkpoints recorded their settings
    (made is None) is taken as it is."""
    if made is None:
        return
    differ = [k for k in expect if k in made and made[k] != expect[k]]
    if differ:
        was = ", ".join(f"--{k}={made[k]!r}" for k in differ)
        now = ", ".join(f"--{k}={expect[k]!r}" for k in differ)
        raise UsageError(f"{path} was made with {was}, this run asks for {now}: "
                         "use another --out_dir, or --reuse=True to use it anyway")
