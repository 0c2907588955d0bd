"""Bad input gets one clear error naming the place; checkpoints never run code; a killed run resumes exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from minirlhf.data.batches import encode_prompts
from minirlhf.data.tasks import get_task
from minirlhf.model import GPT, GPTConfig, load_model, save_model
from minirlhf.plumbing.checkpoint import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch evil_was_here",))


def test_code_executing_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt: refused to load"):
        load(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "evil_was_here").exists()


def test_missing_corrupt_and_mismatched_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt: checkpoint not found"):
        load(str(tmp_path / "nope.pt"))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="bad.pt: "):
        load(str(tmp_path / "bad.pt"))
    model = GPT(GPTConfig(vocab_size=10, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    save_model(str(tmp_path / "m.pt"), model)
    ck = torch.load(tmp_path / "m.pt", weights_only=True)
    ck["gpt_config"]["n_embd"] = 16  # a checkpoint whose weights do not fit its config
    torch.save(ck, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="m.pt: checkpoint does not match its model config"):
        load_model(str(tmp_path / "m.pt"))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from minirlhf.plumbing.checkpoint import atomic_write_json
    path = tmp_path / "state.json"
    atomic_write_json({"step": 1}, str(path))
    before = path.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json({"step": object()}, str(path))  # fails while writing
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["state.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # what open() would have made, not mkstemp's 0600


def test_long_prompt_is_truncated_from_the_left_keeping_bos():
    tok = get_task("reviews").tokenizer
    ids, mask = encode_prompts(tok, ["the pizza was very tasty . the staff were nice ."], max_len=5)
    assert ids.shape == (1, 5) and ids[0, 0].item() == tok.bos_id
    assert tok.decode(ids[0, 1:].tolist()) == "staff were nice ."


def test_script_errors_are_one_line_with_nonzero_exit(tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}'
    bad.write_text(good + '\n{"chosen": 1}\n')
    out = tmp_path / "out"
    r = script("train_rm.py", f"--data={bad}", f"--out_dir={out}")
    expected = f"error: {bad}:2: field 'chosen' must be a string, got int"
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [expected]
    assert not out.exists()  # nothing written before the input was validated
    r = script("train_sft.py", "--nope=1")
    assert r.returncode != 0 and "unknown option --nope" in r.stderr
    r = script("train_ppo.py", "--preset=smoke", f"--out_dir={tmp_path}/x", "--sft_steps=2", "--sft_lr=1e30",
               "--grad_clip=1e30")
    assert r.returncode == 1 and "non-finite" in r.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "x" / "sft.pt")


def _rows(path, stage):
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["stage"] == stage]


def _run_until_killed(args, ckpt, timeout=120):
    """Start a run, SIGKILL it as soon as its first checkpoint exists."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.time()
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() - t < timeout:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, stage):
    # bit-exact on CPU: CUDA's atomics-based kernels (embedding backward, ...) are not deterministic
    base = ["--preset=smoke", "--threads=1", "--device=cpu"]
    if stage == "sft":
        args, ckpt, stage = ["train_sft.py", *base, "--sft_steps=40", "--ckpt_every=5"], "sft_state.pt", "sft"
    else:
        base.append("--rm_pairs=64")
        assert script("train_rm.py", *base, f"--out_dir={tmp_path}/a").returncode == 0
        shutil.copytree(tmp_path / "a", tmp_path / "b")
        args, ckpt, stage = ["train_ppo.py", *base, "--iters=16", "--eval_every=2"], "ppo.pt", "ppo"
    done = script(*args, f"--out_dir={tmp_path}/a")
    assert done.returncode == 0, done.stderr
    _run_until_killed([*args, f"--out_dir={tmp_path}/b"], str(tmp_path / "b" / ckpt))
    saved = load(str(tmp_path / "b" / ckpt))
    assert saved["step"] < 40 if stage == "sft" else saved["iter"] < 16  # killed mid-run, not after it
    resumed = script(*args, f"--out_dir={tmp_path}/b", "--resume=True")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    a, b = (_rows(tmp_path / d / "metrics.jsonl", stage) for d in ("a", "b"))
    assert a == b and len(a) > 0


@pytest.mark.parametrize("stage", ["train_sft.py", "train_rm.py", "train_ppo.py"])
def test_two_process_gloo_equals_one_process(tmp_path, stage):
    """torchrun --nproc_per_node=2 (gloo, CPU) at the same global batch gives the 1-process result."""
    args = [stage, "--preset=smoke", "--sft_steps=6", "--sft_batch=16", "--threads=1", "--device=cpu"]
    args += {"train_sft.py": [], "train_rm.py": ["--rm_pairs=64"],
             "train_ppo.py": ["--rm_pairs=64", "--iters=4"]}[stage]
    if stage == "train_ppo.py":  # both start from the same SFT and RM
        assert script("train_rm.py", *args[1:-1], f"--out_dir={tmp_path}/one").returncode == 0
        shutil.copytree(tmp_path / "one", tmp_path / "two")
    one = script(*args, f"--out_dir={tmp_path}/one")
    assert one.returncode == 0, one.stderr
    # --standalone: a free port, so two of these tests may run at once (pytest -n)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", *args, f"--out_dir={tmp_path}/two"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    stage_name = {"train_sft.py": "sft", "train_rm.py": "rm", "train_ppo.py": "ppo"}[stage]
    a, b = (_rows(tmp_path / d / "metrics.jsonl", stage_name) for d in ("one", "two"))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:  # every logged number but the per-rank variance estimates
            if isinstance(x[k], float) and k not in ("ppo/val/explained_variance", "ppo/ratio/var"):
                # the RM's normalising mean reads weights that Adam moves by up to its lr where a
                # gradient is float noise, summed over every SFT sample's score: 1e-4 is too tight
                tol = 1e-3 if k.startswith("norm_") else 1e-4
                assert abs(x[k] - y[k]) < tol, (k, x[k], y[k])
    if stage == "train_rm.py":
        ra, rb = (torch.load(tmp_path / d / "rm.pt", weights_only=True)["model"] for d in ("one", "two"))
        assert all(torch.allclose(ra[k], rb[k], atol=1e-3, rtol=1e-3) for k in ra)
