"""Every bad input ends in one clear line naming the option or file, fast, with nothing in out_dir lost:
exit code 2 for a bad option (before any work starts), 1 for bad data or a failed run, 130 for Ctrl-C."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = ["--preset=smoke", "--threads=1", "--rm_pairs=64", "--sft_steps=5"]


def script(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def snapshot(folder):
    """Every file under folder with its size and modification time (None: the folder does not exist)."""
    if not os.path.exists(folder):
        return None
    return {os.path.join(d, f): (os.path.getsize(os.path.join(d, f)), os.path.getmtime(os.path.join(d, f)))
            for d, _, files in os.walk(folder) for f in files}


def fails(args, code, message, out_dir):
    """Run a script that must fail: the exit code, stderr exactly one line holding `message` (no traceback), and
    out_dir as it was."""
    before = snapshot(out_dir)
    r = script(*args, f"--out_dir={out_dir}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code, r.stderr
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert snapshot(out_dir) == before
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An out_dir with a smoke SFT policy and proxy RM (n_embd 32)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    r = script("train_rm.py", *SMOKE, f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("script_name, args, message", [
    ("train_ppo.py", ["--iters=-5"], "--iters=-5: must be >= 1"),
    ("train_ppo.py", ["--rollout_batch=0"], "--rollout_batch=0: must be >= 1"),
    ("train_ppo.py", ["--eval_prompts=0"], "--eval_prompts=0: must be >= 1"),
    ("train_ppo.py", ["--kl_coef=-1"], "--kl_coef=-1.0: must be >= 0"),
    ("train_ppo.py", ["--temperature=0"], "--temperature=0.0: must be > 0"),
    ("train_ppo.py", ["--max_new_tokens=0"], "--max_new_tokens=0: must be >= 1"),
    ("train_ppo.py", ["--max_new_tokens=100000", "--block_size=8"],
     "--max_new_tokens=100000: leaves no room for a prompt in --block_size=8"),
    ("train_sft.py", ["--n_head=3", "--n_embd=32"], "--n_head=3: must divide --n_embd=32"),
    ("train_ppo.py", ["--method=nosuch"], "--method='nosuch': expected one of ppo, bon"),
    ("refine.py", ["--method=nosuch"], "--method='nosuch': expected one of uml, spg"),
    ("train_ppo.py", ["--label_tau=0"], "--label_tau=0.0: must be > 0"),
    ("train_ppo.py", ["--minibatch=16", "--rollout_batch=8"], "--minibatch=16: must be <= --rollout_batch=8"),
    ("refine.py", ["--method=metarm", "--rounds=3", "--iters=2"], "--iters=2: is shared by the rounds"),
    ("experiments.py", ["--seeds=0"], "--seeds=0: must be >= 1"),
    ("train_ppo.py", ["--task=nosuch"], "--task='nosuch': expected one of"),
    ("refine.py", ["--data=README.md", "--ood=True"], "--ood=True: a file has no out-of-distribution"),
    ("train_ppo.py", ["--gold_rm=README.md"], "--gold_rm='README.md': needs --data=FILE"),
    ("refine.py", ["--data=README.md", "--gold_rm=nosuch.pt"], "--gold_rm='nosuch.pt': no such file"),
    ("train_ppo.py", ["--preset=gpt2"], "--preset='gpt2': 'gpt2' is for a preference file"),
    ("experiments.py", ["--data=README.md"], "--data='README.md': the report runs the embedded tasks"),
    ("train_sft.py", ["--rounds=2"], "unknown option --rounds for this script"),
    ("train_sft.py", ["--sft_steps=many"], "--sft_steps='many': expected int"),
    ("bench.py", ["--sizes=nosuch"], "--sizes='nosuch': unknown size 'nosuch'"),
    ("bench.py", ["--json=True"], "--json=True: is for --only=ppo, generate or report-seed"),
    ("bench.py", ["--only=report-seed", "--seed=3"], "--seed=3: --only=report-seed runs on a tuning seed"),
    ("bench.py", ["--only=report-seed", "--seed=100", "--rollout_batch=5"], "--rollout_batch=5: bench.py does not use it with --only=report-seed"),
    ("bench.py", ["--data=README.md"], "--data='README.md': bench.py does not use it"),
    ("bench.py", ["--resume=True"], "--resume=True: bench.py does not use it"),
    ("bench.py", ["--sft_steps=10"], "--sft_steps=10: bench.py does not use it"),
    ("train_sft.py", ["--seed=-1"], "--seed=-1: must be in [0, 2**32)"),
    ("train_sft.py", ["--device=tpu"], "--device='tpu': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("train_sft.py", ["--threads=-1"], "--threads=-1: must be >= 0"),
    ("train_sft.py", ["--dropout=1.0"], "--dropout=1.0: must be in [0, 1)"),
    ("train_ppo.py", ["--gamma=2.0"], "--gamma=2.0: must be in [0, 1]"),
    ("train_ppo.py", ["--bon_max=3"], "--bon_max=3: must be a power of 2"),
    ("train_ppo.py", ["--ensemble_agg='max'"], "--ensemble_agg='max': expected 'mean' or 'min'"),
    ("refine.py", ["--spg_rank='x'"], "--spg_rank='x': expected 'cluster' or 'rm'"),
    ("refine.py", ["--method=uml+spg", "--refine_prompts=1"], "--refine_prompts=1: must be >= 2 for RLP-UML"),
    ("train_rm.py", ["--data=nosuch.jsonl"], "--data='nosuch.jsonl': no such file"),
    ("experiments.py", ["--seed=3"], "--seed=3: the report runs seeds --first_seed"),
    ("train_ppo.py", ["--tokenizer=README.md"], "--tokenizer='README.md': needs --data=FILE"),
    ("train_sft.py", ["--sft_lr=1e999"], "--sft_lr=inf: must be finite"),
    ("refine.py", ["--n_samples=1"], "--n_samples=1: must be >= 2"),
    ("refine.py", ["--method=uml", "--rm_batch=1"], "--rm_batch=1: must be >= 2 for RLP-UML"),
    ("experiments.py", ["--rm_batch=1"], "--rm_batch=1: must be >= 2 for RLP-UML"),
    ("experiments.py", ["--first_seed=4294967295", "--seeds=2"], "--seeds=2: runs seeds past 2**32 - 1"),
    ("refine.py", ["--oracle_pairs=-5"], "--oracle_pairs=-5: must be >= 0"),
    ("refine.py", ["--method=metarm", "--meta_k=1"], "--meta_k=1: must be >= 2"),
    ("refine.py", ["--method=spg", "--spg_gamma=1.0"], "--spg_gamma=1.0: must be < 1"),
    ("experiments.py", ["--ood=True"], "--ood=True: the report pairs every method on the same"),
    ("train_sft.py", ["--device=cuda:abc"], "--device='cuda:abc': expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("train_sft.py", ["--resum"], "unknown option --resum for this script"),
    ("bench.py", ["--kl_coef=0.5"], "--kl_coef=0.5: bench.py does not use it with the default table"),
    ("bench.py", ["--only=ppo", "--ppo_epochs=3"], "--ppo_epochs=3: bench.py does not use it with --only=ppo"),
    ("bench.py", ["--only=generate", "--vocab=64"], "--vocab=64: bench.py does not use it with --only=generate"),
    ("bench.py", ["--only=ppo", "--vocab=2"], "--vocab=2: must be >= 3"),
    ("bench.py", ["--only=ppo", "--device=cpu"], "--device='cpu': bench.py does not use it with --only=ppo"),
    ("refine.py", ["--data=README.md", "--gold_rm=README.md"], "--gold_rm='README.md': README.md: corrupt or truncated checkpoint"),
    ("train_ppo.py", ["--export=minirlhf"], "--export='minirlhf': exists and is not an empty folder"),
    ("train_sft.py", ["--export=README.md"], "--export='README.md': exists and is not an empty folder"),
    ("refine.py", ["--export=README.md/tuned"], f"--export='README.md/tuned': {ROOT}/README.md is a file, not a folder"),
    ("train_ppo.py", ["--export_sft=docs"], "--export_sft='docs': exists and is not an empty folder"),
    ("train_ppo.py", ["--export=x", "--export_sft=x"], "--export='x': is the --export_sft folder or lies in it"),
    ("refine.py", ["--export=x", "--export_sft=x/sft"], "--export_sft='x/sft': is the --export folder or lies in it"),
    ("train_ppo.py", ["--method=bon", "--export=x"], "--export='x': --method=bon trains no policy"),
    ("refine.py", ["--method=eta-sweep", "--export=x"], "--export='x': --method=eta-sweep trains RMs, no policy"),
    ("train_sft.py", ["--export_sft=x"], "--export_sft='x': is for train_ppo.py and refine.py"),
    ("train_rm.py", ["--export=x"], "unknown option --export for this script"),
])
def test_bad_option_is_one_line_exit_2_before_any_work(tmp_path, script_name, args, message):
    fails([script_name, "--preset=smoke", *args], 2, f"error: {message}", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("args", [["train_ppo.py", "--method=bon"], ["refine.py"], ["experiments.py"]])
def test_a_one_process_script_refuses_torchrun_before_any_work(tmp_path, args):
    r = subprocess.run([sys.executable, *args, "--preset=smoke", f"--out_dir={tmp_path / 'out'}"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "WORLD_SIZE": "2"}, timeout=60)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "runs on one process (not under torchrun)" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_out_dir_under_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = script("train_sft.py", "--preset=smoke", f"--out_dir={tmp_path / 'afile' / 'sub'}")
    assert r.returncode == 2 and r.stderr.strip().endswith(f"{tmp_path / 'afile'} is a file, not a folder"), r.stderr


@pytest.mark.parametrize("config, vocab, merges, message", [
    ("[1]", "{}", "", "--init_from=DIR: config.json is not a JSON object"),
    ("{'n_positions': 64}", "{}", "", "--init_from=DIR: config.json is not JSON (Expecting property name"),
    ('{"n_positions": "abc"}', "{}", "",
     "--init_from=DIR: config.json's n_positions is 'abc', not a positive integer"),
    ('{"n_positions": 64}', "{oops", "", "--tokenizer=DIR: vocab.json is not JSON (Expecting property name"),
    ('{"n_positions": 64}', '{"a": "zero"}', "#version\n",
     "--tokenizer=DIR: vocab.json: token 'a' has id 'zero', not an integer"),
    ('{"n_positions": 64}', '{"a": 0, "b": 1}', "#version\na b c\n",
     "--tokenizer=DIR: merges.txt, line 2: expected two tokens, got 3"),
    ('{"n_positions": 64}', '{"a": 0, "b": 1}', "#version\na c\n",
     "--tokenizer=DIR: merges.txt: Error while initializing BPE: Token `c` out of vocabulary"),
    ('{"n_positions": 64, "vocab_size": 50}', '{"a": 0, "b": 1}', "#version\n",
     "--init_from=DIR: its vocabulary (50 tokens) is not the tokenizer's (2 tokens, 6 with minirlhf's PAD, BOS, "
     "EOS and UNK): pass the --tokenizer=DIR it was trained with"),
    ('{"n_positions": 64, "vocab_size": 3}', '{"a": 0, "b": 1}', "#version\n",  # smaller: rows would be reused
     "--init_from=DIR: its vocabulary (3 tokens) is not the tokenizer's (2 tokens, 6 with"),
])
def test_a_malformed_gpt2_folder_is_named(tmp_path, config, vocab, merges, message):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    (folder / "pytorch_model.bin").write_text("garbage")
    (folder / "vocab.json").write_text(vocab)
    (folder / "merges.txt").write_text(merges)
    line = fails(["train_sft.py", "--preset=smoke", "--data=README.md", f"--init_from={folder}",
                  f"--tokenizer={folder}"], 2, "", tmp_path / "out")
    # the folder as the option names it (quoted), and as the tokenizer's files name it (a path)
    line = line.replace(repr(str(folder)), "DIR").replace(f"{folder}{os.sep}", "")
    assert line.startswith(f"error: {message}"), line


@pytest.mark.parametrize("saved, message", [
    (None, "prompts.pt: corrupt or truncated checkpoint"),
    ({"input_ids": torch.zeros(1, 2, dtype=torch.long), "pad_id": 0}, "no field 'attention_mask'"),
])
def test_a_bad_prompts_file_for_bench_is_named(tmp_path, saved, message):
    folder = tmp_path / "w"
    folder.mkdir()
    if saved is None:
        (folder / "prompts.pt").write_text("garbage")
    else:
        torch.save(saved, folder / "prompts.pt")
    fails(["bench.py", "--only=generate", f"--weights={folder}"], 2, message, tmp_path / "out")


def test_resuming_sft_under_other_settings_names_them(tmp_path):
    out = tmp_path / "out"
    args = ["train_sft.py", "--preset=smoke", "--threads=1", "--sft_steps=6", "--ckpt_every=3"]
    assert script(*args, f"--out_dir={out}").returncode == 0
    fails([*args, "--resume=True", "--sft_lr=0.5"], 2, "sft_state.pt was made with --sft_lr=0.003, this run asks "
                                                       "for --sft_lr=0.5", out)


def test_empty_out_dir_is_named(tmp_path):
    r = script("train_sft.py", "--preset=smoke", "--out_dir=")
    assert r.returncode == 2 and r.stderr.strip() == "error: --out_dir='': must name a folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_cuda_without_a_gpu(tmp_path):
    fails(["train_ppo.py", "--preset=smoke", "--device=cuda"], 2, "--device='cuda': no CUDA GPU is available",
          tmp_path / "out")


def test_data_that_is_a_directory(tmp_path):
    line = fails(["train_rm.py", *SMOKE, f"--data={tmp_path}"], 2, "--data=", tmp_path / "out")
    assert "not a file" in line


PAIR = '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: %s", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: %s"}'


@pytest.mark.parametrize("name, content, message", [
    ("same.jsonl", (PAIR % ("a", "a") + "\n") * 3, "same.jsonl: no usable preference pairs (all 3 have chosen == "
                                                    "rejected)"),
    ("text.jsonl.gz", PAIR % ("a", "b") + "\n", "text.jsonl.gz: not a valid gzip file"),
    ("cut.jsonl.gz", None, "cut.jsonl.gz: truncated gzip file"),
    ("few.jsonl", PAIR % ("a", "b") + "\n", "few.jsonl: no prompt falls in the '"),
    ("trl.jsonl", '{"prompt": 3, "chosen": "a", "rejected": "b"}\n', "trl.jsonl:1: field 'prompt' must be a string"),
])
def test_bad_data_file_is_one_line_exit_1(tmp_path, name, content, message):
    import gzip
    path = tmp_path / name
    if content is None:
        data = gzip.compress("".join(PAIR % (i, -i) + "\n" for i in range(500)).encode())
        path.write_bytes(data[:len(data) // 2])
    else:
        path.write_text(content)
    fails(["train_rm.py", *SMOKE, f"--data={path}"], 1, message, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, damage", [("sft.pt", "half"), ("rm.pt", "half"), ("sft.pt", "text"),
                                          ("rm.pt", "text")])
def test_damaged_checkpoint_is_one_line_naming_it(trained, tmp_path, name, damage):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    path = out / name
    if damage == "half":
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    else:
        path.write_text("hello, I am not a checkpoint\n")
    line = fails(["train_ppo.py", *SMOKE], 1, f"{path}: corrupt or truncated checkpoint", out)
    assert line.startswith("error: ")


def test_resuming_from_a_checkpoint_without_its_fields_is_one_line(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    torch.save({"policy": {}, "iter": 1}, out / "ppo.pt")  # e.g. another stage's or another tool's file
    line = fails(["train_ppo.py", *SMOKE, "--resume=True"], 1,
                 f"{out / 'ppo.pt'}: not the checkpoint this stage writes (no field 'critic', 'opt_pi'", out)
    assert line.startswith("error: ")


def test_reusing_a_checkpoint_made_with_other_settings_names_the_fields(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    line = fails(["train_ppo.py", *SMOKE, "--n_embd=64"], 2, "sft.pt was made with --n_embd=32, this run asks for "
                                                             "--n_embd=64", out)
    assert "--reuse=True" in line
    r = script("train_ppo.py", *SMOKE, "--n_embd=64", "--reuse=True", f"--out_dir={out}")  # asked for explicitly
    assert r.returncode == 0, r.stderr


def test_second_writer_is_refused_naming_the_holder(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    (out / "LOCK").write_text(f"pid {os.getpid()} on {os.uname().nodename}: python train_ppo.py\n")  # alive
    fails(["train_ppo.py", *SMOKE], 2, f"is in use by pid {os.getpid()}", out)
    (out / "LOCK").write_text("pid 999999999 on %s: python train_ppo.py\n" % os.uname().nodename)  # long gone
    r = script("train_ppo.py", *SMOKE, f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert not (out / "LOCK").exists()  # released


def test_torn_last_metrics_line_is_dropped_with_a_warning(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"stage": "ppo", "iter')
    r = script("train_ppo.py", *SMOKE, f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "metrics.jsonl:" in r.stderr and "dropped a torn last line" in r.stderr


def test_ctrl_c_is_one_line_and_exit_130(trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    # a job started in the background by a shell (`pytest &`) inherits SIGINT ignored, and Python then
    # installs no Ctrl-C handler: the child starts with the default, as in a terminal
    proc = subprocess.Popen([sys.executable, "train_ppo.py", *SMOKE, "--iters=500", f"--out_dir={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t = time.time()
    while not (out / "ppo.pt").exists() and proc.poll() is None and time.time() - t < 120:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted; resume with --resume=True" and "Traceback" not in err


def test_unknown_report_method(tmp_path):
    fails(["experiments.py", "--preset=smoke", "--methods=ppo,nosuch"], 2,
          "--methods='ppo,nosuch': unknown method 'nosuch'", tmp_path / "out")


def test_refining_against_a_longer_vanilla_ppo_is_refused(tmp_path):
    """refine.py compares its PPO with out_dir's vanilla PPO at equal budget: one of more iterations
    than --iters is named, before any work."""
    out = tmp_path / "out"
    assert script("train_ppo.py", *SMOKE, "--iters=4", f"--out_dir={out}").returncode == 0
    fails(["refine.py", *SMOKE, "--iters=3", "--method=control"], 2,
          f"--iters=3: {out / 'ppo.pt'} is a vanilla PPO policy of 4 iterations", out)


def test_an_export_that_would_hold_the_out_dir_is_refused(tmp_path):
    fails(["train_ppo.py", "--preset=smoke", f"--export={tmp_path}"], 2,
          f"--export='{tmp_path}': is --out_dir or holds it", tmp_path / "out")
