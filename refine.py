"""Stage 4: refine the RM on policy samples, then PPO again: RLP (minirlhf/rlp.py) and MetaRM
(minirlhf/metarm.py); the iterated mode and the ceilings (minirlhf/study/).

    python refine.py --method=uml           # RLP-UML: + lambda * multi-view information bottleneck
                                            # on policy samples
    python refine.py --method=spg           # RLP-SPG: + synthetic pairs from self-consistent policy
                                            # samples
    python refine.py --method=uml+spg       # both (defined in the paper, never run there)
    python refine.py --method=oracle        # the same policy samples' first pairs labelled by
                                            # the gold labeller (what a perfect SPG would give)
    python refine.py --method=control       # retrain on D only: separates refinement from
                                            # retraining noise
    python refine.py --method=metarm --rounds=3      # MetaRM rounds; --method=vanilla-rounds is
                                                     # eta = 0
    python refine.py --method=eta-sweep     # MetaRM's eta at our scale: J, ||theta' - theta||,
                                            # accuracies
    python refine.py --method=oracle-iter --rounds=3   # on-policy, iterated: every method
                                            # has a *-iter mode; control-iter is their control
    python refine.py --method=gold-ppo      # a ceiling: PPO on the gold reward itself
    python refine.py --method=big-rm        # a ceiling: PPO on a proxy trained on 10x the pairs

Reuses out_dir's SFT policy and proxy RM when present (trains them otherwise); the one-shot RLP
methods also reuse (or train) its vanilla PPO policy, ppo.pt.
"""
import copy
import os

from minirlhf.metarm import META_METHODS, eta_sweep, meta_rounds
from minirlhf.pipeline import prepare_rl
from minirlhf.plumbing import dist
from minirlhf.plumbing.checkpoint import load
from minirlhf.plumbing.config import RefineConfig, UsageError
from minirlhf.plumbing.export import export_policy
from minirlhf.plumbing.runtime import main
from minirlhf.plumbing.validate import validate
from minirlhf.ppo_trainer import check_vanilla_ppo
from minirlhf.rlp import RLP_METHODS, rlp_round
from minirlhf.rm import load_preferences
from minirlhf.study.ceilings import big_rm_ppo, gold_ppo
from minirlhf.study.iterated import ITERATED_METHODS, iterated_rounds

METHODS = (*RLP_METHODS, *ITERATED_METHODS, *sorted(META_METHODS), "eta-sweep", "gold-ppo",
           "big-rm")


def run(cfg):
    device, source, sft, rm = prepare_rl(cfg)
    if cfg.export_sft:
        export_policy(sft, source.tokenizer, cfg.export_sft, cfg)
    prefs = load_preferences(cfg.out_dir)
    if cfg.method in RLP_METHODS:
        result = rlp_round(cfg, cfg.method, source, sft, rm, prefs, device)
    elif cfg.method in ITERATED_METHODS:
        result = iterated_rounds(cfg, cfg.method, source, sft, rm, prefs, device)
    elif cfg.method in META_METHODS:
        result = meta_rounds(cfg, cfg.method, source, sft, prefs, device)
    elif cfg.method == "gold-ppo":
        result = gold_ppo(cfg, source, sft, rm, prefs, device)
    elif cfg.method == "big-rm":
        result = big_rm_ppo(cfg, source, sft, device)
    else:
        return eta_sweep(cfg, source, sft, prefs, device)
    if cfg.export:
        policy = copy.deepcopy(sft)
        policy.load_state_dict(load(final_checkpoint(cfg), fields=("policy",))["policy"])
        export_policy(policy, source.tokenizer, cfg.export, cfg)
    return result


def final_checkpoint(cfg):
    """The checkpoint of the method's last PPO run, which holds its final policy: as rlp_round,
    ppo_round (a run of rounds' last round) and the ceilings name their PPO runs."""
    if cfg.method in RLP_METHODS:
        name = f"ppo_{cfg.method}"
    elif cfg.method in ITERATED_METHODS or cfg.method in META_METHODS:
        name = f"{cfg.method}_r{cfg.rounds}"
    else:
        name = {"gold-ppo": "ppo_gold", "big-rm": "ppo_big_rm"}[cfg.method]
    return os.path.join(cfg.out_dir, name + ".pt")


def check(cfg):
    validate(cfg, methods=METHODS)
    if cfg.method in RLP_METHODS:  # read now: they reuse out_dir's vanilla PPO after SFT and the RM
        check_vanilla_ppo(cfg)
    if cfg.method == "eta-sweep" and cfg.export:
        raise UsageError(f"--export={cfg.export!r}: --method=eta-sweep trains RMs, no policy "
                         "(--export_sft writes the SFT policy)")
    if dist.under_torchrun():
        raise UsageError("refine.py runs on one process (not under torchrun): torchrun runs "
                         "train_sft.py, train_rm.py and train_ppo.py")


if __name__ == "__main__":
    main(run, RefineConfig, check)
