"""Every option checked before any work starts: a bad one is a UsageError naming it (exit
code 2, in seconds)."""
import importlib
import json
import math
import os
import re
from dataclasses import fields

import torch

from ..data.tasks import TASKS
from ..data.tokenizer import fits_vocabulary, gpt2_bpe
from ..model import GPTConfig
from ..ppo_trainer import round_weights
from .checkpoint import load
from .config import PRESETS, UsageError


def validate(cfg, methods=None):
    """Check the ranges, divisibility, lengths against the context, the device, the task, `methods`
    (the values --method may take in this script) and the files a config names."""
    names = {f.name for f in fields(cfg)}

    def need(ok, option, why):
        if option in names and not ok:
            raise UsageError(f"--{option}={getattr(cfg, option)!r}: {why}")

    # 1e999 parses as inf, which every range check below would pass
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        need(not isinstance(value, float) or math.isfinite(value), f.name, "must be finite")
    need(cfg.out_dir.strip() != "", "out_dir", "must name a folder")
    need(not os.path.exists(cfg.out_dir) or os.path.isdir(cfg.out_dir), "out_dir",
         "exists and is not a folder")
    above = existing_ancestor(os.path.dirname(os.path.abspath(cfg.out_dir)))
    need(os.path.isdir(above), "out_dir", f"{above} is a file, not a folder")
    for option in ("export", "export_sft"):  # checked now: the export comes after all the work
        folder = getattr(cfg, option, "")
        if folder:
            need(not os.path.exists(folder) or os.path.isdir(folder) and not os.listdir(folder),
                 option, "exists and is not an empty folder (an export overwrites nothing)")
            above = existing_ancestor(os.path.abspath(folder))
            need(os.path.isdir(above), option, f"{above} is a file, not a folder")
            need(os.access(above, os.W_OK), option, f"{above} is not writable")
    # a Hugging Face folder holds one model and nothing else (it may lie inside out_dir)
    exports = [(o, os.path.abspath(getattr(cfg, o))) for o in ("export", "export_sft")
               if getattr(cfg, o, "")]
    for option, folder in exports:
        out_dir = os.path.abspath(cfg.out_dir)
        need(not (out_dir == folder or out_dir.startswith(folder + os.sep)), option,
             "is --out_dir or holds it")
        for other, path in exports:
            need(other == option or not (folder == path or folder.startswith(path + os.sep)),
                 option, f"is the --{other} folder or lies in it")
    if cfg.tensorboard:
        try:  # torch's writer needs the optional tensorboard package
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            raise UsageError("--tensorboard=True: needs the optional tensorboard package "
                             "(pip install tensorboard)") from None
    need(0 <= cfg.seed < 2 ** 32, "seed", "must be in [0, 2**32)")
    need(cfg.task in TASKS, "task", f"expected one of {sorted(TASKS)}")
    need(cfg.preset in PRESETS, "preset", f"expected one of {sorted(PRESETS)}")
    need(cfg.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", cfg.device), "device",
         "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    need(not cfg.device.startswith("cuda") or torch.cuda.is_available(), "device",
         "no CUDA GPU is available here (use --device=cpu or auto)")
    gpus = torch.cuda.device_count()
    need(not cfg.device.startswith("cuda:") or int(cfg.device[5:]) < gpus, "device",
         f"this machine has {gpus} GPU(s), numbered from 0")
    need(cfg.threads >= 0, "threads", "must be >= 0")
    if methods is not None:
        need(cfg.method in methods, "method", f"expected one of {', '.join(methods)}")
    for option in ("n_layer", "n_head", "n_embd", "block_size", "max_new_tokens", "eval_prompts",
                   "ckpt_every", "sft_steps", "sft_batch", "rm_pairs", "rm_epochs", "rm_batch",
                   "ensemble", "bpe_vocab", "iters", "rollout_batch", "minibatch", "ppo_epochs",
                   "eval_every", "sample_every", "bon_max", "refine_prompts", "rounds", "meta_k",
                   "meta_prompts", "seeds", "z_dim", "vocab", "batch", "prompt_len", "new_tokens",
                   "reps"):
        need(getattr(cfg, option, 1) >= 1, option, "must be >= 1")
    for option in ("first_seed", "warmup", "weight_decay", "kl_coef", "kl_target", "vf_coef",
                   "uml_lambda", "mib_beta", "spg_gamma", "meta_eta", "meta_temp_delta", "sft_lr",
                   "rm_lr", "ppo_lr", "critic_lr", "eval_dense", "oracle_pairs"):
        need(getattr(cfg, option, 0) >= 0, option, "must be >= 0")
    for option in ("temperature", "label_tau", "grad_clip", "clip", "vf_clip", "kl_horizon"):
        need(getattr(cfg, option, 1) > 0, option, "must be > 0")
    for option in ("dropout", "label_flip"):
        need(0 <= getattr(cfg, option, 0) < 1, option, "must be in [0, 1)")
    need(0 <= getattr(cfg, "gamma", 1) <= 1, "gamma", "must be in [0, 1]")
    need(0 <= getattr(cfg, "lam", 1) <= 1, "lam", "must be in [0, 1]")
    need(getattr(cfg, "n_samples", 2) >= 2, "n_samples",
         "must be >= 2 (RLP compares samples of one prompt)")
    need(getattr(cfg, "meta_k", 2) >= 2, "meta_k",
         "must be >= 2 (MetaRM's difference objective compares samples of one prompt)")
    need(getattr(cfg, "spg_gamma", 0) < 1, "spg_gamma", "must be < 1 (SPG keeps a prompt only "
         "when some sample lies outside its largest group, whose confidence is then below 1)")
    # the methods this run may reach (experiments.py without --methods runs them all)
    runs = getattr(cfg, "method", "") or getattr(cfg, "methods", "") or (
        "uml" if "methods" in names else "")
    if "uml" in runs:  # the JS estimator's negatives are other prompts
        need(cfg.rm_batch >= 2, "rm_batch", "must be >= 2 for RLP-UML")
        need(cfg.refine_prompts >= 2, "refine_prompts", "must be >= 2 for RLP-UML")
    need(getattr(cfg, "first_seed", 0) + getattr(cfg, "seeds", 1) <= 2 ** 32, "seeds",
         f"runs seeds past 2**32 - 1 from --first_seed={getattr(cfg, 'first_seed', 0)}")
    need(cfg.n_embd % cfg.n_head == 0, "n_head", f"must divide --n_embd={cfg.n_embd}")
    need(cfg.max_new_tokens <= cfg.block_size - 2, "max_new_tokens",
         f"leaves no room for a prompt in --block_size={cfg.block_size} "
         f"(at most {cfg.block_size - 2})")
    need(getattr(cfg, "minibatch", 0) <= getattr(cfg, "rollout_batch", 1), "minibatch",
         f"must be <= --rollout_batch={getattr(cfg, 'rollout_batch', '')}")
    rounds = getattr(cfg, "rounds", 1)
    parts = sum(round_weights(rounds))
    need(getattr(cfg, "iters", 1) >= parts, "iters",
         f"is shared by the rounds (1, 1, 2, 2, ... parts), so with --rounds={rounds} it must be "
         f">= {parts}")
    bon = getattr(cfg, "bon_max", 1)
    need(bon & (bon - 1) == 0, "bon_max", "must be a power of 2")
    need(cfg.ensemble_agg in ("mean", "min") if "ensemble_agg" in names else True, "ensemble_agg",
         "expected 'mean' or 'min'")
    need(getattr(cfg, "spg_rank", "cluster") in ("cluster", "rm"), "spg_rank",
         "expected 'cluster' or 'rm'")
    need(not cfg.resume or os.path.isdir(cfg.out_dir), "resume",
         f"--out_dir={cfg.out_dir} does not exist")
    if cfg.data:
        need(os.path.isfile(cfg.data), "data",
             "no such file" if not os.path.exists(cfg.data) else "not a file")
        need(not getattr(cfg, "ood", False), "ood", "a file has no out-of-distribution topics "
             "(only the embedded tasks do)")
    need(cfg.preset != "gpt2" or cfg.data, "preset", "'gpt2' is for a preference file: add "
         "--data=FILE (and --init_from=DIR --tokenizer=DIR for GPT-2's weights)")
    if getattr(cfg, "gold_rm", ""):
        need(cfg.data, "gold_rm", "needs --data=FILE: the embedded tasks have their own gold")
        need(os.path.isfile(cfg.gold_rm), "gold_rm",
             "no such file" if not os.path.exists(cfg.gold_rm) else "not a file")
        try:  # read now: it is otherwise first read after SFT has trained
            load(cfg.gold_rm, fields=("model", "gpt_config"))
        except ValueError as e:
            raise UsageError(f"--gold_rm={cfg.gold_rm!r}: {e}") from None
    if cfg.init_from:
        need(cfg.data and cfg.tokenizer, "init_from", "needs --data=FILE and its --tokenizer=DIR "
             "(GPT-2's vocab.json + merges.txt): the embedded tasks have their own small "
             "vocabulary")
        config = os.path.join(cfg.init_from, "config.json")
        need(os.path.isfile(config), "init_from", "has no config.json")
        need(any(os.path.isfile(os.path.join(cfg.init_from, w))
                 for w in ("pytorch_model.bin", "model.safetensors")), "init_from",
             "has neither pytorch_model.bin nor model.safetensors")
        hf_cfg = json_object(cfg, "init_from", "config.json", "a JSON object")
        for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"):
            value = hf_cfg.get(key, 1)
            need(type(value) is int and value >= 1, "init_from",
                 f"config.json's {key} is {value!r}, not a positive integer")
        positions = hf_cfg.get("n_positions", GPTConfig.n_positions)
        need(cfg.block_size <= positions, "block_size", f"exceeds the checkpoint's n_positions "
             f"({positions}) in --init_from")
    if cfg.tokenizer:
        need(cfg.data, "tokenizer", "needs --data=FILE: the embedded tasks have their own "
             "vocabulary")
        for name in ("vocab.json", "merges.txt"):
            need(os.path.isfile(os.path.join(cfg.tokenizer, name)), "tokenizer", f"has no {name}")
        json_object(cfg, "tokenizer", "vocab.json", "a JSON object {token: id}")
        try:  # built now: it is otherwise first built after the data is read
            tok = gpt2_bpe(*(os.path.join(cfg.tokenizer, n) for n in ("vocab.json", "merges.txt")))
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(f"--tokenizer={cfg.tokenizer!r}: {e}") from None
        if cfg.init_from:
            vocab = json_object(cfg, "init_from", "config.json", "a JSON object").get("vocab_size")
            if vocab is not None:
                fits_vocabulary(vocab, tok, f"--init_from={cfg.init_from!r}")


def existing_ancestor(path):
    """`path`, or its nearest folder above that exists."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def json_object(cfg, option, name, kind):
    """The JSON object in file `name` of the folder that --option names; a UsageError naming the
    option if it is not JSON, or not `kind`."""
    folder = getattr(cfg, option)
    try:
        with open(os.path.join(folder, name)) as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"--{option}={folder!r}: {name} is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"--{option}={folder!r}: {name} is not {kind}")
    return obj
