"""Stage 3 of RLHF: PPO against the proxy RM, judged by the gold reward. The project's main job
(minirlhf/ppo_trainer.py).

    python train_ppo.py                         # SFT -> proxy RM -> PPO on `reviews`, then the
                                                # final table
    python train_ppo.py --iters=300             # long enough to watch gold peak and fall while
                                                # the proxy rises
    python train_ppo.py --method=bon            # best-of-n against the proxy, n = 1 ... 256
    python train_ppo.py --resume=True           # continue a killed run from out_dir/ppo.pt
    python train_ppo.py --export=tuned          # the final policy as a Hugging Face folder
    python train_ppo.py --tensorboard=True      # watch it: tensorboard --logdir=out/tensorboard

Reuses out_dir/sft.pt and rm.pt when present and made under the same settings
(trains them otherwise).
"""

from minirlhf.evaluate import summarize
from minirlhf.pipeline import prepare_rl
from minirlhf.plumbing import dist
from minirlhf.plumbing.config import PPOConfig, UsageError
from minirlhf.plumbing.export import export_policy
from minirlhf.plumbing.runtime import main, print_table, write_summary
from minirlhf.plumbing.validate import validate
from minirlhf.ppo_trainer import best_of_n_baseline, train_ppo


def run(cfg):
    device, source, sft, rm = prepare_rl(cfg)
    if cfg.export_sft and dist.is_main():
        export_policy(sft, source.tokenizer, cfg.export_sft, cfg)
    if cfg.method == "bon":
        rows = best_of_n_baseline(cfg, source, sft, rm, device)
        print_table(rows, ["n", "kl", "proxy", "gold"])
        write_summary(cfg, "bon", {"curve": rows})
        return rows
    policy, history = train_ppo(cfg, source, sft, rm, device)
    if not dist.is_main():
        return None
    if cfg.export:
        export_policy(policy, source.tokenizer, cfg.export, cfg)
    summary = summarize(history)
    write_summary(cfg, "ppo", summary)
    print("\n=== SFT vs PPO, judged by the gold reward on held-out prompts ===")
    print_table([dict(policy=name, iter=h["iter"], gold=h["eval/gold"], proxy=h["eval/proxy"],
                      kl=h["eval/kl"], win_rate=h["eval/win_rate"], length=h["eval/length"],
                      rm_acc=h["eval/rm_acc_policy_pairs"], proxy_diff_std=h["eval/proxy_diff_std"])
                 for name, h in (("SFT", summary["sft"]), ("PPO final", summary["final"]),
                                 ("PPO peak gold", summary["peak_gold"]))],
                ["policy", "iter", "gold", "proxy", "kl", "win_rate", "length", "rm_acc",
                 "proxy_diff_std"])
    print("(win_rate: gold win-rate vs SFT samples, ties 1/2; rm_acc: proxy accuracy on "
          "gold-labelled pairs of the policy's own samples)")
    return summary


def check(cfg):
    validate(cfg, methods=("ppo", "bon"))
    if cfg.method == "bon" and dist.under_torchrun():
        raise UsageError("--method=bon runs on one process (not under torchrun)")
    if cfg.method == "bon" and cfg.export:
        raise UsageError(f"--export={cfg.export!r}: --method=bon trains no policy (--export_sft "
                         "writes the SFT policy it samples)")


if __name__ == "__main__":
    main(run, PPOConfig, check)
