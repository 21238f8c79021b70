"""Bad inputs and faults, reproduced as a user meets them (the entry point under torchrun or the
launch script, 2 gloo processes): each ends with one named line and leaves nothing misleading
behind, or (SIGTERM) saves and stops cleanly."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conversion import convert
from tests.runs import REPO, free_port, read_metrics, run_pretrain, small_model_args

pytestmark = pytest.mark.distributed

PROGRESS_BAR = re.compile(r"\d+%\|.*\| \d+/\d+ \[")  # tqdm's, e.g. transformers' shard writer
FAST_FAIL_S = 120  # a check that works answers in seconds; the old code hung here


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error: " in line]


def _check_rank_lines(result, message: str) -> None:
    """Each rank that met the error printed the one line (torchrun may stop the other rank
    before it prints)."""
    lines = _error_lines(result)
    assert lines and set(lines) <= {f"[rank {r}] {message}" for r in (0, 1)}, result.stderr[-3000:]


def _launch(corpus, *overrides, env=None):
    """launch/pretrain_adamoe.sh run directly (validates before starting any process)."""
    data_path, tokenizer = corpus
    return subprocess.run(
        [
            "launch/pretrain_adamoe.sh",
            "--data-path",
            data_path,
            "--tokenizer-model",
            tokenizer,
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        # The interpreter under test (else the script picks .venv, or a PYTHON make exported).
        env={**os.environ, "GPUS_PER_NODE": "2", "PYTHON": sys.executable, **(env or {})},
    )


def _only_line(result) -> str:
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and "warn" not in line.lower() and not PROGRESS_BAR.search(line)
    ]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_corpus_too_small_for_validation_fails_fast_instead_of_hanging(synthetic_corpus, tmp_path):
    text = tmp_path / "one.txt"
    text.write_text("A single short document of a few words. " * 40)
    prefix = str(tmp_path / "one")
    subprocess.run(
        [
            sys.executable,
            "tools/preprocess_data.py",
            "--input",
            str(text),
            "--output-prefix",
            prefix,
            "--tokenizer-model",
            synthetic_corpus[1],
            "--no-progress",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    result = run_pretrain(
        (prefix + "_text", synthetic_corpus[1]),
        "--train-iters",
        "4",
        "--eval-interval",
        "2",
        check=False,
        timeout=FAST_FAIL_S,
    )
    assert result.returncode != 0
    message = (
        f"error: data_path ('{prefix}_text') must give the validation split a document "
        "and at least seq_length + 1 = 65 tokens; split '98,2,0' gives it 0 of 1 "
        "documents (0 tokens); add text or change split"
    )
    _check_rank_lines(result, message)


def test_unwritable_save_and_damaged_data_are_found_before_any_process_starts(
    synthetic_corpus, tmp_path
):
    (tmp_path / "a_file").write_text("")
    assert _only_line(_launch(synthetic_corpus, "--save", str(tmp_path / "a_file" / "ckpt"))) == (
        f"error: save ('{tmp_path}/a_file/ckpt') must be a writable directory (Not a "
        "directory); checkpoints go there; fix its permissions or point save elsewhere"
    )
    data_path, tokenizer = synthetic_corpus
    for suffix in (".bin", ".idx"):
        shutil.copyfile(data_path + suffix, str(tmp_path / "copy") + suffix)
    size = os.path.getsize(tmp_path / "copy.bin")
    with open(tmp_path / "copy.bin", "r+b") as handle:
        handle.truncate(size - 100)
    broken = (str(tmp_path / "copy"), tokenizer)
    assert _only_line(_launch(broken)) == (
        f"error: {tmp_path}/copy.bin is truncated ({size - 100} bytes; its index describes "
        f"{size}); rebuild it with tools/preprocess_data.py"
    )
    (tmp_path / "copy.idx").write_bytes(b"garbage" * 50)
    assert _only_line(_launch(broken)) == (
        f"error: {tmp_path}/copy.idx must start with Megatron's index header; the file is "
        "damaged or not an index: rebuild it with tools/preprocess_data.py"
    )


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(synthetic_corpus, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("num_layers: 2\nmoe_router_topk: [3\nhidden_size: 64\n")
    assert _only_line(_launch(synthetic_corpus, env={"CONFIG": str(config)})) == (
        f"error: config ('{config}') must be valid YAML: expected ',' or ']', but got ':' at "
        "line 3, column 12; fix the file"
    )


def _train_saved(corpus, save, *overrides, iters=6):
    run_pretrain(
        corpus, "--train-iters", str(iters), "--save-interval", "3", "--save", str(save), *overrides
    )


def test_resume_from_a_damaged_checkpoint_names_the_file_and_the_intact_one(
    synthetic_corpus, tmp_path
):
    save = tmp_path / "ckpt"
    _train_saved(synthetic_corpus, save)
    os.remove(save / "iter_0000006" / "__1_0.distcp")
    result = run_pretrain(synthetic_corpus, "--train-iters", "9", "--save", str(save), check=False)
    message = (
        f"error: checkpoint ('{save}/iter_0000006') must be complete to load (missing "
        f"shard __1_0.distcp); the previous checkpoint iter_0000003 is intact: resume "
        f"from it with `echo 3 > {save}/latest_checkpointed_iteration.txt`"
    )
    assert result.returncode != 0
    _check_rank_lines(result, message)
    (save / "latest_checkpointed_iteration.txt").write_text("3\n")  # the advice works
    resumed = run_pretrain(synthetic_corpus, "--train-iters", "4", "--save", str(save))
    assert "resuming at iteration 3" in resumed.stdout


def test_resume_with_a_changed_shape_option_names_it(synthetic_corpus, tmp_path):
    save = tmp_path / "ckpt"
    _train_saved(synthetic_corpus, save, iters=3)
    for option, value, saved in (
        ("--hidden-size", "96", "64"),
        ("--adamoe-num-null-experts", "2", "4"),
    ):
        result = run_pretrain(
            synthetic_corpus, "--train-iters", "6", "--save", str(save), option, value, check=False
        )
        name = option[2:].replace("-", "_")
        assert result.returncode != 0
        _check_rank_lines(
            result,
            f"error: {name} ({value}) must equal the checkpoint's ({saved}) to load "
            f"{save}/iter_0000003; set it back, or start a new run with another save directory",
        )


def test_resume_without_the_target_load_that_learned_the_null_bias_names_it(
    synthetic_corpus, tmp_path
):
    """The checkpoint's run kept its load with a learned null bias; a run without the target
    would load without it (the routing, so the load, changes) and said nothing."""
    save = tmp_path / "ckpt"
    _train_saved(synthetic_corpus, save, "--adamoe-target-load", "0.6", iters=3)
    result = run_pretrain(synthetic_corpus, "--train-iters", "6", "--save", str(save), check=False)
    assert result.returncode != 0
    _check_rank_lines(
        result,
        f"error: adamoe_target_load (None) must be set as the checkpoint's run set it (0.6) to "
        f"load {save}/iter_0000003: it holds a learned null bias, which this run would drop; "
        "set it back (or start a new run with another save directory)",
    )
    resumed = run_pretrain(
        synthetic_corpus, "--train-iters", "4", "--save", str(save), "--adamoe-target-load", "0.6"
    )
    assert "resuming at iteration 3" in resumed.stdout


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (a disk that fills up), mounted for the test; needs CAP_SYS_ADMIN."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up ({done.stderr.strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    synthetic_corpus, tmp_path, small_disk
):
    save = small_disk / "ckpt"  # room for one checkpoint of the small model, not two
    result = run_pretrain(
        synthetic_corpus,
        "--train-iters",
        "12",
        "--save-interval",
        "3",
        "--save",
        str(save),
        check=False,
    )
    assert result.returncode != 0
    lines = set(_error_lines(result))
    assert lines and all("ran out of disk space while writing iter_" in line for line in lines)
    latest = (save / "latest_checkpointed_iteration.txt").read_text().strip()
    assert any(
        f"iter_{int(latest):07d} is still the latest checkpoint and the partial save was "
        "removed; free space or point save elsewhere" in line
        for line in lines
    ), lines
    assert not [p for p in save.iterdir() if p.name.endswith(".partial")]
    assert "Traceback" not in result.stderr  # the ranks print their line, no traceback


def test_export_to_an_unwritable_or_full_place_is_one_line(synthetic_corpus, tmp_path, small_disk):
    save = tmp_path / "ckpt"
    _train_saved(
        synthetic_corpus, save, "--hidden-size", "128", "--moe-ffn-hidden-size", "256", iters=3
    )

    def export(out):
        return convert("export-hf", "--load", save, "--out", out, check=False)

    (tmp_path / "a_file").write_text("")
    assert _only_line(export(tmp_path / "a_file" / "sub" / "hf")) == (
        f"error: out ('{tmp_path}/a_file/sub') must be a writable directory (Not a directory); "
        "the export is written next to it first; pick a writable place"
    )
    assert _only_line(export(small_disk / "hf")) == (
        f"error: out ('{small_disk}/hf') ran out of disk space while exporting; nothing was left "
        "behind; free space or pick another path"
    )
    assert os.listdir(small_disk) == []
    done = export(tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-3000:]
    for name in os.listdir(tmp_path / "hf"):  # readable by the group and others
        assert os.stat(tmp_path / "hf" / name).st_mode & 0o044 == 0o044, name


def test_divergence_in_the_first_steps_stops_the_run_without_saving_it(synthetic_corpus, tmp_path):
    """lr 1000 wrecks the model at its first update: the loss of step 2 spikes, long before
    adamoe_loss_spike_window (20) losses are known; the run is 10 steps, shorter than the
    window. (The guard used to wait for the window: this run ended with exit 0 and saved the
    dead model, loss ln(vocab) and gradient norm 0 at every step.)"""
    save = tmp_path / "ckpt"
    metrics = tmp_path / "metrics.jsonl"
    result = run_pretrain(
        synthetic_corpus,
        "--train-iters",
        "10",
        "--save-interval",
        "1",
        "--save",
        str(save),
        "--lr",
        "1000",
        "--lr-warmup-iters",
        "0",
        "--adamoe-metrics-file",
        str(metrics),
        check=False,
    )
    lines = set(_error_lines(result))
    assert result.returncode == 3 and lines, result.stderr[-3000:]
    assert all("not saved: the last checkpoint is intact" in line for line in lines), lines
    assert all("adamoe_loss_spike_factor (3) x the mean of the previous" in line for line in lines)
    halted_at = {int(re.search(r"at iteration (\d+)", line)[1]) for line in lines}
    assert len(halted_at) == 1, lines  # every rank names the same iteration
    halted_at = halted_at.pop()
    assert halted_at < 10 and halted_at == max(r["iteration"] for r in read_metrics(metrics))
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest == halted_at - 1 and not (save / f"iter_{halted_at:07d}").exists()


def test_sigterm_finishes_the_step_saves_and_exits_zero(synthetic_corpus, tmp_path):
    """SIGTERM to torchrun (what SLURM sends ahead of a time limit): every rank finishes its
    step, the run saves that iteration and the workers exit 0 (torchrun itself then re-raises
    the signal, its own exit 1); the run then resumes from it."""
    save = tmp_path / "ckpt"
    metrics = tmp_path / "metrics.jsonl"
    data_path, tokenizer = synthetic_corpus
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "launch/pretrain_adamoe.sh",
        *small_model_args(hidden_dropout=0.0, attention_dropout=0.0),
        "--train-iters",
        "100000",
        "--data-path",
        data_path,
        "--tokenizer-model",
        tokenizer,
        "--save",
        str(save),
        "--adamoe-metrics-file",
        str(metrics),
    ]
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and _iterations_logged(metrics) < 5:
            time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    last = max(r["iteration"] for r in read_metrics(metrics) if "lm loss" in r)
    assert 5 <= last < 100000
    assert f"exit signal received: stopping after iteration {last}" in stdout
    assert f"saved checkpoint {save}/iter_{last:07d}" in stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == str(last)
    resumed = run_pretrain(synthetic_corpus, "--train-iters", str(last + 2), "--save", str(save))
    assert f"resuming at iteration {last}" in resumed.stdout


def _iterations_logged(metrics) -> int:
    try:
        return metrics.read_text().count('"lm loss"')
    except OSError:
        return 0
