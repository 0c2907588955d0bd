"""Every random stream of a run, named in one place, and drawn so that no two share a seed.

A stream's seed hashes (the run's --seed, the stream's name, an index: a step, an iteration and
its draw, a round, an ensemble member) through numpy's SeedSequence. So no two seeds, streams or
rounds draw from one seed, as the paired tests over seeds assume (additive offsets, the v2 scheme,
made seed 0's second-round prompts seed 1's first-round ones: docs/protocol.md); and a resumed run
replays exactly, since every draw derives from these alone.
"""
import random

import numpy as np
import torch

# the streams' names: hashed with the seed, never added to it
GLOBAL = 0  # the global RNGs set up before a stage: the models' initialisation, dropout
SFT_STEP = 1  # + step: SFT's batch of demonstrations
SFT_EVAL = 2  # SFT vs the demonstrator on held-out prompts (index 1: the SFT policy's samples)
PPO_EVAL = 3  # the held-out prompts of every PPO evaluation
PPO_ITERATION = 4  # + iteration, + draw (below): everything one PPO iteration draws
WIN_RATE_BASELINE = 5  # the SFT samples every evaluation's win-rate compares with
BEST_OF_N = 6  # best-of-n's prompts and samples
PREFERENCES = 7  # the proxy RM's pairs of SFT samples and their labels
SHIFTED = 8  # the deliberately shifted (T = 1.5) sampler of train_rm.py's diagnostic
RM_MEMBER = 9  # + k: ensemble member k's RM (k = 0: the proxy)
RLP_SAMPLES = 10  # RLP's policy samples P and SPG's choices
RLP_RM = 11  # the refined RM's initialisation and batch order
HELD_OUT_PAIRS = 12  # + round: fresh policy samples on eval prompts: RM accuracy off its training
META_SAMPLES = 13  # + round: MetaRM's S_r (eta-sweep: round 1)
META_RM = 14  # + round: that round's RM
META_BATCHES = 15  # eta-sweep's choice of meta batches, the same for every eta
ITER_SAMPLES = 16  # + round: an iterated refinement's policy samples
ITER_RM = 17  # + round: its refined RM
BIG_RM = 18  # the big-rm ceiling's RM
GOLD_RM = 19  # a file's gold RM: its initialisation, batch order and normalisation samples
NAMES = tuple(range(20))

# the draws of one PPO iteration (PPO_ITERATION's second index)
ROLLOUT, EVALUATION, MINIBATCH_ORDER = 0, 1, 2


def stream(seed, name, *index):
    """The seed (below 2**62) of stream `name` of run `seed` at `index` (non-negative ints)."""
    # the index's length too: SeedSequence reads [a, b] and [a, b, 0] as one entropy
    words = np.random.SeedSequence([seed, name, len(index), *index]).generate_state(2, np.uint32)
    return (int(words[0]) << 30) ^ int(words[1])


def generators(device, seed, name, *index):
    """(random.Random, torch.Generator on `device`) of one stream: Python's draws (prompts,
    shuffles) and torch's (sampling) from the same seed."""
    s = stream(seed, name, *index)
    return random.Random(s), torch.Generator(device).manual_seed(s)
