"""Stage 1 of RLHF: supervised fine-tuning on demonstrations.

    python train_sft.py                     # the embedded `reviews` task, CPU-sized
    python train_sft.py --preset=smoke      # seconds
    python train_sft.py --task=arith --sft_steps=800

Next-token loss on the response tokens only (prompt tokens masked), EOS appended to every demonstration.
Writes out_dir/sft.pt (atomically), tokenizer.json, metrics.jsonl and summary.json.
"""
import os
import random
import statistics

import torch
from tqdm import tqdm

from minirlhf import dist
from minirlhf.checkpoint import atomic_save, load, load_model, save_model
from minirlhf.data import decode_responses, encode_prompts, encode_responses
from minirlhf.generate import generate, sequence_logprobs
from minirlhf.model import GPT, GPTConfig
from minirlhf.runtime import (Metrics, autocast, check_finite, clip_and_check, cosine_lr, main, print_table, setup,
                              write_summary)
from minirlhf.sources import get_source


def build_policy(cfg, source):
    return GPT(GPTConfig(vocab_size=source.tokenizer.vocab_size, n_positions=source.n_positions,
                         n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, dropout=cfg.dropout))


def sft_loss(model, tok, prompts, responses, max_new_tokens, device):
    """(summed negative log-likelihood, number) of the response tokens (EOS included); prompt tokens masked.
    The caller divides by the token count of the *global* batch (equal to this one on a single process)."""
    p, pm = encode_prompts(tok, prompts, device, max_len=model.cfg.n_positions - max_new_tokens)
    r, rm = encode_responses(tok, responses, max_new_tokens, device)
    logp = sequence_logprobs(model, p, pm, r, rm)  # (B, N), 0 on padding
    return -logp.sum(), rm.sum().item()


@torch.no_grad()
def sample(model, source, prompts, cfg, device, generator=None, temperature=None):
    """Responses (text) of the model to `prompts`, pure sampling at cfg.temperature."""
    tok = source.tokenizer
    p, pm = encode_prompts(tok, prompts, device, max_len=model.cfg.n_positions - cfg.max_new_tokens)
    r, _, rm = generate(model, p, pm, cfg.max_new_tokens, tok.eos_id, tok.pad_id,
                        temperature=temperature or cfg.temperature, generator=generator)
    return decode_responses(tok, r, rm)


def run(cfg):
    device = setup(cfg)
    source = get_source(cfg)
    tok = source.tokenizer
    os.makedirs(cfg.out_dir, exist_ok=True)
    if dist.is_main():
        tok.save(os.path.join(cfg.out_dir, "tokenizer.json"))
    model = build_policy(cfg, source).to(device)
    print(f"SFT: {source.name}, {model.num_params() / 1e6:.2f}M parameters, {cfg.sft_steps} steps x {cfg.sft_batch}")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    state_path, start = os.path.join(cfg.out_dir, "sft_state.pt"), 0
    if cfg.resume and os.path.exists(state_path):
        state = load(state_path)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        print(f"resumed {state_path} at step {start}")
    metrics = Metrics(cfg.out_dir, "sft", keep_steps=start)
    model.train()
    for step in tqdm(range(start, cfg.sft_steps), desc="sft", mininterval=1.0, initial=start, total=cfg.sft_steps,
                     disable=not dist.is_main()):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, cfg.sft_steps, cfg.sft_lr, cfg.warmup)
        # each step's data derives from (seed, step) alone, so a resumed run sees exactly the same batches
        # (with torchrun each rank takes its slice of that global batch)
        demos = source.demonstrations(cfg.sft_batch, random.Random(cfg.seed * 1_000_003 + step))
        prompts, responses = zip(*dist.shard(demos))
        with autocast(cfg, device):
            nll, n_tokens = sft_loss(model, tok, prompts, responses, cfg.max_new_tokens, device)
            loss = nll / dist.all_sum(n_tokens)
        check_finite(loss, "SFT", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.sync_grads(model.parameters())
        clip_and_check(model.parameters(), cfg.grad_clip, "SFT", step)
        opt.step()
        metrics.log(step=step, loss=dist.all_sum(loss.item()), lr=opt.param_groups[0]["lr"])
        if (step + 1) % cfg.ckpt_every == 0:
            atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, state_path)
    model.eval()
    path = os.path.join(cfg.out_dir, "sft.pt")
    save_model(path, model, source=source.name)
    dist.barrier()  # the other ranks read sft.pt next
    if not dist.is_main():
        return path
    final_loss = metrics.rows()[-1]["loss"]
    summary = {"final_loss": final_loss, "params": model.num_params()}
    if source.has_gold:  # compare the SFT policy with the demonstrator it imitates, on held-out prompts
        eval_rng = random.Random(cfg.seed + 1)
        prompts = source.task.sample_prompts(cfg.eval_prompts, eval_rng, "eval")
        demos = [source.task.demonstrate(p, eval_rng) + " " + tok.decode([tok.eos_id]) for p in prompts]
        samples = sample(model, source, prompts, cfg, device, torch.Generator(device).manual_seed(cfg.seed))
        gold = [source.task.gold(p, s) for p, s in zip(prompts, samples)]
        summary.update(sft_gold=statistics.mean(gold),
                       demo_gold=statistics.mean(source.task.gold(p, d) for p, d in zip(prompts, demos)))
        print(f"gold reward on {len(prompts)} held-out prompts: SFT policy {summary['sft_gold']:.3f}, "
              f"demonstrator {summary['demo_gold']:.3f}")
        print_table([dict(prompt=p, response=s, gold=g) for p, s, g in list(zip(prompts, samples, gold))[:6]],
                    ["prompt", "response", "gold"])
    write_summary(cfg, "sft", summary)
    print(f"saved {path} (final loss {final_loss:.3f})")
    return path


def ensure_sft(cfg):
    """The SFT checkpoint of this out_dir, training it first if it is missing."""
    path = os.path.join(cfg.out_dir, "sft.pt")
    if not os.path.exists(path):
        run(cfg)
    return load_model(path)[0]


if __name__ == "__main__":
    main(run)
