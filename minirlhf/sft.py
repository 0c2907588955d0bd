"""Stage 1 of RLHF: supervised fine-tuning on demonstrations (ALGORITHMS.md §1.1).

Next-token loss on the response tokens only (prompt tokens masked), EOS appended to every
demonstration. Writes out_dir/sft.pt (atomically), tokenizer.json, metrics.jsonl and summary.json.
"""
import os
import random
import statistics

from tqdm import tqdm

from .data.batches import Batcher
from .data.tokenizer import fits_vocabulary
from .generate import sample_responses, sequence_logprobs
from .model import GPT, GPTConfig, load_model, save_model
from .plumbing import dist, seeds
from .plumbing.checkpoint import atomic_save, load
from .plumbing.config import made_with
from .plumbing.runtime import (Metrics, adamw, autocast, check_finite, clip_and_check, cosine_lr,
                               print_table, write_summary)


def build_policy(cfg, source):
    """A fresh GPT of the config's size, or the --init_from checkpoint with rows for the
    tokenizer's appended special tokens."""
    vocab = source.tokenizer.vocab_size
    if cfg.init_from:
        model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout)
        fits_vocabulary(model.cfg.vocab_size, source.tokenizer, f"--init_from={cfg.init_from!r}")
        return model.resize_vocab(vocab)
    return GPT(GPTConfig(vocab_size=vocab, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                         n_layer=cfg.n_layer, n_head=cfg.n_head, dropout=cfg.dropout))


def sft_loss(model, batcher, prompts, responses):
    """(summed negative log-likelihood, number) of the response tokens (EOS included); prompt
    tokens masked. The caller divides by the token count of the *global* batch (equal to this one
    on a single process)."""
    p, pm, r, r_mask = batcher.batch(prompts, responses)
    logp = sequence_logprobs(model, p, pm, r, r_mask)  # (B, N), 0 on padding
    return -logp.sum(), r_mask.sum().item()


def train_sft(cfg, source, device):
    """SFT from scratch (or from out_dir/sft_state.pt with --resume); saves and
    returns the policy."""
    tok = source.tokenizer
    batcher = Batcher.of(cfg, tok, device)
    made, state_path = made_with(cfg, "sft"), os.path.join(cfg.out_dir, "sft_state.pt")
    state = (load(state_path, expect=None if cfg.reuse else made, fields=("model", "opt", "step"))
             if cfg.resume and os.path.exists(state_path) else None)
    if dist.is_main():
        os.makedirs(cfg.out_dir, exist_ok=True)
        tok.save(os.path.join(cfg.out_dir, "tokenizer.json"))
    model = build_policy(cfg, source).to(device)
    print(f"SFT: {source.name}, {model.num_params() / 1e6:.2f}M parameters, "
          f"{cfg.sft_steps} steps x {cfg.sft_batch}")
    opt = adamw(model.parameters(), lr=cfg.sft_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"resumed {state_path} at step {start}")
    metrics = Metrics(cfg.out_dir, "sft", keep_steps=start, tensorboard=cfg.tensorboard)
    model.train()
    for step in tqdm(range(start, cfg.sft_steps), desc="sft", mininterval=1.0, initial=start,
                     total=cfg.sft_steps, disable=not dist.is_main()):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.sft_steps, cfg.sft_lr, cfg.warmup)
        # each step's data derives from (seed, step) alone, so a resumed run sees exactly the same
        # batches (with torchrun each rank takes its slice of that global batch)
        demos = source.demonstrations(cfg.sft_batch,
                                      random.Random(seeds.stream(cfg.seed, seeds.SFT_STEP, step)))
        prompts, responses = zip(*dist.shard(demos))
        with autocast(cfg, device):
            nll, n_tokens = sft_loss(model, batcher, prompts, responses)
            loss = nll / dist.all_sum(n_tokens)
        check_finite(loss, "SFT", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.sync_grads(model.parameters())
        clip_and_check(model.parameters(), cfg.grad_clip, "SFT", step)
        opt.step()
        metrics.log(step=step, loss=dist.all_sum(loss.item()), lr=opt.param_groups[0]["lr"])
        if (step + 1) % cfg.ckpt_every == 0:
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                         "config": made}, state_path)
    model.eval()
    path = os.path.join(cfg.out_dir, "sft.pt")
    save_model(path, model, source=source.name, config=made)
    dist.barrier()  # the other ranks read sft.pt next
    if dist.is_main():
        summarize_sft(cfg, source, model, metrics, device)
        print(f"saved {path}")
    return model


def summarize_sft(cfg, source, model, metrics, device):
    """summary.json's 'sft' entry: the final loss and, on an embedded task, the SFT policy's gold
    next to the demonstrator's it imitates, on held-out prompts."""
    tok = source.tokenizer
    summary = {"final_loss": metrics.rows()[-1]["loss"], "params": model.num_params()}
    if source.has_gold:
        eval_rng = random.Random(seeds.stream(cfg.seed, seeds.SFT_EVAL))
        prompts = source.task.sample_prompts(cfg.eval_prompts, eval_rng, "eval")
        demos = [source.task.demonstrate(p, eval_rng) + " " + tok.decode([tok.eos_id])
                 for p in prompts]
        batcher = Batcher.of(cfg, tok, device)
        samples = sample_responses(model, batcher, prompts, cfg.temperature,
                                   seeds.generators(device, cfg.seed, seeds.SFT_EVAL, 1)[1])
        gold = source.task.golds(prompts, samples)
        summary.update(sft_gold=statistics.mean(gold),
                       demo_gold=statistics.mean(source.task.golds(prompts, demos)))
        print(f"gold reward on {len(prompts)} held-out prompts: "
              f"SFT policy {summary['sft_gold']:.3f}, demonstrator {summary['demo_gold']:.3f}")
        print_table([dict(prompt=p, response=tok.text(s), gold=g)
                     for p, s, g in list(zip(prompts, samples, gold))[:6]],
                    ["prompt", "response", "gold"])
    print(f"SFT final loss {summary['final_loss']:.3f}")
    write_summary(cfg, "sft", summary)


def ensure_sft(cfg, source, device):
    """The SFT policy of out_dir, trained first if sft.pt is missing; one made under other settings
    is refused unless --reuse=True."""
    path = os.path.join(cfg.out_dir, "sft.pt")
    if not os.path.exists(path):
        return train_sft(cfg, source, device)
    return load_model(path,
                      expect=None if cfg.reuse else made_with(cfg, "sft"))[0].to(device).eval()
