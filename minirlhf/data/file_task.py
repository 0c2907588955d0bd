"""A preference file as a task with a learned gold judge (Gao et al. 2022; ALGORITHMS.md §4.1).

Real text has no known truth, so a *gold RM* plays the human: an RM trained on every preference
pair of the file's training part (or loaded with --gold_rm=PATH), normalised to mean 0 / std 1 on
SFT samples. From then on the file is run exactly like an embedded task: the proxy RM learns from
a small budget of pairs of SFT samples on 'pref' prompts, labelled by the gold RM through the same
Bradley-Terry labeller, and PPO, best-of-n and every refinement are judged by the gold RM.

What such a judge can tell: whether optimising the proxy buys what a better-informed RM of the same
data prefers, i.e. over-optimisation of a small proxy against a larger one. What it cannot: whether
a human would agree; the gold RM has its own blind spots, which the policy may find too.
"""
import os
import zlib

from ..model import load_model, save_model
from ..plumbing import seeds
from ..plumbing.config import UsageError, made_with
from ..plumbing.runtime import write_summary
from ..rm import fit_rm, normalize_on, rm_accuracy, sample_pairs, score_responses
from .batches import Batcher
from .hh import DataError
from .tasks import split_of


def prompt_splits(name, pairs):
    """The file's distinct prompts (each dialogue up to its last shared '\\n\\nAssistant:'), split
    into pref / unlabelled / eval by the stable hash the embedded tasks use ('sft': all)."""
    prompts = sorted({p for p, _, _ in pairs})
    splits = {"sft": prompts, "pref": [], "unlabelled": [], "eval": []}
    for p in prompts:
        splits[split_of(p)].append(p)
    for split, part in splits.items():
        if not part:
            raise DataError(f"{name}: no prompt falls in the '{split}' split ({len(prompts)} "
                            "distinct prompts; the pipeline needs a few dozen)")
    return splits


class FileTask:
    """A file's prompts (`prompt_splits`), judged by `gold_rm`: the interface of an embedded task
    (tasks.py) that the RL stages use. SFT needs no demonstrator: it imitates the file's chosen
    responses (sources.FileSource)."""
    semantic_key = None  # no key on free text: RLP-SPG clusters by similarity instead

    def __init__(self, name, splits, gold_rm, batcher):
        self.name, self.splits, self.gold_rm, self.batcher = name, splits, gold_rm, batcher

    def sample_prompts(self, n, rng, split):
        pool = self.splits[split]
        return [rng.choice(pool) for _ in range(n)]

    def golds(self, prompts, responses):
        return score_responses(self.gold_rm, self.batcher, list(prompts),
                               list(responses)).tolist()

    def gold(self, prompt, response):
        return self.golds([prompt], [response])[0]

    def text(self, response):
        """A response as a person reads it (a sampled one's token ids decoded)."""
        return self.batcher.tok.text(response)

    @staticmethod
    def prompt_key(prompt):
        """A dialogue's key: a hash of its text (short enough to keep one per evaluation prompt)."""
        return f"{zlib.crc32(prompt.encode()):08x}"


def gold_rm_path(out_dir):
    return os.path.join(out_dir, "gold_rm.pt")


def train_gold_rm(cfg, source, sft, batcher):
    """The gold RM: from the SFT weights, Bradley-Terry on every training pair of the file, its
    accuracy on the file's held-out pairs, normalised on SFT samples of 'pref' prompts."""
    device = batcher.device
    gold = fit_rm(sft, source.train_pairs, cfg, batcher, seed=seeds.stream(cfg.seed, seeds.GOLD_RM),
                  desc="gold rm")
    summary = {"train_pairs": len(source.train_pairs),
               "held_out_acc": rm_accuracy(gold, batcher, source.held_out_pairs)}
    rng, gen = seeds.generators(device, cfg.seed, seeds.GOLD_RM)
    prompts = FileTask(source.name, source.splits, gold, batcher).sample_prompts(256, rng, "pref")
    pairs = sample_pairs(sft, batcher, prompts, cfg.temperature, gen)
    normalize_on(gold, batcher, [p for p, _, _ in pairs], [a for _, a, _ in pairs])
    save_model(gold_rm_path(cfg.out_dir), gold, source=source.name, config=made_with(cfg, "sft"))
    write_summary(cfg, "gold_rm", summary)
    print(f"gold RM: {summary['train_pairs']} pairs of the file, accuracy on its "
          f"{len(source.held_out_pairs)} held-out pairs {summary['held_out_acc']:.3f}")
    return gold


def load_gold_rm(cfg, source):
    """--gold_rm, or out_dir's gold RM (None when there is none yet), read before SFT trains, so
    that one made under other settings, or of another vocabulary than this run's tokenizer, is
    refused before any work."""
    path = cfg.gold_rm or gold_rm_path(cfg.out_dir)
    if not os.path.exists(path):
        return None
    expect = None if cfg.reuse or cfg.gold_rm else made_with(cfg, "sft")
    gold = load_model(path, scalar=True, expect=expect)[0]
    vocab = gold.gpt.cfg.vocab_size
    if vocab != source.tokenizer.vocab_size:
        named = f"--gold_rm={path}" if cfg.gold_rm else path
        raise UsageError(f"{named}: its vocabulary ({vocab} tokens) is not this run's "
                         f"tokenizer's ({source.tokenizer.vocab_size}): train it with the same "
                         "--tokenizer")
    return gold


def attach_gold_rm(cfg, source, sft, gold, device):
    """Make `gold` (load_gold_rm's; trained from `sft` first when None) the judge of `source`,
    its task: every later stage then runs as on an embedded task."""
    batcher = Batcher.of(cfg, source.tokenizer, device)
    gold = train_gold_rm(cfg, source, sft, batcher) if gold is None else gold.to(device).eval()
    source.task = FileTask(source.name, source.splits, gold, batcher)
