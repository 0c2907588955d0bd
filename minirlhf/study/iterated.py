"""The on-policy, iterated mode of every RM refinement (ALGORITHMS.md §2.3).

Iterated mode (`refine.py --method=oracle-iter`, `control-iter`, `uml-iter`, `spg-iter`,
`uml+spg-iter`): R rounds, each sampling the *current* policy, refining the RM with the method
(round 1 from the SFT weights, later rounds continuing the previous round's RM), normalising it,
and continuing PPO; the rounds share vanilla PPO's budget, like MetaRM's. `oracle-iter` adds
every distinct pair of the current policy's samples with clean gold labels, accumulating over
rounds: the upper bound of any method that refines on policy samples. `control-iter` runs the same
rounds retraining on D only. (The ceilings that measure headroom: ceilings.py.)
"""
from ..data.batches import Batcher
from ..evaluate import summarize
from ..generate import policy_samples
from ..plumbing import seeds
from ..plumbing.runtime import print_table, write_summary
from ..ppo_trainer import ppo_round
from ..rlp import RLP_METHODS, RLPMethod, added_pairs, retrain_rm
from ..rm import held_out_policy_pairs, rm_accuracy

# the on-policy, iterated mode of each RLP method; the one-shot rounds of rlp.py are the RLP paper's
# protocol (Algorithm 1)
ITERATED_METHODS = {"uml-iter": RLP_METHODS["uml"], "spg-iter": RLP_METHODS["spg"],
                    "uml+spg-iter": RLP_METHODS["uml+spg"], "oracle-iter": RLPMethod(oracle="all"),
                    "control-iter": RLP_METHODS["control"]}


def iterated_rounds(cfg, name, source, sft, rm, prefs, device):
    """The rounds of ITERATED_METHODS[name]; returns and records one row per round."""
    method, task = ITERATED_METHODS[name], source.task
    batcher = Batcher.of(cfg, source.tokenizer, device)
    policy, rows, added = sft, [], []
    for r in range(1, cfg.rounds + 1):
        rng, gen = seeds.generators(device, cfg.seed, seeds.ITER_SAMPLES, r)
        prompts = task.sample_prompts(cfg.refine_prompts, rng, "unlabelled")
        samples = policy_samples(policy, batcher, prompts, cfg.n_samples, 1.0, gen)
        # SPG ranks by the RM in use so far; the oracle's pairs accumulate over the rounds; round
        # r > 1 continues round r - 1's RM, which keeps what it learnt, for an epoch that holds
        # each of the round's new pairs and fills the rest from D and the earlier rounds' pairs
        new, stats = added_pairs(cfg, method, task, batcher, rm, prompts, samples, rng)
        rm = retrain_rm(cfg, method, sft, batcher, prefs, new, prompts, samples, rng,
                        seeds.stream(cfg.seed, seeds.ITER_RM, r), init=rm if r > 1 else None,
                        desc=f"{name} r{r}", earlier=added)
        added += new if method.oracle else []
        rm_row = {"held_out_acc_gold": rm_accuracy(rm, batcher, prefs["held_clean"]),
                  "rm_acc_policy_pairs": rm_accuracy(rm, batcher, held_out_policy_pairs(
                      policy, batcher, task, cfg.refine_prompts, cfg.temperature,
                      seeds.stream(cfg.seed, seeds.HELD_OUT_PAIRS, r))), **stats}
        policy, history = ppo_round(cfg, r, name, source, sft, rm, policy, device)
        rows.append({"round": r, **rm_row, **summarize(history)})
        print(f"round {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in rm_row.items())
              + f", final gold {history[-1]['eval/gold']:.3f}")
    write_summary(cfg, name, {"rounds": rows})
    print_table([{"round": x["round"], "acc_heldout": x["held_out_acc_gold"],
                  "acc_policy": x["rm_acc_policy_pairs"], "kl": x["final"]["eval/kl"],
                  "gold": x["final"]["eval/gold"], "win_rate": x["final"]["eval/win_rate"]}
                 for x in rows], ["round", "acc_heldout", "acc_policy", "kl", "gold", "win_rate"])
    return rows
