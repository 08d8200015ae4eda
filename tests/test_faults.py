"""Fault injection: kill -9, SIGTERM under torchrun, worker crash + restart, ENOSPC, damaged files."""

from __future__ import annotations

import errno
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sslctl import checkpoint
from tests.fault_helpers import (
    ROOT,
    Forked,
    ForkServer,
    assert_same_weights,
    env,
    final_weights,
    run_cli,
    torchrun_cmd,
    write_profile,
)
from tests.image_helpers import noise_folder

KILLS = 20


@pytest.fixture(scope="module")
def server():
    """Each kill -9 attempt is a fresh process, forked from one that imported torch already."""
    with ForkServer() as s:
        yield s


@pytest.fixture(scope="module")
def setup(tmp_path_factory, server):
    base = tmp_path_factory.mktemp("faults")
    data = noise_folder(base / "data")
    prof = write_profile(base / "tiny.yaml")
    ref = base / "reference"
    t0 = time.monotonic()
    _complete(server, base / "reference.log", *_pretrain(prof, data, ref))
    return base, data, prof, final_weights(ref), time.monotonic() - t0


def _pretrain(prof: Path, data: Path, out: Path) -> list[str]:
    return ["pretrain", "--profile", str(prof), "--data", str(data), "--out", str(out)]


def _complete(server: ForkServer, log: Path, *args: str) -> None:
    """Run ``sslctl ARGS…`` in a forked child to its end; it must succeed."""
    code = server.start(*args, log=log).wait()
    assert code == 0, log.read_text()[-2000:]


def _check_disk(run: Path) -> int:
    """Every checkpoint on disk verifies and loads, or resume ignores it. Returns the resume step."""
    ckdir = run / "checkpoints"
    newest = checkpoint.newest_valid(ckdir)
    for c in checkpoint.list_checkpoints(ckdir):
        ok, _ = checkpoint.verify(c)
        if ok:
            checkpoint.load_safetensors(c.weights)
            checkpoint.load_train_state(c.state)
        else:
            assert newest is None or c.step != newest.step
    return 0 if newest is None else newest.step


def _kill_when(proc: Forked, run: Path, mode: str, after: float) -> None:
    """SIGKILL at a random moment, or the moment a checkpoint temp file is being written."""
    deadline = time.monotonic() + after
    ckdir = run / "checkpoints"
    while proc.poll() is None:
        if mode == "write" and ckdir.is_dir() and any(ckdir.glob(".sslctl-tmp.*")):
            break
        if mode == "time" and time.monotonic() >= deadline:
            break
        time.sleep(0.0005 if mode == "write" else 0.01)
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_kill9_at_random_moments_then_resume_matches(setup, server, tmp_path):
    base, data, prof, reference, wall = setup
    run = tmp_path / "run"
    rng = random.Random(1234)
    args = _pretrain(prof, data, run)
    killed = 0
    attempts: list[tuple[str, bool, int, int]] = []
    total = checkpoint.newest_valid(base / "reference" / "checkpoints").step
    for i in range(KILLS):
        # A finished run, rerun, does nothing (nothing to kill): start it over, which moves the
        # finished one to RUN/superseded/ — and keeps the kills coming at every phase of a run.
        newest = checkpoint.newest_valid(run / "checkpoints")
        over = newest is not None and newest.step == total
        proc = server.start(*args, *(["--fresh"] if over else []))
        mode = "write" if i % 2 else "time"
        _kill_when(proc, run, mode, rng.uniform(0.5, wall))
        killed += proc.returncode == -signal.SIGKILL
        attempts.append((mode, over, proc.returncode, _check_disk(run)))
    # most attempts really interrupted a run (mode, started over, exit code, resume step)
    assert killed >= KILLS // 2, attempts
    _complete(server, tmp_path / "resume.log", *args)
    assert_same_weights(final_weights(run), reference)


@pytest.mark.slow
@pytest.mark.ddp
def test_sigterm_to_torchrun_checkpoints_same_step_and_resumes(tmp_path):
    data = noise_folder(tmp_path / "data")
    prof = write_profile(tmp_path / "p.yaml", "\n")
    run = tmp_path / "run"
    prof.write_text(
        prof.read_text()
        .replace("epochs: 3", "epochs: 40")
        .replace("every_steps: 1", "every_steps: 0")
    )
    proc = subprocess.Popen(
        torchrun_cmd(*_pretrain(prof, data, run)),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (
        not metrics.is_file() or metrics.read_text().count("\n") < 3
    ):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert "received SIGTERM" in out, out[-3000:]
    assert "sslctl/" not in "".join(
        ln for ln in out.splitlines() if ln.strip().startswith("File ")
    ), out[-3000:]
    ck = checkpoint.newest_valid(run / "checkpoints")
    assert ck is not None and ck.step >= 3
    # both ranks stopped after the same step, the one rank 0 checkpointed
    assert f"[rank0] stopped at step {ck.step}: signal" in out, out[-3000:]
    assert f"[rank1] stopped at step {ck.step}: signal" in out, out[-3000:]
    assert ck.step < 40 * 2  # stopped early, mid-run
    # resume continues from that checkpoint
    r = run_cli(
        "pretrain",
        "--profile",
        str(prof),
        "--data",
        str(data),
        "--out",
        str(run),
        "--max-steps",
        str(ck.step + 1),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from {ck.weights}".replace(" ", "") in r.stderr.replace("\n", "").replace(
        " ", ""
    )
    assert checkpoint.newest_valid(run / "checkpoints").step == ck.step + 1


@pytest.mark.slow
@pytest.mark.ddp
def test_worker_crash_under_max_restarts_gives_same_weights(tmp_path):
    data = noise_folder(tmp_path / "data", n=72)
    prof = write_profile(tmp_path / "p.yaml")
    args = ["pretrain", "--profile", str(prof), "--data", str(data)]
    # Exactly one restart is allowed: the restarted workers must connect at the first try, which
    # needs dist.init's per-attempt store keys (torchrun keeps the dead attempt's keys).

    def torchrun(out: Path, crash: str | None) -> None:
        e = (
            env()
            | {"SSLCTL_DIST_TIMEOUT_S": "90"}
            | ({"SSLCTL_TEST_CRASH_AT": crash} if crash else {})
        )
        r = subprocess.run(
            torchrun_cmd(*args, "--out", str(out), restarts=1),
            cwd=ROOT,
            env=e,
            capture_output=True,
            text=True,
            timeout=900,
        )
        (out.parent / f"{out.name}.log").write_text(r.stdout + r.stderr)
        errors = [ln for ln in r.stderr.splitlines() if "Error" in ln][-6:]
        assert r.returncode == 0, f"see {out}.log: " + "\n".join([*errors, r.stderr[-800:]])
        assert "connectFullMesh failed" not in r.stderr

    torchrun(tmp_path / "a", None)
    marker = tmp_path / "crashed"
    torchrun(tmp_path / "b", f"4:1:{marker}")
    assert marker.exists()  # the crash really happened, and torchrun restarted the workers
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))


def test_enospc_on_save_keeps_previous_and_stops_cleanly(tmp_path, monkeypatch):
    from sslctl import api

    data = noise_folder(tmp_path / "data", n=24)
    prof = write_profile(tmp_path / "p.yaml")
    run = tmp_path / "run"
    api.pretrain(str(prof), run, data, max_steps=1)
    good = checkpoint.newest_valid(run / "checkpoints")
    assert good is not None

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_bytes", no_space)
    from sslctl.engine.run_state import TrainingHalted

    with pytest.raises(TrainingHalted) as halted:
        api.pretrain(str(prof), run, data, max_steps=2)
    # the file it failed on and the OS's words, no guess at the cause
    assert re.search(
        r"checkpoints/step_\d+\.\w+: No space left on device.*previous checkpoint is intact",
        str(halted.value),
    ), str(halted.value)
    assert "free space" not in str(halted.value)
    assert checkpoint.newest_valid(run / "checkpoints") == good
    assert checkpoint.verify(good) == (True, "ok")
    assert not list((run / "checkpoints").glob(".sslctl-tmp.*"))


@pytest.mark.slow  # `sslctl pretrain` in a subprocess
def test_enospc_through_cli_is_one_line(tmp_path):
    """The same failure from the command line: exit 2, one 'error:' line, no traceback."""
    data = noise_folder(tmp_path / "data", n=24)
    prof = write_profile(tmp_path / "p.yaml")
    run = tmp_path / "run"
    code = (
        "import errno, sys\n"
        "from sslctl import checkpoint\n"
        "def f(*a, **k): raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "checkpoint.write_bytes = f\n"
        "from sslctl.cli.app import main\n"
        f"sys.argv = ['sslctl', 'pretrain', '--profile', {str(prof)!r}, '--data', {str(data)!r}, '--out', {str(run)!r}, '--max-steps', '1']\n"
        "main()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "error: cannot write a checkpoint" in r.stderr
