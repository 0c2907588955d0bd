"""The reproduction report: every method x several seeds, in one command (minirlhf/study/cells.py).

    python experiments.py --seeds=5                  # the embedded `reviews` task, preset 'report'
    python experiments.py --seeds=5 --task=arith
    python experiments.py --preset=smoke --seeds=1   # seconds: every output file, meaningless
                                                     # numbers
    python experiments.py --methods=ppo,control,oracle-iter,control-iter,gold-ppo \\
        --first_seed=102 --seeds=8                   # Science v2's gate pilot, on tuning seeds
    python experiments.py --first_seed=3 --seeds=2   # seeds 3 and 4 only, e.g. in a second
                                                     # process beside one running --seeds=3 on
                                                     # the same out_dir

Finished cells are kept in out_dir/results.json and never rerun, so a killed report resumes (new
cells under other settings than out_dir/<task>/settings.json records are refused). Writes
out_dir/<task>/report.md, curves.csv and, when matplotlib is installed (extra `plot`), curves.png.
"""
from minirlhf.plumbing import dist
from minirlhf.plumbing.config import UsageError
from minirlhf.plumbing.runtime import main
from minirlhf.plumbing.validate import validate
from minirlhf.study.cells import KNOWN_METHODS, run_report
from minirlhf.study.config import ReportConfig


def check(cfg):
    if cfg.tokenizer:
        raise UsageError(f"--tokenizer={cfg.tokenizer!r}: the report runs the embedded tasks, "
                         "which have their own vocabulary")
    validate(cfg)
    if dist.under_torchrun():
        raise UsageError("experiments.py runs on one process (not under torchrun): to use more "
                         "cores, start processes that split the seeds (--first_seed, --seeds)")
    if cfg.seed != 0:
        raise UsageError(f"--seed={cfg.seed}: the report runs seeds --first_seed .. --first_seed + "
                         "--seeds - 1 (--first_seed=K --seeds=1 runs seed K alone)")
    if cfg.data:
        raise UsageError(f"--data={cfg.data!r}: the report runs the embedded tasks (cells are "
                         "keyed by task); run train_ppo.py and refine.py on a file")
    if cfg.ood:
        raise UsageError("--ood=True: the report pairs every method on the same in-distribution "
                         "prompts; run refine.py --method=metarm --ood=True for MetaRM's OOD mode")
    unknown = ([m for m in cfg.methods.split(",") if m not in KNOWN_METHODS] if cfg.methods
               else [])
    if unknown:
        raise UsageError(f"--methods={cfg.methods!r}: unknown method {unknown[0]!r}, expected some "
                         f"of {', '.join(KNOWN_METHODS)}")


if __name__ == "__main__":
    # processes that split the seeds share out_dir: each seed's folder is locked instead,
    # while its cells run
    main(run_report, ReportConfig, check, lock=False)
