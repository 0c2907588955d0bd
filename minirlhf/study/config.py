"""The report's options (experiments.py): which seeds and methods run, beside every stage's."""
from dataclasses import dataclass

from ..plumbing.config import PPO, RM, SFT, Model, Refine, Run


@dataclass
class Report:
    title = "report"  # the --help section of these options (no annotation: not an option)
    seeds: int = 5
    """Seeds per task (each: its own SFT, proxy RM and every method)."""
    first_seed: int = 0
    """The seeds run are first_seed .. first_seed + seeds - 1."""
    methods: str = ""
    """Comma-separated methods to run (e.g. the gate's pilot: ppo,control,oracle-iter,control-iter,
    gold-ppo); empty = every method."""


@dataclass
class ReportConfig(Report, Refine, PPO, RM, SFT, Model, Run):
    out_dir: str = "out_report"
    """Folder of results.json, cells/ and one subfolder per task (report.md, curves, one
    folder per seed)."""
    preset: str = "report"
    """'report' (the multi-seed run on a CPU), 'smoke' (seconds), 'default' or 'gpu'."""
