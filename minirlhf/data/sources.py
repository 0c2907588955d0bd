"""Where training text comes from: an embedded task (with a gold judge) or an
HH-RLHF-style file (whose gold judge, a gold RM, is attached once SFT exists: file_task.py)."""
import os

from .file_task import prompt_splits
from .hh import load_hh_pairs
from .tasks import get_task
from .tokenizer import Tokenizer, gpt2_bpe, train_bpe


class TaskSource:
    """An embedded task: unlimited demonstrations, gold labels, gold evaluation."""
    has_gold = True

    def __init__(self, cfg):
        self.task = get_task(cfg.task)
        self.name = self.task.name
        self.tokenizer = self.task.tokenizer

    def demonstrations(self, n, rng):
        return [(p, self.task.demonstrate(p, rng)) for p in self.task.sample_prompts(n, rng, "sft")]


class FileSource:
    """HH-RLHF-style pairs from a file: SFT imitates the chosen responses; the last 10% of pairs are
    held out, the rest train the gold RM, which becomes `task` (file_task.attach_gold_rm)."""
    task = None

    @property
    def has_gold(self):
        return self.task is not None

    def __init__(self, cfg, new_sft=False):
        pairs = load_hh_pairs(cfg.data)
        # too few prompts for the splits: refused here, before any work
        self.splits = prompt_splits(cfg.data, pairs)
        n_held = max(1, len(pairs) // 10)
        self.train_pairs, self.held_out_pairs = pairs[:-n_held], pairs[-n_held:]
        self.name = os.path.basename(cfg.data)
        saved = os.path.join(cfg.out_dir, "tokenizer.json")
        # the stages after SFT must reuse the exact vocabulary it was trained with; a new SFT
        # (and one left by a run that trained nothing) builds it from the options
        resuming = cfg.resume and os.path.exists(os.path.join(cfg.out_dir, "sft_state.pt"))
        trained = not new_sft and os.path.exists(os.path.join(cfg.out_dir, "sft.pt"))
        if (resuming or trained) and os.path.exists(saved):
            self.tokenizer = Tokenizer.load(saved)
        elif cfg.tokenizer:
            self.tokenizer = gpt2_bpe(os.path.join(cfg.tokenizer, "vocab.json"),
                                      os.path.join(cfg.tokenizer, "merges.txt"))
        else:
            self.tokenizer = train_bpe((t for pair in pairs for t in pair), cfg.bpe_vocab)

    def demonstrations(self, n, rng):
        return [(p, c) for p, c, _ in (rng.choice(self.train_pairs) for _ in range(n))]


def get_source(cfg, new_sft=False):
    """The run's source of text; `new_sft`: train_sft.py, which trains SFT anew (unless
    resuming)."""
    return FileSource(cfg, new_sft) if cfg.data else TaskSource(cfg)
