"""Stop signals with real processes: SIGTERM to the whole process group (Slurm, `timeout`,
`kill -TERM -- -PGID`) stops like a SIGTERM to the main process alone, DataLoader workers
(fork and forkserver) survive it, and Ctrl-C during start-up prints one line and exits 130."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import typer
from torch.utils.data import Dataset

from sslctl import STOP_SIGNALS, checkpoint, entry
from sslctl.cli.common import user_errors
from sslctl.data.tv import WorkerLoader
from tests.fault_helpers import ROOT, TINY_PROFILE, env
from tests.image_helpers import noise_folder

LONG = 300  # seconds: the most any one process in these tests may take


def _long_profile(path: Path) -> Path:
    """The tiny fault-test profile with 2 DataLoader workers and far more epochs than a test
    waits for (checkpoints at epoch ends and on the stop only)."""
    text = TINY_PROFILE
    for old, new in (
        ("workers: 0", "workers: 2"),
        ("epochs: 3", "epochs: 200"),
        ("every_steps: 1", "every_steps: 0"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def _group_alive(pgid: int) -> list[int]:
    """Processes still in process group pgid (Linux /proc)."""
    alive = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid:
                    alive.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                pass
    return alive


def _assert_group_gone(pgid: int, within: float = 30.0) -> None:
    """No process of the run (workers, forkserver) outlives it (checked where /proc exists;
    any that do are killed)."""
    if not Path("/proc/self").is_dir():
        return
    deadline = time.monotonic() + within
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = _group_alive(pgid)
    if left:
        os.killpg(pgid, signal.SIGKILL)
    assert not left, f"left behind: {left}"


def _start_group(cmd: list[str]) -> subprocess.Popen:
    """``cmd`` in its own process group (as under Slurm or `timeout`), output piped as text."""
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def _wait_for_steps(proc: subprocess.Popen, run: Path, lines: int = 3) -> None:
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + LONG
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= lines:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {lines} metric lines (exit {proc.poll()})")


def _assert_clean_signal_stop(run: Path, rc: int, out: str, err: str) -> int:
    """Exit 3, one 'received SIGTERM' line, no traceback, status.json and a verified checkpoint
    at the step it names. Returns that step."""
    both = out + err
    assert rc == 3, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    assert both.count("received SIGTERM") == 1, both[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["stopped"] == "signal", status
    ck = checkpoint.newest_valid(run / "checkpoints")
    assert ck is not None and ck.step == status["step"] >= 3, (status, ck)
    assert checkpoint.verify(ck)[0]
    return ck.step


def _resume_one_more_step(prof: Path, data: Path, run: Path, step: int) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "sslctl", "pretrain", "--profile", str(prof), "--data", str(data)]
        + ["--out", str(run), "--max-steps", str(step + 1)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    ck = checkpoint.newest_valid(run / "checkpoints")
    assert ck is not None and ck.step == step + 1


def _pretrain_cmd(prof: Path, data: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "sslctl", "pretrain", "--profile", str(prof)] + [
        "--data",
        str(data),
        "--out",
        str(run),
    ]


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_resumes(tmp_path):
    data = noise_folder(tmp_path / "data")
    prof = _long_profile(tmp_path / "p.yaml")
    run = tmp_path / "run"
    with open(tmp_path / "out", "w+") as out, open(tmp_path / "err", "w+") as err:
        proc = subprocess.Popen(
            _pretrain_cmd(prof, data, run),
            cwd=ROOT,
            env=env(),
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group, as under Slurm or `timeout`
        )
        try:
            _wait_for_steps(proc, run)
            os.killpg(proc.pid, signal.SIGTERM)  # main process and its DataLoader workers
            rc = proc.wait(timeout=LONG)
        finally:
            _kill_group(proc)
        _assert_group_gone(proc.pid)
        step = _assert_clean_signal_stop(
            run, rc, Path(out.name).read_text(), Path(err.name).read_text()
        )
    _resume_one_more_step(prof, data, run, step)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils `timeout`")
def test_timeout_signals_the_group_and_the_run_stops_cleanly(tmp_path):
    """GNU timeout sends SIGTERM to its whole process group; --preserve-status passes on our 3."""
    data = noise_folder(tmp_path / "data")
    prof = _long_profile(tmp_path / "p.yaml")
    run = tmp_path / "run"
    cmd = ["timeout", "--preserve-status", "-s", "TERM", "30", *_pretrain_cmd(prof, data, run)]
    proc = _start_group(cmd)
    try:
        out, err = proc.communicate(timeout=LONG)
    finally:
        _kill_group(proc)
    assert (run / "metrics.jsonl").is_file(), "training had not started after 30 s"
    step = _assert_clean_signal_stop(run, proc.returncode, out, err)
    _assert_group_gone(proc.pid)
    _resume_one_more_step(prof, data, run, step)


_LOADER_SCRIPT = """
import os, signal, sys, time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from sslctl.data.tv import WorkerLoader
from sslctl.eval.features import extract_features_and_labels

MARK = Path(sys.argv[2])


class Slow(Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        MARK.touch()  # a worker is running
        time.sleep(0.05)
        return torch.full((3, 2, 2), float(i)), i, i


if __name__ == "__main__":
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # as the engine's StopFlag
    start = sys.argv[1]
    if start == "forkserver":  # the kNN monitor's way: extraction with forkserver workers
        _, labels = extract_features_and_labels(
            nn.Flatten(), Slow(), batch_size=2, device="cpu", workers=2, worker_start=start
        )
    else:  # persistent forked workers, as the pre-training loader; still alive at exit, where
        # multiprocessing ends them with its own SIGTERM, which they must obey
        loader = WorkerLoader(Slow(), batch_size=2, num_workers=2, persistent_workers=True)
        labels = torch.cat([b[1] for b in loader] + [b[1] for b in loader])[:40]
    assert labels.tolist() == list(range(40)), labels
    print(f"finished, main got {len(got)} SIGTERM")
"""


@pytest.mark.slow
@pytest.mark.parametrize("start", ["fork", "forkserver"])
def test_dataloader_workers_survive_sigterm_to_the_group(tmp_path, start):
    """The main process decides: workers (and a forkserver) ignore the group's SIGTERM."""
    script = tmp_path / "loader.py"
    script.write_text(textwrap.dedent(_LOADER_SCRIPT))
    mark = tmp_path / "worker-ran"
    proc = _start_group([sys.executable, str(script), start, str(mark)])
    try:
        deadline = time.monotonic() + LONG
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert mark.exists(), proc.communicate(timeout=LONG)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=LONG)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "finished, main got 1 SIGTERM" in out, (out, err[-3000:])
    _assert_group_gone(proc.pid)


_MARKED: list[int] = []


def _mark_worker(worker_id: int) -> None:
    _MARKED.append(worker_id)


class _SignalReport(Dataset):
    """Each item: (are SIGTERM, SIGINT, SIGUSR1 ignored in this worker, is SIGTERM blocked in
    it (left to its watcher thread), did the caller's worker_init_fn run here)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool, bool]:
        ignored = [signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS]
        blocked = signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        return torch.tensor(ignored, dtype=torch.int64), blocked, bool(_MARKED)


def _alive(proc: multiprocessing.process.BaseProcess, seconds: float) -> bool:
    proc.join(seconds)
    return proc.is_alive()


@pytest.mark.slow  # two subprocesses that each import torch
def test_workers_ignore_stop_signals_except_their_owners_sigterm():
    """Workers ignore the stop signals, the caller's own worker_init_fn still runs, and a
    SIGTERM from the loader's own process still ends a worker (torch's shutdown, and
    multiprocessing's at interpreter exit, rely on it)."""
    before = set(multiprocessing.active_children())
    loader = WorkerLoader(
        _SignalReport(),
        batch_size=1,
        num_workers=2,
        worker_init_fn=_mark_worker,
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    rows = list(loader)
    assert len(rows) == 4
    for ignored, blocked, marked in rows:
        assert ignored.tolist() == [[1, 1, 1]]
        assert blocked.tolist() == [True]
        assert marked.tolist() == [True]
    assert signal.getsignal(signal.SIGTERM) != signal.SIG_IGN  # the main process: untouched
    assert not _MARKED
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    for w in workers:
        assert w.pid is not None
        for s in STOP_SIGNALS:  # from another process, as Slurm or `timeout` would
            subprocess.run(
                [sys.executable, "-c", f"import os; os.kill({w.pid}, {int(s)})"],
                check=True,
                timeout=60,
            )
        assert _alive(w, 1.0)
        w.terminate()  # SIGTERM from this process, the loader's owner
        assert not _alive(w, 30.0)
        assert w.exitcode == 0
    del loader


def _startup_seconds() -> float:
    """How long this machine takes to start Python and import sslctl.entry (calibrates how
    early "very early" is, so a loaded machine does not send the signal before Python runs)."""
    times = []
    for _ in range(3):
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", "import sslctl.entry"], cwd=ROOT, env=env(), timeout=60
        )
        times.append(time.monotonic() - t0)
    return max(times)


@pytest.mark.slow
def test_ctrl_c_during_startup_prints_one_line_and_exits_130():
    base = 1.5 * _startup_seconds()
    interrupted = 0
    for delay in (base, base + 0.1, base + 0.3, base + 0.6, base + 1.2):
        proc = _start_group([sys.executable, "-m", "sslctl", "profiles"])
        try:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
            out, err = proc.communicate(timeout=120)
        finally:
            _kill_group(proc)
        ctx = f"SIGINT after {delay:.2f} s: exit {proc.returncode}\n{err[-3000:]}"
        assert "Traceback" not in err, ctx
        assert proc.returncode in (130, 0), ctx
        assert err.count("received SIGINT") == (proc.returncode == 130), ctx
        if proc.returncode == 130:
            assert entry.STOPPED_MESSAGE in err, ctx
            interrupted += 1
    assert interrupted, "every SIGINT came after the command had finished: nothing was tested"


def test_keyboard_interrupt_in_a_command_is_one_line_and_130(capsys):
    @user_errors
    def command() -> None:
        raise KeyboardInterrupt

    with pytest.raises(typer.Exit) as e:
        command()
    assert e.value.exit_code == 130
    err = capsys.readouterr().err
    assert err.strip() == "received SIGINT: stopped"


def test_command_start_restores_keyboard_interrupt_only_after_the_entry_handler():
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, entry._stop_before_command)
        entry.command_started()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        sentinel = signal.SIG_DFL
        signal.signal(signal.SIGINT, sentinel)
        entry.command_started()  # someone else's handler: left alone
        assert signal.getsignal(signal.SIGINT) == sentinel
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_to_the_group_of_nproc_per_node_reaches_torchrun_once(tmp_path, sig):
    """`sslctl pretrain --nproc-per-node 2` under a group SIGTERM or SIGUSR1 (Slurm's warning):
    the launcher passes the signal on once (torchrun runs in its own session and forwards
    SIGUSR1 too), rank 0 checkpoints the step both ranks stopped after, status.json names it,
    and the launcher exits 3 as a one-process run would."""
    data = noise_folder(tmp_path / "data")
    prof = _long_profile(tmp_path / "p.yaml")
    run = tmp_path / "run"
    with open(tmp_path / "log", "w+") as log:
        proc = subprocess.Popen(
            [*_pretrain_cmd(prof, data, run), "--nproc-per-node", "2"],
            cwd=ROOT,
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_for_steps(proc, run)
            os.killpg(proc.pid, sig)
            rc = proc.wait(timeout=LONG)
        finally:
            _kill_group(proc)
        text = Path(log.name).read_text()
    assert rc == 3, text[-3000:]  # torchrun's 1, read with status.json: stopped on a signal
    assert text.count(f"received {sig.name}") == 1, text[-3000:]  # rank 0's line, once
    status = json.loads((run / "status.json").read_text())
    ck = checkpoint.newest_valid(run / "checkpoints")
    assert status["stopped"] == "signal" and ck is not None and ck.step == status["step"], status
