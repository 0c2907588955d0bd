"""The stages in order: what an RL-time script needs before its own stage runs."""
from .rm import ensure_rm
from .runtime import setup
from .sft import ensure_sft
from .sources import get_source


def prepare_rl(cfg):
    """(device, source, SFT policy, proxy RM) for an RL-time stage; SFT and the RM are trained first
    if out_dir lacks them, and reused (if made under the same settings) otherwise."""
    device = setup(cfg)
    source = get_source(cfg)
    sft = ensure_sft(cfg, source, device)
    return device, source, sft, ensure_rm(cfg, source, sft, device)
