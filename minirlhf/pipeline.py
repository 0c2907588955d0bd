"""The stages in order: what an RL-time script needs before its own stage runs."""
from .data.file_task import attach_gold_rm, load_gold_rm
from .data.sources import get_source
from .plumbing.runtime import setup
from .rm import ensure_rm
from .sft import ensure_sft


def prepare_judged(cfg):
    """(device, source, SFT policy), the source judged: a file gets its gold RM (trained first if
    out_dir lacks it), after which it runs like an embedded task."""
    device = setup(cfg)
    source = get_source(cfg)
    gold = load_gold_rm(cfg, source) if cfg.data else None
    sft = ensure_sft(cfg, source, device)
    if cfg.data:
        attach_gold_rm(cfg, source, sft, gold, device)
    return device, source, sft


def prepare_rl(cfg):
    """(device, source, SFT policy, proxy RM) for an RL-time stage; SFT and the RM are trained first
    if out_dir lacks them, and reused (if made under the same settings) otherwise."""
    device, source, sft = prepare_judged(cfg)
    return device, source, sft, ensure_rm(cfg, source, sft, device)
