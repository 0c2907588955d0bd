"""Stage 4: refine the RM on policy samples, then PPO again. RLP and MetaRM (ALGORITHMS.md §2-3).

    python refine.py --method=uml           # RLP-UML: + lambda * multi-view information bottleneck on policy samples
    python refine.py --method=spg           # RLP-SPG: + synthetic pairs from self-consistent policy samples
    python refine.py --method=uml+spg       # both (defined in the paper, never run there)
    python refine.py --method=oracle        # upper bound: the same policy pairs labelled by the gold labeller
    python refine.py --method=control       # retrain on D only: separates refinement from retraining noise
    python refine.py --method=metarm --rounds=3      # MetaRM rounds; --method=vanilla-rounds is eta = 0
    python refine.py --method=eta-sweep     # MetaRM's eta at our scale: J, ||theta' - theta||, accuracies

RLP (one round): vanilla PPO policy (out_dir/ppo.pt, trained if missing) -> n samples per unlabelled prompt ->
RM retrained from SFT -> normalised -> PPO again from SFT with it. MetaRM: round r samples the latest policy,
trains a fresh RM for one epoch on D with meta steps, and continues PPO from the previous round's policy for
iters // rounds iterations, so the R rounds together get vanilla PPO's budget.
"""
import os
import random
import statistics
from dataclasses import replace

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from minirlhf import dist
from minirlhf.checkpoint import load
from minirlhf.data import encode_prompts, encode_responses
from minirlhf.metarm import difference_objective, meta_step, meta_step_second_order
from minirlhf.reward import bt_loss, pairwise_accuracy, score
from minirlhf.rlp import MIBHead, mib_loss, synthetic_preferences
from minirlhf.runtime import clip_and_check, main, print_table, read_summary, write_summary
from train_ppo import rl_setup, summarize, train_ppo
from train_rm import (encode_pairs, gold_labelled, load_preferences, normalize_on, pair_rewards, rm_accuracy,
                      score_texts, train_reward_model)
from train_sft import ensure_sft, sample


def policy_samples(policy, source, prompts, n, temperature, cfg, device, generator):
    """n samples per prompt: a list (per prompt) of n response texts."""
    flat = sample(policy, source, [p for p in prompts for _ in range(n)], cfg, device, generator, temperature)
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def rm_scores(rm, tok, prompts, samples, cfg, device):
    """RM scores (per prompt, a list of n floats) of each prompt's samples."""
    flat = score_texts(rm, tok, [p for p, ys in zip(prompts, samples) for _ in ys], [y for ys in samples for y in ys],
                       cfg, device).tolist()
    n = len(samples[0])
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


def policy_pairs(task, prompts, samples, cfg):
    """Clean gold-labelled pairs (prompt, better, worse) of two distinct samples per prompt (gold ties dropped):
    how well does an RM rank what the policy actually writes?"""
    firsts = ((p, ys[0], next((y for y in ys[1:] if y != ys[0]), None)) for p, ys in zip(prompts, samples))
    return gold_labelled(task, [(p, a, b) for p, a, b in firsts if b is not None], cfg, None, noisy=False)


def uml_step(prompts, samples, rng):
    """RLP-UML's training step: BT loss on a batch of D plus lambda * L_M on as many view pairs from P
    (two different samples of one prompt are its two views)."""
    views = [(p, ys) for p, ys in zip(prompts, samples) if len(set(ys)) >= 2]

    def step(rm, opt, tok, batch, cfg, device):
        rc, rr = pair_rewards(rm, tok, *zip(*batch), cfg, device)
        loss_r = bt_loss(rc, rr)
        chosen = rng.sample(views, min(len(views), len(batch)))
        v1, v2 = zip(*(rng.sample(sorted(set(ys)), 2) for _, ys in chosen))
        _, h = score(rm, *encode_pairs(tok, [p for p, _ in chosen], v1, v2, cfg, device), return_hidden=True)
        loss_m, stats = mib_loss(rm.aux, *h.chunk(2), beta=cfg.mib_beta)
        loss = loss_r + cfg.uml_lambda * loss_m  # RLP Eq. 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_and_check(rm.parameters(), cfg.grad_clip, "RM (UML)", 0)
        opt.step()
        return {"loss": loss.item(), "bt": loss_r.item(), "acc": pairwise_accuracy(rc, rr), **stats}
    return step


def metarm_step(prompts, samples, eta, rng, log):
    """MetaRM's training step: a meta step with X_t = the batch of D and X_s = meta_prompts prompts x k samples."""
    def step(rm, opt, tok, batch, cfg, device):
        pref = encode_pairs(tok, *zip(*batch), cfg, device)
        chosen = rng.sample(range(len(prompts)), min(cfg.meta_prompts, len(prompts)))
        p, pm = encode_prompts(tok, [prompts[i] for i in chosen for _ in range(cfg.meta_k)], device,
                               max_len=cfg.block_size - cfg.max_new_tokens)
        r, rmask = encode_responses(tok, [y for i in chosen for y in samples[i]], cfg.max_new_tokens, device)
        if cfg.meta_second_order:
            with sdpa_kernel([SDPBackend.MATH]):
                stats = meta_step_second_order(rm, opt, pref, (p, pm, r, rmask), eta, cfg.meta_k, cfg.grad_clip)
        else:
            stats = meta_step(rm, opt, pref, (p, pm, r, rmask), eta, cfg.meta_k, cfg.grad_clip)
        log.append(stats)
        return stats
    return step


def vanilla_policy(cfg, source, sft, rm, device):
    """The vanilla PPO policy pi_theta of out_dir (ppo.pt), trained first if missing."""
    path = os.path.join(cfg.out_dir, "ppo.pt")
    if not os.path.exists(path) or load(path)["iter"] < cfg.iters:
        policy, history = train_ppo(cfg, source, sft, rm, device)
        write_summary(cfg, "ppo", summarize(history))
        return policy
    policy = ensure_sft(cfg).to(device)
    policy.load_state_dict(load(path)["policy"])
    return policy.eval()


def rlp(cfg, source, sft, rm, prefs, device):
    """One RLP round (RLP Alg. 1) for cfg.method in uml / spg / uml+spg, or the oracle / control baselines."""
    task, tok = source.task, source.tokenizer
    policy = vanilla_policy(cfg, source, sft, rm, device)
    rng = random.Random(cfg.seed + 30)
    prompts = task.sample_prompts(cfg.refine_prompts, rng, "unlabelled")
    P = policy_samples(policy, source, prompts, cfg.n_samples, 1.0, cfg, device,
                       torch.Generator(device).manual_seed(cfg.seed + 30))  # RLP: n = 10 samples at T = 1.0
    pol_pairs = policy_pairs(task, prompts, P, cfg)
    before = {"rm_acc_policy_pairs": rm_accuracy(rm, tok, pol_pairs, cfg, device),
              "held_out_acc_gold": rm_accuracy(rm, tok, prefs["held_clean"], cfg, device)}
    pairs, step_fn, aux, stats = list(prefs["train"]), None, None, {}
    if "spg" in cfg.method:
        keys = [[task.semantic_key(p, y) for y in ys] for p, ys in zip(prompts, P)]
        synthetic, stats = synthetic_preferences(prompts, P, keys, rm_scores(rm, tok, prompts, P, cfg, device),
                                                 cfg.spg_gamma, rng, gold=task.gold, rank_by=cfg.spg_rank)
        pairs += synthetic  # D union D_hat, no reweighting
    if "uml" in cfg.method:
        step_fn, aux = uml_step(prompts, P, rng), MIBHead(sft.cfg.n_embd, cfg.z_dim)
    if cfg.method == "oracle":  # the same policy pairs, labelled by the gold labeller: what perfect SPG would give
        pairs += gold_labelled(task, [(p, ys[0], ys[1]) for p, ys in zip(prompts, P) if ys[0] != ys[1]], cfg, rng)
        stats = {"oracle/pairs": len(pairs) - len(prefs["train"])}
    refined = train_reward_model(sft, tok, pairs, cfg, device, seed=cfg.seed + 31, aux=aux, desc=cfg.method,
                                 **({"step_fn": step_fn} if step_fn else {}))
    normalize_on(refined, tok, prefs["norm_prompts"], prefs["sft_samples"], cfg, device)
    after = {"rm_acc_policy_pairs": rm_accuracy(refined, tok, pol_pairs, cfg, device),
             "held_out_acc_gold": rm_accuracy(refined, tok, prefs["held_clean"], cfg, device)}
    print(f"{cfg.method}: RM accuracy on gold-labelled policy pairs {before['rm_acc_policy_pairs']:.3f} -> "
          f"{after['rm_acc_policy_pairs']:.3f}; on held-out SFT pairs {before['held_out_acc_gold']:.3f} -> "
          f"{after['held_out_acc_gold']:.3f}; " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    _, history = train_ppo(cfg, source, sft, refined, device, name=f"ppo_{cfg.method}")
    result = {"rm_before": before, "rm_after": after, **stats, **summarize(history)}
    write_summary(cfg, f"refine_{cfg.method}", result)
    vanilla = read_summary(cfg)["ppo"]
    print(f"\n=== vanilla PPO vs PPO with the {cfg.method}-refined RM (gold judge, held-out prompts) ===")
    print_table([dict(policy=f"{name} {when}", iter=h["iter"], gold=h["eval/gold"], kl=h["eval/kl"],
                      win_rate=h["eval/win_rate"], rm_acc=h["eval/rm_acc_policy_pairs"])
                 for name, res in (("vanilla", vanilla), (cfg.method, result))
                 for when, h in (("final", res["final"]), ("peak", res["peak_gold"]))],
                ["policy", "iter", "gold", "kl", "win_rate", "rm_acc"])
    return result


def check_rounds(cfg):
    """MetaRM's rounds share cfg.iters; checked before any training, so a bad --rounds fails in seconds."""
    if cfg.iters < cfg.rounds:
        raise ValueError(f"--iters={cfg.iters} is shared by the rounds, so it must be >= --rounds={cfg.rounds}")


def meta_rounds(cfg, source, sft, prefs, device, eta):
    """MetaRM rounds (eta = 0: the vanilla-rounds control, the same loop without the meta ascent)."""
    task, tok = source.task, source.tokenizer
    split = "ood" if cfg.ood else "unlabelled"
    policy, rows = sft, []
    for r in range(1, cfg.rounds + 1):
        rng = random.Random(cfg.seed + 40 + r)
        prompts = task.sample_prompts(cfg.refine_prompts, rng, split)
        S = policy_samples(policy, source, prompts, cfg.meta_k, cfg.temperature + cfg.meta_temp_delta, cfg, device,
                           torch.Generator(device).manual_seed(cfg.seed + 40 + r))
        log = []
        rm = train_reward_model(sft, tok, prefs["train"], cfg, device, seed=cfg.seed + 50 + r, epochs=1,
                                step_fn=metarm_step(prompts, S, eta, rng, log), desc=f"{cfg.method} r{r}")
        normalize_on(rm, tok, prefs["norm_prompts"], prefs["sft_samples"], cfg, device)
        J = difference_objective(torch.tensor(rm_scores(rm, tok, prompts, S, cfg, device))).item()
        rm_row = {"J_policy_samples": J, "shift_norm": statistics.mean(s["shift_norm"] for s in log),
                  "held_out_acc_gold": rm_accuracy(rm, tok, prefs["held_clean"], cfg, device),
                  "rm_acc_policy_pairs": rm_accuracy(rm, tok, policy_pairs(task, prompts, S, cfg), cfg, device)}
        # The rounds share vanilla PPO's budget (cfg.iters in all), so round R is compared at equal PPO compute.
        policy, history = train_ppo(replace(cfg, iters=cfg.iters // cfg.rounds), source, sft, rm, device,
                                    name=f"{cfg.method}_r{r}", init_policy=policy, prompt_split=split)
        rows.append({"round": r, **rm_row, **summarize(history)})
        print(f"round {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in rm_row.items())
              + f", final gold {history[-1]['eval/gold']:.3f}, win-rate {history[-1]['eval/win_rate']:.3f}")
    write_summary(cfg, cfg.method + ("_ood" if cfg.ood else ""), {"eta": eta, "rounds": rows})
    print_table([{"round": x["round"], "J": x["J_policy_samples"], "shift": x["shift_norm"],
                  "acc_heldout": x["held_out_acc_gold"], "acc_policy": x["rm_acc_policy_pairs"],
                  "diff_std": x["final"]["eval/proxy_diff_std"], "gold": x["final"]["eval/gold"],
                  "win_rate": x["final"]["eval/win_rate"]} for x in rows],
                ["round", "J", "shift", "acc_heldout", "acc_policy", "diff_std", "gold", "win_rate"])
    return rows


def eta_sweep(cfg, source, sft, prefs, device, etas=(0.0, 0.01, 0.1, 1.0, 10.0)):
    """MetaRM's eta at our scale (the paper's 5e-6 barely moves a small model): one round-1 RM per eta."""
    task, tok = source.task, source.tokenizer
    rng = random.Random(cfg.seed + 41)
    prompts = task.sample_prompts(cfg.refine_prompts, rng, "unlabelled")
    S = policy_samples(sft, source, prompts, cfg.meta_k, cfg.temperature + cfg.meta_temp_delta, cfg, device,
                       torch.Generator(device).manual_seed(cfg.seed + 41))
    rows = []
    for eta in etas:
        log = []
        rm = train_reward_model(sft, tok, prefs["train"], cfg, device, seed=cfg.seed + 51, epochs=1,
                                step_fn=metarm_step(prompts, S, eta, random.Random(cfg.seed), log), desc=f"eta={eta}")
        normalize_on(rm, tok, prefs["norm_prompts"], prefs["sft_samples"], cfg, device)
        rows.append({"eta": eta, "shift_norm": statistics.mean(s["shift_norm"] for s in log),
                     "J_gain": statistics.mean(s["J_shifted"] - s["J"] for s in log),
                     "J_policy_samples": difference_objective(torch.tensor(rm_scores(rm, tok, prompts, S, cfg,
                                                                                     device))).item(),
                     "held_out_acc_gold": rm_accuracy(rm, tok, prefs["held_clean"], cfg, device),
                     "rm_acc_policy_pairs": rm_accuracy(rm, tok, policy_pairs(task, prompts, S, cfg), cfg, device)})
    print_table(rows, list(rows[0]))
    write_summary(cfg, "eta_sweep", {"rows": rows})
    return rows


def run(cfg):
    if cfg.method in ("metarm", "vanilla-rounds"):
        check_rounds(cfg)
    device, source, sft, rm = rl_setup(cfg)
    if dist.world() > 1:
        raise SystemExit("error: refine.py runs on one process (torchrun: train_sft.py, train_rm.py, train_ppo.py)")
    prefs = load_preferences(cfg)
    if cfg.method in ("uml", "spg", "uml+spg", "oracle", "control"):
        return rlp(cfg, source, sft, rm, prefs, device)
    if cfg.method in ("metarm", "vanilla-rounds"):
        return meta_rounds(cfg, source, sft, prefs, device, eta=cfg.meta_eta if cfg.method == "metarm" else 0.0)
    if cfg.method == "eta-sweep":
        return eta_sweep(cfg, source, sft, prefs, device)
    raise SystemExit(f"error: --method={cfg.method!r}: expected uml, spg, uml+spg, oracle, control, metarm, "
                     "vanilla-rounds or eta-sweep")


if __name__ == "__main__":
    main(run, method="uml")
