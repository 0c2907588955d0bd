"""Configs per stage: dataclasses with a docstring per field, presets, and `--key=value` overrides.

Each group below holds one stage's fields. A script's config is the union of the groups it uses
(train_ppo.py trains SFT and the RM first when they are missing, so it takes their groups too);
`--help` lists the script's own group first. Values are parsed with `ast.literal_eval`
(never exec/eval), type-checked against the field, and the whole config is validated (`validate`)
before any work starts.
"""
import ast
import inspect
import sys
from dataclasses import dataclass, fields, replace


class UsageError(ValueError):
    """A bad option: the message names it; the script exits with code 2 before doing any work."""


@dataclass
class Run:
    title = "run"  # the --help section of these options (no annotation: not an option)
    out_dir: str = "out"
    """Folder for checkpoints, metrics.jsonl and summary.json (shared by all stages of one run)."""
    task: str = "reviews"
    """Embedded task: 'reviews' or 'arith'."""
    seed: int = 0
    """Seed for data, initialisation and sampling."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    bf16: bool = True
    """Use bfloat16 autocast when running on CUDA (ignored on CPU)."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default."""
    resume: bool = False
    """Continue from the last checkpoint in out_dir instead of starting fresh."""
    reuse: bool = False
    """Reuse checkpoints in out_dir even when they were made with different settings
    (normally an error)."""
    ckpt_every: int = 100
    """SFT steps between resumable checkpoints (PPO checkpoints every --eval_every iterations of
    the run, and at its end)."""
    preset: str = "default"
    """'smoke' (seconds, for tests), 'default' (the CPU run), 'report' (experiments.py's multi-seed
    run on a CPU), 'gpu' (a bigger model for one GPU) or 'gpt2' (GPT-2 small on a preference file,
    one GPU: --init_from, --tokenizer, --data)."""
    data: str = ""
    """A JSONL(.gz) preference file, {"chosen", "rejected"} HH-RLHF dialogues or {"prompt",
    "chosen", "rejected"}, judged by a gold RM trained on its pairs (ALGORITHMS.md §4.1); empty =
    the embedded task."""
    init_from: str = ""
    """A Hugging Face GPT-2 folder (config.json + pytorch_model.bin or model.safetensors) that SFT
    starts from, with --data and its --tokenizer; its sizes replace --n_layer, --n_head and
    --n_embd."""
    tokenizer: str = ""
    """With --data: a folder holding GPT-2's vocab.json + merges.txt; empty = train a
    byte-level BPE on the file."""
    bpe_vocab: int = 4096
    """With --data and no --tokenizer: vocabulary size of the BPE trained on the file."""
    tensorboard: bool = False
    """Also log every metric (the names of metrics.jsonl) to out_dir/tensorboard/<stage>, for
    `tensorboard --logdir=out_dir/tensorboard` (needs the optional tensorboard package)."""


@dataclass
class Model:
    title = "model and sampling"
    n_layer: int = 4
    """Transformer blocks."""
    n_head: int = 4
    """Attention heads (must divide --n_embd)."""
    n_embd: int = 128
    """Model width."""
    block_size: int = 64
    """Context length (prompt + response) of every model."""
    dropout: float = 0.0
    """Dropout during SFT/RM training (always off at RL time)."""
    max_new_tokens: int = 40
    """Response length limit; prompts keep their last block_size - max_new_tokens tokens."""
    temperature: float = 1.0
    """Sampling temperature of the preference pairs, PPO's rollouts (and their log-probs), the
    evaluations and best-of-n; RLP samples its P at 1, as the paper does."""
    eval_prompts: int = 256
    """Held-out prompts in each gold evaluation."""

    @property
    def prompt_room(self):
        """The room a prompt (BOS included) has in the context."""
        return self.block_size - self.max_new_tokens


@dataclass
class SFT:
    title = "SFT"
    sft_steps: int = 400
    """SFT optimizer steps."""
    sft_batch: int = 64
    """SFT batch size (demonstrations per step)."""
    sft_lr: float = 3e-3
    """SFT peak learning rate (cosine decay after warmup)."""
    warmup: int = 30
    """Linear warmup steps for SFT and RM training."""
    weight_decay: float = 0.01
    """AdamW weight decay for SFT and RM training."""
    grad_clip: float = 1.0
    """Gradient-norm clip for every optimizer."""


@dataclass
class RM:
    title = "reward model"
    rm_pairs: int = 2000
    """Gold-labelled preference pairs of SFT samples for the proxy RM (the limited human budget)."""
    rm_epochs: int = 2
    """Passes over the preference pairs."""
    rm_batch: int = 32
    """Preference pairs per RM step."""
    rm_lr: float = 5e-4
    """RM peak learning rate."""
    label_tau: float = 0.5
    """Bradley-Terry temperature of the gold labeller: P(a > b) = sigmoid((g(a) - g(b)) / tau)."""
    label_flip: float = 0.0
    """Extra probability of flipping each preference label (AlpacaFarm uses 0.25)."""
    ensemble: int = 1
    """Train this many RMs from different seeds (Coste et al.); PPO then uses their aggregate."""
    ensemble_agg: str = "mean"
    """How an ensemble's rewards combine: 'mean' or 'min' (worst case)."""
    gold_rm: str = ""
    """With --data: a gold RM checkpoint (another run's gold_rm.pt) that plays the human; empty =
    train one on every training pair of the file (out_dir/gold_rm.pt)."""


@dataclass
class PPO:
    title = "PPO"
    iters: int = 60
    """PPO iterations (one rollout batch each)."""
    rollout_batch: int = 64
    """Prompts per PPO iteration."""
    minibatch: int = 32
    """PPO minibatch size (at most --rollout_batch)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    ppo_lr: float = 1e-4
    """Policy learning rate."""
    critic_lr: float = 1e-4
    """Critic learning rate."""
    kl_coef: float = 0.01
    """KL penalty coefficient beta in r_t = -beta * (log pi - log pi_ref)."""
    kl_target: float = 0.0
    """Adaptive KL controller target (Ziegler et al.); 0 keeps beta fixed."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon."""
    clip: float = 0.2
    """PPO ratio clip epsilon."""
    vf_clip: float = 0.2
    """Value clip epsilon."""
    vf_coef: float = 0.1
    """Value loss coefficient. The critic has its own Adam optimiser, which is invariant to a
    constant scale of the loss: vf_coef only moves where --grad_clip cuts the critic's gradient.
    The critic's step size is --critic_lr."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    no_eos_penalty: float = -1.0
    """Reward given instead of the RM score to a response that never emitted EOS."""
    eval_every: int = 5
    """Evaluate with the gold judge every this many PPO iterations."""
    eval_dense: int = 0
    """Also evaluate at every iteration below this one: dense evaluations at low KL, where the
    matched-KL endpoints interpolate."""
    sample_every: int = 20
    """Print a table of samples every this many iterations."""
    bon_max: int = 256
    """Largest n in the best-of-n curve (a power of 2)."""


@dataclass
class Refine:
    title = "refinement (RLP, MetaRM)"
    refine_prompts: int = 256
    """Unlabelled prompts whose policy samples refine the RM (RLP's P, MetaRM's S_r)."""
    n_samples: int = 10
    """RLP: policy samples per unlabelled prompt (temperature 1.0)."""
    uml_lambda: float = 0.5
    """RLP-UML: weight lambda of the multi-view information-bottleneck loss L_M."""
    mib_beta: float = 1.0
    """RLP-UML: weight beta of the symmetrised KL in L_M (0 = the MVI ablation; ours,
    the paper has none)."""
    z_dim: int = 64
    """RLP-UML: size of the bottleneck representation z."""
    spg_gamma: float = 0.5
    """RLP-SPG: minimum self-consistency confidence (0 = the select-all ablation)."""
    spg_rank: str = "cluster"
    """RLP-SPG: 'cluster' (the paper) or 'rm' (ablation: RM-best vs RM-worst
    sample, no clustering)."""
    oracle_pairs: int = 2000
    """oracle-iter: at most this many clean gold-labelled policy pairs added per round; every
    refinement's RM epoch is as long as D plus this many, controls included."""
    rounds: int = 3
    """MetaRM and the iterated refinements (*-iter): rounds, each refining the RM on the current
    policy's samples and continuing PPO. Their lengths are 1, 1, 2, 2, ... parts of --iters, so
    refinement starts early and keeps up; in all they get vanilla PPO's budget."""
    meta_k: int = 5
    """MetaRM: policy samples per prompt in the difference objective."""
    meta_prompts: int = 8
    """MetaRM: prompts per meta batch X_s (k samples each)."""
    meta_eta: float = 1.0
    """MetaRM: gradient-ascent step eta on J: 1.0, and 0.01 under --preset=report, each the largest
    eta whose RM's held-out accuracy stays within one standard error of eta = 0's in `refine.py
    --method=eta-sweep` at that preset's size (ALGORITHMS.md §3). The paper's 5e-6 barely moves a
    model of our size."""
    meta_temp_delta: float = 0.2
    """MetaRM: S_r is sampled at the PPO temperature plus this ('a little above')."""
    meta_second_order: bool = False
    """MetaRM: differentiate through the inner step (not what the paper ran; slower)."""
    ood: bool = False
    """MetaRM: draw the meta prompts and the PPO prompts from the task's OOD split (D stays
    in-distribution)."""


@dataclass
class Export:
    title = "export"
    export: str = ""
    """Write the trained policy (train_sft.py: the SFT policy; train_ppo.py, refine.py: the final
    one) to this new or empty folder as a Hugging Face GPT-2 model with its tokenizer, which
    `transformers` loads with no minirlhf installed."""
    export_sft: str = ""
    """train_ppo.py, refine.py: also write the SFT policy they started from to this folder, the
    same way."""


# ---- one config per script: its own group first, then the stages it runs first when their
# outputs are missing
@dataclass
class SFTConfig(SFT, Model, Run, Export):
    pass


@dataclass
class RMConfig(RM, SFT, Model, Run):
    pass


@dataclass
class PPOConfig(PPO, RM, SFT, Model, Run, Export):
    method: str = "ppo"
    """'ppo' (PPO against the proxy RM) or 'bon' (the best-of-n curve against it)."""


@dataclass
class RefineConfig(Refine, PPO, RM, SFT, Model, Run, Export):
    method: str = "uml"
    """'uml', 'spg', 'uml+spg', 'oracle', 'control' (one RLP round each, the paper's protocol), the
    same with '-iter' (on-policy rounds; 'oracle-iter' labels all pairs cleanly), 'metarm',
    'vanilla-rounds' (MetaRM's rounds with eta = 0), 'eta-sweep', or a ceiling: 'gold-ppo',
    'big-rm'."""


# Fields that shape a stage's checkpoint (a checkpoint records them; reusing it under other values
# is an error). The rest only say how a run is carried out or judged (device, threads, evaluation
# sizes, PPO's length), or, for an ensemble, how many members there are (member k is the same RM
# whatever their number).
NOT_SHAPING = {"out_dir", "device", "bf16", "threads", "resume", "reuse", "ckpt_every", "preset",
               "eval_prompts", "iters", "eval_every", "eval_dense", "sample_every", "bon_max",
               "method", "ensemble", "ensemble_agg", "tensorboard", "export", "export_sft"}
STAGE_GROUPS = {"sft": (Run, Model, SFT), "rm": (Run, Model, SFT, RM),
                "ppo": (Run, Model, SFT, RM, PPO)}


def made_with(cfg, stage):
    """{field: value} of the settings that shape `stage`'s checkpoint ('sft', 'rm' or 'ppo'); SFT's
    does not depend on the sampling temperature."""
    names = {f.name for g in STAGE_GROUPS[stage] for f in fields(g)} - NOT_SHAPING
    if stage == "sft":
        names.discard("temperature")
    return {name: getattr(cfg, name) for name in sorted(names)}


PRESETS = {
    "smoke": dict(n_layer=2, n_head=2, n_embd=32, sft_steps=30, sft_batch=16, warmup=5, rm_pairs=64,
                  rm_epochs=1, rm_batch=16, iters=3, rollout_batch=8, minibatch=4, ppo_epochs=2,
                  eval_every=2, eval_prompts=16, sample_every=2, max_new_tokens=24, bon_max=8,
                  rounds=2),
    "default": {},
    # experiments.py's multi-seed report on 2 CPU cores: half the rollout (same optimizer steps per
    # iteration), 40 iterations, a scarce human budget D of 300 pairs (with 1,000, retraining alone
    # held the iterated control up and on-policy labels had little room: docs/protocol.md). The
    # v2 evaluation: 512 held-out prompts x 2 samples, every iteration below 6 (low KL), then
    # every 5; 8 rounds of 3, 3, 5, 6, 6, 6, 5, 6 iterations. MetaRM's eta by the sweep rule on
    # tuning seeds 102-109 of both tasks (the record is in results/pilot/tuning/).
    "report": dict(rollout_batch=32, minibatch=16, iters=40, eval_prompts=512, eval_dense=6,
                   rm_pairs=300, rounds=8, meta_eta=0.01),
    "gpu": dict(n_layer=12, n_head=12, n_embd=768, sft_steps=2000, sft_batch=64, sft_lr=3e-4,
                rm_lr=5e-5, rm_pairs=2000, ppo_lr=1e-5, critic_lr=1e-5, rollout_batch=256,
                minibatch=64),
    # GPT-2 small (--init_from) on an HH-RLHF-style file, one GPU of 24 GB, bf16: dialogues keep
    # their last 256 tokens, answers get 128; pretrained weights want small learning rates
    "gpt2": dict(block_size=384, max_new_tokens=128, sft_steps=1000, sft_batch=16, sft_lr=1e-5,
                 warmup=50, rm_pairs=2000, rm_epochs=1, rm_batch=16, rm_lr=1e-5, iters=200,
                 rollout_batch=64, minibatch=8, ppo_lr=1e-6, critic_lr=1e-5, eval_prompts=256,
                 eval_every=10, bon_max=64, refine_prompts=128),
}


def field_docs(cls):
    """{field: docstring} of a dataclass and its bases, read from the string literal
    after each field."""
    docs = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        body = ast.parse(inspect.getsource(klass)).body[0].body
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)):
                docs[stmt.target.id] = nxt.value.value
    return docs


def print_help(cls, script):
    """The script's options, grouped by stage, its own stage first, with the
    defaults it really uses."""
    docs, defaults = field_docs(cls), parse_args([], cls)
    titles = {g: g.title for g in cls.__mro__ if "title" in vars(g)}
    grouped = {f.name for g in titles for f in fields(g)}
    print(f"usage: python {script} [--key=value ...]   "
          "(values are Python literals; a bare word is a string)")
    sections = [("options of this script", [f.name for f in fields(cls) if f.name not in grouped])]
    sections += [(titles[g], [f.name for f in fields(g)])
                 for g in cls.__mro__ if g in titles]  # own stage first
    for title, names in sections:
        if names:
            print(f"\n{title}:")
        for name in names:
            print(f"  --{name}={getattr(defaults, name)!r}\n      {' '.join(docs[name].split())}")


def _check_type(name, value, annotation):
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise UsageError(f"--{name}={value!r}: expected {annotation.__name__}, "
                         f"got {type(value).__name__}")
    return value


def parse_args(argv=None, cls=PPOConfig):
    """A `cls` from its defaults, then `--preset=NAME`, then `--key=value` overrides (later wins).
    Raises UsageError naming the option."""
    argv = sys.argv[1:] if argv is None else argv
    types = {f.name: f.type for f in fields(cls)}
    overrides = {}
    for arg in argv:
        if arg.startswith("--") and "=" not in arg:
            if types.get(arg[2:]) is bool:
                arg += "=True"  # a bare boolean flag: --json
            elif arg[2:] not in types:
                raise UsageError(f"unknown option {arg} for this script (see --help)")
        if not arg.startswith("--") or "=" not in arg:
            raise UsageError(f"argument {arg!r} is not of the form --key=value (see --help)")
        key, raw = arg[2:].split("=", 1)
        if key not in types:
            raise UsageError(f"unknown option --{key} for this script (see --help)")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word is a string: --task=arith
        overrides[key] = _check_type(key, value, types[key])
    preset = overrides.get("preset", getattr(cls, "preset", "default"))
    if preset not in PRESETS:
        raise UsageError(f"--preset={preset!r}: expected one of {sorted(PRESETS)}")
    return replace(cls(), **{**{k: v for k, v in PRESETS[preset].items() if k in types},
                             **overrides})
