"""Stage 2 of RLHF: a proxy reward model from a limited budget of preference pairs.

    python train_rm.py                                   # embedded task: gold-labelled pairs of SFT samples
    python train_rm.py --ensemble=3                      # Coste et al.: 3 RMs from different seeds
    python train_rm.py --data=path/to/test.jsonl.gz --block_size=256 --max_new_tokens=128   # HH-RLHF file

Initialises from out_dir/sft.pt (training SFT first if missing). Loss: Bradley-Terry. Reports held-out accuracy on
noisy labels and on clean gold labels, then normalises the RM to mean 0 / std 1 on SFT samples and saves
out_dir/rm.pt (ensemble members 1.. as rm_1.pt, ...).
"""
import json
import os
import random
import statistics

import torch
from tqdm import tqdm

from minirlhf import dist
from minirlhf.checkpoint import atomic_write_json, load_model, save_model
from minirlhf.data import encode_prompts, encode_responses, gold_label
from minirlhf.reward import Ensemble, bt_loss, normalize, pairwise_accuracy, reward_model_from, score_any
from minirlhf.runtime import Metrics, autocast, check_finite, clip_and_check, cosine_lr, main, setup, write_summary
from minirlhf.sources import get_source
from train_sft import ensure_sft, sample


def encode_pairs(tok, prompts, chosen, rejected, cfg, device):
    """One batch holding the chosen responses then the rejected ones: (prompt, prompt_mask, resp, resp_mask)."""
    p, pm = encode_prompts(tok, list(prompts) * 2, device, max_len=cfg.block_size - cfg.max_new_tokens)
    r, rm = encode_responses(tok, list(chosen) + list(rejected), cfg.max_new_tokens, device)
    return p, pm, r, rm


def pair_rewards(rm, tok, prompts, chosen, rejected, cfg, device):
    """(r(x, y_w), r(x, y_l)), each (B,), from one forward over 2B sequences."""
    r = score_any(rm, *encode_pairs(tok, prompts, chosen, rejected, cfg, device))
    return r[:len(prompts)], r[len(prompts):]


@torch.no_grad()
def rm_accuracy(rm, tok, pairs, cfg, device, batch=256):
    """Pairwise accuracy of rm on [(prompt, chosen, rejected)]."""
    rc, rr = zip(*(pair_rewards(rm, tok, *zip(*pairs[i:i + batch]), cfg, device)
                   for i in range(0, len(pairs), batch)))
    return pairwise_accuracy(torch.cat(rc), torch.cat(rr))


def sample_pairs(policy, source, prompts, cfg, device, generator, temperature=None):
    """Two samples of the policy for each prompt; pairs of identical responses are dropped."""
    a, b = [], []
    for i in range(0, len(prompts), 256):
        a += sample(policy, source, prompts[i:i + 256], cfg, device, generator, temperature)
        b += sample(policy, source, prompts[i:i + 256], cfg, device, generator, temperature)
    return [(p, x, y) for p, x, y in zip(prompts, a, b) if x != y]


def gold_labelled(task, pairs, cfg, rng, noisy=True):
    """[(prompt, chosen, rejected)] by the gold labeller (noisy) or by the sign of the gold difference (clean,
    ties dropped)."""
    out = []
    for p, a, b in pairs:
        if noisy:
            a_wins = gold_label(task, p, a, b, cfg.label_tau, cfg.label_flip, rng)
        else:
            ga, gb = task.gold(p, a), task.gold(p, b)
            if ga == gb:
                continue
            a_wins = ga > gb
        out.append((p, a, b) if a_wins else (p, b, a))
    return out


def preference_data(sft, source, cfg, device):
    """Training pairs D, held-out pairs (noisy and clean labels) and the SFT samples used for normalisation."""
    if not source.has_gold:
        held = source.held_out_pairs
        return source.train_pairs, held, [], [c for _, c, _ in source.train_pairs[:512]]
    task, rng = source.task, random.Random(cfg.seed + 10)
    gen = torch.Generator(device).manual_seed(cfg.seed + 10)
    train = sample_pairs(sft, source, task.sample_prompts(cfg.rm_pairs, rng, "pref"), cfg, device, gen)
    held = sample_pairs(sft, source, task.sample_prompts(max(64, cfg.rm_pairs // 4), rng, "eval"), cfg, device, gen)
    return (gold_labelled(task, train, cfg, rng), gold_labelled(task, held, cfg, rng),
            gold_labelled(task, held, cfg, rng, noisy=False), [a for _, a, _ in train])


def bt_step(rm, opt, tok, batch, cfg, device):
    """The plain step: Bradley-Terry loss on a batch of labelled pairs (with torchrun: this rank's slice of it,
    weighted so that the summed gradient is the global batch's)."""
    local = dist.shard(batch)
    rc, rr = pair_rewards(rm, tok, *zip(*local), cfg, device)
    loss = bt_loss(rc, rr) * len(local) / len(batch)
    check_finite(loss, "RM", 0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    dist.sync_grads(rm.parameters())
    clip_and_check(rm.parameters(), cfg.grad_clip, "RM", 0)
    opt.step()
    return {"loss": dist.all_sum(loss.item()), "acc": pairwise_accuracy(rc, rr)}


def train_reward_model(sft, tok, pairs, cfg, device, seed, epochs=None, step_fn=bt_step, aux=None, desc="rm"):
    """A fresh RM from the SFT weights, trained on `pairs` for `epochs`. `step_fn(rm, opt, tok, batch, cfg,
    device) -> dict` does one update: refine.py swaps in the RLP and MetaRM steps here. `aux`, a module trained
    jointly with the RM (RLP-UML's encoder and critic), is reachable as `rm.aux` and thrown away afterwards."""
    torch.manual_seed(seed)
    rm = reward_model_from(sft).to(device)
    rm.gpt.set_dropout(cfg.dropout)
    if aux is not None:
        rm.aux = aux.to(device)
    rm.train()
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.rm_lr, weight_decay=cfg.weight_decay)
    rng = random.Random(seed)
    epochs = epochs or cfg.rm_epochs
    steps_per_epoch = max(1, len(pairs) // cfg.rm_batch)
    total = epochs * steps_per_epoch
    bar = tqdm(range(total), desc=desc, mininterval=1.0, disable=not dist.is_main())
    order = []
    for step in bar:
        if step % steps_per_epoch == 0:
            order = rng.sample(pairs, len(pairs))
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, total, cfg.rm_lr, cfg.warmup)
        i = (step % steps_per_epoch) * cfg.rm_batch
        with autocast(cfg, device):
            stats = step_fn(rm, opt, tok, order[i:i + cfg.rm_batch], cfg, device)
        check_finite(stats["loss"], desc, step)
        bar.set_postfix(loss=f"{stats['loss']:.3f}")
    rm.gpt.set_dropout(0.0)
    if aux is not None:
        del rm.aux
    return rm.eval()


@torch.no_grad()
def score_texts(rm, tok, prompts, responses, cfg, device, batch=256):
    """RM scores (N,) of (prompt, response) texts, `batch` at a time."""
    out = []
    for i in range(0, len(prompts), batch):
        p, pm = encode_prompts(tok, prompts[i:i + batch], device, max_len=cfg.block_size - cfg.max_new_tokens)
        r, rmask = encode_responses(tok, responses[i:i + batch], cfg.max_new_tokens, device)
        out.append(score_any(rm, p, pm, r, rmask))
    return torch.cat(out)


def normalize_on(rm, tok, prompts, responses, cfg, device):
    """normalize() on the RM's scores of (prompt, response) SFT samples."""
    return normalize(rm, score_texts(rm, tok, prompts, responses, cfg, device))


def run(cfg):
    device = setup(cfg)
    source = get_source(cfg)
    tok = source.tokenizer
    sft = ensure_sft(cfg).to(device).eval()
    train, held_noisy, held_clean, sft_samples = preference_data(sft, source, cfg, device)
    norm_prompts = [p for p, _, _ in train][:len(sft_samples)]
    atomic_write_json(dict(train=train, held_noisy=held_noisy, held_clean=held_clean, norm_prompts=norm_prompts,
                           sft_samples=sft_samples), os.path.join(cfg.out_dir, "preferences.json"))
    print(f"RM: {len(train)} training pairs, {len(held_noisy)} held-out pairs")
    metrics, results = Metrics(cfg.out_dir, "rm"), []
    for k in range(cfg.ensemble):
        rm = train_reward_model(sft, tok, train, cfg, device, seed=cfg.seed + 1000 * k, desc=f"rm{k}")
        res = {"held_out_acc_noisy": rm_accuracy(rm, tok, held_noisy, cfg, device)}
        if held_clean:
            res["held_out_acc_gold"] = rm_accuracy(rm, tok, held_clean, cfg, device)
        res["norm_mean"], res["norm_std"] = normalize_on(rm, tok, norm_prompts, sft_samples, cfg, device)
        save_model(os.path.join(cfg.out_dir, "rm.pt" if k == 0 else f"rm_{k}.pt"), rm, source=source.name)
        metrics.log(member=k, **res)
        results.append(res)
        print(f"RM {k}: " + ", ".join(f"{key} {v:.3f}" for key, v in res.items()))
    dist.barrier()  # every rank reads rm.pt next
    summary = {key: statistics.mean(r[key] for r in results) for key in results[0]}
    summary.update(train_pairs=len(train), held_out_pairs=len(held_noisy), members=results)
    if source.has_gold:  # the shift the project is about: accuracy on a deliberately shifted policy's pairs
        gen = torch.Generator(device).manual_seed(cfg.seed + 20)
        prompts = source.task.sample_prompts(max(64, cfg.rm_pairs // 4), random.Random(cfg.seed + 20), "eval")
        hot = gold_labelled(source.task, sample_pairs(sft, source, prompts, cfg, device, gen, temperature=1.5),
                            cfg, None, noisy=False)
        summary["shifted_acc_gold_T1.5"] = rm_accuracy(load_rms(cfg, device), tok, hot, cfg, device)
        print(f"gold-label accuracy on pairs of SFT samples {summary['held_out_acc_gold']:.3f} vs on pairs from a "
              f"shifted (T=1.5) sampler {summary['shifted_acc_gold_T1.5']:.3f}")
    write_summary(cfg, "rm", summary)
    return summary


def load_preferences(cfg):
    """The preference data D that train_rm.py used (refine.py retrains on exactly the same pairs)."""
    with open(os.path.join(cfg.out_dir, "preferences.json")) as f:
        prefs = json.load(f)
    return {k: [tuple(x) for x in v] if k in ("train", "held_noisy", "held_clean") else v for k, v in prefs.items()}


def load_rms(cfg, device):
    """The proxy RM of out_dir (an Ensemble when cfg.ensemble > 1); pairwise_accuracy & co. accept either."""
    paths = [os.path.join(cfg.out_dir, "rm.pt" if k == 0 else f"rm_{k}.pt") for k in range(cfg.ensemble)]
    rms = [load_model(p, scalar=True)[0].to(device).eval() for p in paths]
    return rms[0] if cfg.ensemble == 1 else Ensemble(rms, cfg.ensemble_agg)


def ensure_rm(cfg, device):
    """The proxy RM(s) of out_dir, training them (and SFT) first if missing."""
    if not os.path.exists(os.path.join(cfg.out_dir, "rm.pt" if cfg.ensemble == 1 else f"rm_{cfg.ensemble - 1}.pt")):
        run(cfg)
    return load_rms(cfg, device)


if __name__ == "__main__":
    main(run)
