"""bench.py's options: which table or peer comparison runs, and its shapes."""
from dataclasses import dataclass

from ..plumbing.config import PPO, SFT, Model, Run


@dataclass
class Bench:
    title = "benchmark"  # the --help section of these options (no annotation: not an option)
    sizes: str = "default,gpt2-small"
    """The default table's model sizes, comma-separated: 'default' (the default preset's model),
    'gpt2-small'."""
    only: str = ""
    """'' (the default table), 'ppo' or 'generate': one JSON line comparable with ../shared/peers'
    TRL PPO and HF generate scripts; 'report-seed': every method of the report on tuning seed
    --seed of --task under --preset, its core-minutes per method and where they go (JSON)."""
    vocab: int = 256
    """--only=ppo: vocabulary of the random-weight GPT-2 (--n_layer, --n_embd, --n_head size it)."""
    batch: int = 64
    """--only=ppo: prompts per iteration (minibatch: a quarter of them)."""
    prompt_len: int = 16
    """--only=ppo: prompt length (random tokens, no padding)."""
    new_tokens: int = 48
    """--only=ppo and generate: tokens sampled per row (no stop)."""
    reps: int = 3
    """--only=ppo: timed iterations; --only=generate: timed calls (each after one untimed)."""
    weights: str = ""
    """--only=generate: the folder `hf_generate.py --save_dir DIR` wrote (GPT-2 weights and
    prompts.pt)."""
    json: bool = False
    """--only: print only the JSON line (the progress of the run goes nowhere)."""


@dataclass
class BenchConfig(Bench, PPO, SFT, Model, Run):
    pass
