"""Every random stream of a run, named in one place.

A stream's seed derives from the run's --seed alone (plus the step or round where there are many),
so a resumed run replays exactly. Two overlaps are known and kept, because every published number
was drawn this way: the per-round offsets are apart for up to 8 rounds (the report's), so more
rounds reuse a neighbour's seed (HELD_OUT_PAIRS + 9 == META_SAMPLES + 1); and with --seed=0, SFT
step k's seed is k, which is also the seed of the named stream k (step 10's is PREFERENCES').
"""
SFT_EVAL = 1  # SFT vs the demonstrator on held-out prompts
PPO_EVAL = 2  # the held-out prompts of every PPO evaluation
BEST_OF_N = 3  # best-of-n's prompts
PREFERENCES = 10  # the proxy RM's pairs of SFT samples and their labels
SHIFTED = 20  # the deliberately shifted (T = 1.5) sampler of train_rm.py's diagnostic
RLP_SAMPLES = 30  # RLP's policy samples P and SPG's choices
RLP_RM = 31  # the refined RM's initialisation and batch order
HELD_OUT_PAIRS = 32  # (+ round) fresh policy samples on eval prompts: RM accuracy off its training
META_SAMPLES = 40  # + round: MetaRM's S_r (eta-sweep: round 1)
META_RM = 50  # + round: that round's RM
ITER_SAMPLES = 70  # + round: an iterated refinement's policy samples
ITER_RM = 80  # + round: its refined RM
BIG_RM = 90  # the big-rm ceiling's RM
GOLD_RM = 95  # a file's gold RM: its initialisation, batch order and normalisation samples
RM_MEMBER = 1000  # * k: ensemble member k's RM

# the draws of one PPO iteration (iteration_seed's salt), and two streams keyed like iterations
ROLLOUT, WIN_RATE_BASELINE, EVALUATION, MINIBATCH_ORDER = 0, 1, 2, 3
BASELINE_ITER, BEST_OF_N_ITER = -1, -2  # the win-rate baseline's SFT samples; best-of-n's


def stream(seed, name, index=0):
    """The seed of the named stream `name` (one of the offsets above) of run `seed`; `index` tells
    apart its draws where there are several (a round, an ensemble member)."""
    return seed + name + index


def step_seed(seed, step):
    """SFT step `step`'s batch."""
    return seed * 1_000_003 + step


def iteration_seed(seed, it, salt=0):
    """PPO iteration `it`'s draws; salt separates the streams of one iteration (rollout, baseline,
    evaluation, minibatch order)."""
    return (seed * 1_000_003 + it * 7919 + salt) % 2**62
