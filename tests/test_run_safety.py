"""The run directory's promise, through the real CLI in subprocesses: a verified checkpoint is
never deleted or overwritten except by keep_last pruning of older steps of the same run.

Each test snapshots the verified checkpoints first and proves afterwards that every one of them
is still present (in the run or under RUN/superseded/) and still verifies, and that
metrics.jsonl has neither gaps nor duplicate steps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sslctl import checkpoint, config, files, rundir
from sslctl.api.pretrain import recorded_config
from sslctl.log import read_jsonl
from tests.fault_helpers import ROOT, env, run_cli, sslctl_cmd, write_profile
from tests.image_helpers import noise_folder

# 48 images, batch 12: 4 steps per epoch, 3 epochs; a checkpoint every step, 2 kept (+ epochs)
STEPS = 12


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    data = noise_folder(root / "data")
    prof = write_profile(root / "tiny.yaml")
    done = root / "done"  # one finished run, copied by the tests that need one
    r = run_cli(*_args(prof, data, done))
    assert r.returncode == 0, r.stderr[-2000:]
    return {"root": root, "data": data, "prof": prof, "done": done}


def _args(prof: Path, data: Path, out: Path, *more: str) -> list[str]:
    return ["pretrain", "--profile", str(prof), "--data", str(data), "--out", str(out), *more]


def _copy_done(base, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(base["done"], run, ignore=shutil.ignore_patterns(rundir.LOCK_NAME))
    return run


def _verified(run: Path) -> dict[int, bytes]:
    """step -> manifest bytes of every verified checkpoint in the run's checkpoints/."""
    out = {}
    for c in checkpoint.list_checkpoints(run / "checkpoints"):
        if checkpoint.verify(c)[0]:
            out[c.step] = c.manifest.read_bytes()
    return out


def _all_kept(run: Path, before: dict[int, bytes]) -> None:
    """Every checkpoint verified before is still verified, in the run or under superseded/."""
    places = [run / "checkpoints", *sorted((run / rundir.SUPERSEDED).glob("*/checkpoints"))]
    for step, manifest in before.items():
        found = [
            c
            for d in places
            for c in [checkpoint.CkptPaths.of(d, step)]
            if c.manifest.is_file() and c.manifest.read_bytes() == manifest
        ]
        assert found, f"step {step} lost"
        assert checkpoint.verify(found[0]) == (True, "ok"), step


def _train_steps(path: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(path) if "loss" in r]


def _no_gaps(path: Path, upto: int) -> None:
    assert _train_steps(path) == list(range(1, upto + 1))


def _one_error(r: subprocess.CompletedProcess, *fragments: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    flat = " ".join(r.stderr.split())
    lines = [ln for ln in flat.split("error:")[1:]]
    assert len(lines) == 1, r.stderr
    for f in fragments:
        assert " ".join(f.split()) in lines[0], (f, lines[0])
    return lines[0]


# ----------------------------------------------------------------- 1. divergence
def test_diverging_run_keeps_the_newest_finite_checkpoint_and_exits_4(base, tmp_path):
    run = tmp_path / "run"
    prof, data = base["prof"], base["data"]
    keep = ("--set", "ckpt.keep_last=50")  # no pruning: every checkpoint must survive
    assert run_cli(*_args(prof, data, run, "--max-steps", "3"), *keep).returncode == 0
    before = _verified(run)
    r = run_cli(
        *_args(prof, data, run, "--allow-changes"), *keep,
        "--set", "optim.lr=1e9", "--set", "train.max_nonfinite=2",
    )  # fmt: skip
    assert r.returncode == 4, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    flat = " ".join(r.stderr.split())
    assert "training diverged" in flat and "nothing was saved from" in flat
    _all_kept(run, before)
    newest = checkpoint.newest_valid(run / "checkpoints")
    for c in checkpoint.list_checkpoints(run / "checkpoints"):
        tensors, _ = checkpoint.load_safetensors(c.weights)
        assert all(torch.isfinite(t).all() for t in tensors.values()), c.step
    assert f"newest finite checkpoint is {newest.weights}".replace(" ", "") in flat.replace(" ", "")
    status = json.loads((run / "status.json").read_text())
    assert status["stopped"] == "diverged" and status["checkpoint"] == str(newest.weights)


# ----------------------------------------------------------------- 2. older resume / none
def test_resume_none_or_older_path_is_refused_then_rewind_moves_aside(base, tmp_path):
    run = _copy_done(base, tmp_path)
    prof, data = base["prof"], base["data"]
    before = _verified(run)
    oldest = checkpoint.CkptPaths.of(run / "checkpoints", min(before))
    r = run_cli(*_args(prof, data, run, "--resume", "none"))
    _one_error(r, "--resume none would start a second run", "--fresh")
    r = run_cli(*_args(prof, data, run, "--resume", str(oldest.weights)))
    _one_error(r, f"step {oldest.step} is older than this run's newest", "--rewind")
    assert _verified(run) == before  # nothing changed by a refusal
    r = run_cli(*_args(prof, data, run, "--resume", str(oldest.weights), "--rewind"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(nothing deleted)" in r.stderr
    _all_kept(run, before)
    moved = sorted((run / rundir.SUPERSEDED).iterdir())
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").is_file()
    status = json.loads((run / "status.json").read_text())
    assert Path(status["checkpoint"]).is_file() and status["step"] == STEPS
    _no_gaps(run / "metrics.jsonl", STEPS)  # history up to the rewind point, then the new steps
    # the rewound lineage starts from its own (linked) copy of the rewind point, an epoch end
    # kept for good here, and prunes only its own steps
    assert max(_verified(run)) == STEPS and min(_verified(run)) == oldest.step


def test_a_refused_rewind_moves_nothing(base, tmp_path):
    """--rewind with other settings is refused before the run is moved aside."""
    run = _copy_done(base, tmp_path)
    before = sorted(p.name for p in run.rglob("*") if p.name != rundir.LOCK_NAME)
    oldest = checkpoint.CkptPaths.of(run / "checkpoints", min(_verified(run)))
    r = run_cli(
        *_args(base["prof"], base["data"], run, "--resume", str(oldest.weights), "--rewind"),
        "--set", "optim.lr=0.1",
    )  # fmt: skip
    _one_error(r, "optim.lr 0.5 → 0.1", "--allow-changes")
    assert sorted(p.name for p in run.rglob("*") if p.name != rundir.LOCK_NAME) == before


def test_runs_of_earlier_builds_resume_with_their_unresolved_data_root(base, tmp_path):
    """Checkpoints written before data.root was recorded resolved (no data_root in their
    metadata; data.root as the profile had it) resume with --data, not as a change."""
    run = tmp_path / "run"
    assert run_cli(*_args(base["prof"], base["data"], run, "--max-steps", "2")).returncode == 0
    ck = checkpoint.newest_valid(run / "checkpoints")
    tensors, meta = checkpoint.load_safetensors(ck.weights)
    old = json.loads(meta.pop("data_root") and meta["config"])
    old["data"]["root"] = ""
    meta["config"] = json.dumps(old)
    ck.weights.write_bytes(checkpoint.safetensors_bytes(tensors, meta))
    manifest = json.loads(ck.manifest.read_text())
    manifest["files"][ck.weights.name] = checkpoint.sha256_file(ck.weights)
    ck.manifest.write_text(json.dumps(manifest))
    r = run_cli(*_args(base["prof"], base["data"], run, "--max-steps", "3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint.newest_valid(run / "checkpoints").step == 3


def test_fresh_moves_the_run_aside_and_starts_over(base, tmp_path):
    run = _copy_done(base, tmp_path)
    before = _verified(run)
    r = run_cli(*_args(base["prof"], base["data"], run, "--fresh", "--max-steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    _all_kept(run, before)
    assert sorted(_verified(run)) == [1, 2]
    _no_gaps(run / "metrics.jsonl", 2)


def test_contradictory_flags_are_refused(base, tmp_path):
    run = tmp_path / "run"
    for flags, said in (
        (["--fresh", "--rewind", "--resume", "x"], "exclude each other"),
        (["--fresh", "--resume", "x"], "use --rewind"),
        (["--rewind"], "name it with --resume PATH"),
    ):
        _one_error(run_cli(*_args(base["prof"], base["data"], run, *flags)), said)
    assert not run.exists()


# ----------------------------------------------------------------- 3. complete run: nothing to do
def test_rerunning_a_finished_run_does_nothing(base, tmp_path):
    run = _copy_done(base, tmp_path)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    r = run_cli(*_args(base["prof"], base["data"], run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{run} is complete at step {STEPS} (nothing to do)" in " ".join(r.stderr.split())
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}
    after.pop(run / rundir.LOCK_NAME)
    assert after == files


# ----------------------------------------------------------------- 4. nothing verifies
def test_a_stale_status_of_a_finished_run_is_repaired(base, tmp_path):
    """Killed between its last checkpoint and its status write, a finished run's status.json
    still says "signal" (a requeue loop for a wrapper): the rerun, with nothing to do, fixes it."""
    run = _copy_done(base, tmp_path)
    (run / "status.json").write_text('{"stopped": "signal", "step": 7}\n')
    r = run_cli(*_args(base["prof"], base["data"], run))
    assert r.returncode == 0, r.stderr[-3000:]
    status = json.loads((run / "status.json").read_text())
    assert status["stopped"] == "done" and status["step"] == STEPS


def test_no_verified_checkpoint_is_refused_and_kept(base, tmp_path):
    run = _copy_done(base, tmp_path)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    for m in (run / "checkpoints").glob("*.json"):
        m.unlink()
    r = run_cli(*_args(base["prof"], base["data"], run))
    _one_error(r, "but none verifies", f"sslctl checkpoints {run}", "--fresh")
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert left == [n for n in names if not n.endswith(".json")]
    r = run_cli(*_args(base["prof"], base["data"], run, "--fresh", "--max-steps", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    (moved,) = (run / rundir.SUPERSEDED).iterdir()
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == left


# ----------------------------------------------------------------- 5. the lock
def test_second_process_on_a_run_directory_is_refused_at_once(base, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        sslctl_cmd(*_args(base["prof"], base["data"], run), "--set", "train.epochs=50"),
        cwd=ROOT,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (run / "metrics.jsonl").is_file():
            time.sleep(0.2)
        t0 = time.monotonic()
        r = run_cli(*_args(base["prof"], base["data"], run), "--set", "train.epochs=50")
        _one_error(r, f"{run} is in use by pid {proc.pid} on host", "since")
        assert time.monotonic() - t0 < 60
        steps_before = _train_steps(run / "metrics.jsonl")
    finally:
        proc.kill()
        proc.wait()
    # the kernel released the killed owner's lock: the run resumes, its metrics continuous
    more = ("--max-steps", str(len(steps_before) + 2), "--set", "train.epochs=50")
    r = run_cli(*_args(base["prof"], base["data"], run, *more))
    assert r.returncode == 0, r.stderr[-3000:]
    newest = checkpoint.newest_valid(run / "checkpoints")
    _no_gaps(run / "metrics.jsonl", newest.step)


@pytest.mark.parametrize("command", ["linear-eval", "eval-reid", "knn-eval"])
def test_evaluation_output_directories_are_locked(base, tmp_path, command):
    out = tmp_path / "out"
    weights = checkpoint.resolve(base["done"]).weights
    labelled = tmp_path / "labelled"
    for split in ("train", "val"):
        noise_folder(labelled / split, n=24)
    data = ["--data", str(labelled)]
    if command == "eval-reid":  # identities as class folders: train/ as query, val/ as gallery
        data = ["--layout", "imagefolder", "--query", str(labelled / "train")]
        data += ["--gallery", str(labelled / "val")]
    with rundir.DirLock(out):
        r = run_cli(command, str(weights), *data, "--out", str(out))
        _one_error(r, f"{out} is in use by pid {os.getpid()} on host")


# ----------------------------------------------------------------- 6. temporaries
def test_stale_temporaries_are_removed_at_start(base, tmp_path):
    run = _copy_done(base, tmp_path)
    stale = [
        run / "checkpoints" / f"{files.TMP_PREFIX}step_00000013.safetensors.x1",
        run / f"{files.TMP_PREFIX}status.json.x2",
    ]
    for p in stale:
        p.write_bytes(b"\0" * (5 << 20))
    r = run_cli(*_args(base["prof"], base["data"], run, "--set", "train.epochs=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not any(p.exists() for p in stale)
    _no_gaps(run / "metrics.jsonl", STEPS + 4)  # train.epochs grew: continuing, not a change


# ----------------------------------------------------------------- 7. explicit resume path
def test_resume_path_that_does_not_verify_is_refused(base, tmp_path):
    run = _copy_done(base, tmp_path)
    newest = checkpoint.newest_valid(run / "checkpoints")
    data = bytearray(newest.weights.read_bytes())
    data[-5] ^= 0x01
    newest.weights.write_bytes(bytes(data))
    other = tmp_path / "other"
    r = run_cli(*_args(base["prof"], base["data"], other, "--resume", str(newest.weights)))
    _one_error(r, f"--resume {newest.weights}: it does not verify", "does not match its sha256")


# ----------------------------------------------------------------- 10. changed settings
def test_changed_settings_are_refused_unless_allowed(base, tmp_path):
    run = tmp_path / "run"
    prof, data = base["prof"], base["data"]
    assert run_cli(*_args(prof, data, run, "--max-steps", "2")).returncode == 0
    other = noise_folder(tmp_path / "other", n=48)
    r = run_cli(*_args(prof, other, run, "--max-steps", "3"), "--set", "optim.lr=0.1")
    _one_error(
        r,
        "was started with other settings",
        f"data.root '{data.resolve()}' → '{other.resolve()}'",
        "optim.lr 0.5 → 0.1",
        "--allow-changes",
    )
    r = run_cli(
        *_args(prof, data, run, "--max-steps", "3", "--allow-changes"), "--set", "optim.lr=0.1"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    recs = read_jsonl(run / "metrics.jsonl")
    (event,) = [x for x in recs if x.get("event") == "config_changed"]
    assert event["step"] == 2 and event["changes"] == {"optim.lr": [0.5, 0.1]}
    status = json.loads((run / "status.json").read_text())
    assert status["changes"] == {"optim.lr": [0.5, 0.1]}
    _no_gaps(run / "metrics.jsonl", 3)
    # --max-steps is not a setting; the run continues unchanged with the new lr recorded
    r = run_cli(*_args(prof, data, run, "--max-steps", "4"), "--set", "optim.lr=0.1")
    assert r.returncode == 0, r.stderr[-3000:]


# ----------------------------------------------------------------- 11. config.yaml
def test_config_yaml_records_what_ran(base, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(base["data"], tmp_path / "rel" / "train")
    r = subprocess.run(
        sslctl_cmd(*_args(base["prof"], Path("rel/train"), run, "--max-steps", "1")),
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    text = (run / "config.yaml").read_text()
    from sslctl import __version__

    assert text.startswith(f"# sslctl {__version__}:")
    saved = config.load(str(run / "config.yaml"))
    assert saved.data.root == str((tmp_path / "rel" / "train").resolve())
    status = json.loads((run / "status.json").read_text())
    assert status["sslctl_version"] == __version__
    assert status["data_root"] == saved.data.root


# ----------------------------------------------------------------- 12. demo kNN monitor
def test_demo_knn_monitor_is_off_with_user_data(tmp_path):
    cfg = config.load("demo-cpu")
    assert cfg.eval.knn_every == 2 and cfg.eval.knn_train == "bundled"
    data = noise_folder(tmp_path / "d", n=24, size=36)
    run = tmp_path / "run"
    # two epochs of 2 steps: the monitor would score the bundled digits at the second end
    r = run_cli(*_args(Path("demo-cpu"), data, run), "--set", "train.batch_size=12",
                "--max-steps", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    said = " ".join(r.stderr.split())
    assert said.count("kNN monitor off") == 1 and "--set eval.knn_train=DIR" in said
    assert not [x for x in read_jsonl(run / "metrics.jsonl") if "knn_top1" in x]
    assert config.load(str(run / "config.yaml")).eval.knn_every == 0
    from sslctl.data.bundled import bundled_root

    kept = recorded_config(cfg, None, bundled_root() / "train")  # bundled data: the monitor stays
    assert kept.eval.knn_every == cfg.eval.knn_every and kept.data.root == "bundled"


def test_kill9_then_rerun_leaves_no_temporaries_and_a_continuous_history(base, tmp_path):
    """A process killed at any moment (here: while a checkpoint is being written) loses no
    verified checkpoint; the rerun cleans its temporaries and continues the metrics."""
    run = tmp_path / "run"
    args = _args(base["prof"], base["data"], run)
    for _ in range(3):
        before = _verified(run) if run.is_dir() else {}
        proc = subprocess.Popen(
            sslctl_cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        ckdir = run / "checkpoints"
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if ckdir.is_dir() and any(ckdir.glob(f"{files.TMP_PREFIX}*")):
                break
            time.sleep(0.0005)
        proc.kill()
        proc.wait()
        newest = checkpoint.newest_valid(ckdir)
        kept = {s: m for s, m in before.items() if newest is None or s >= newest.step - 2}
        _all_kept(run, kept)  # pruning may drop steps older than keep_last (+ epoch ends)
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not list(run.rglob(f"{files.TMP_PREFIX}*"))
    _no_gaps(run / "metrics.jsonl", STEPS)


# every test runs `sslctl pretrain` (or an evaluation) in a subprocess: 30-90 s each
pytestmark = [pytest.mark.slow]
if sys.platform != "linux":  # flock and FIFOs as tested here are Linux behaviour
    pytestmark.append(pytest.mark.skip("Linux only"))


def test_failed_start_leaves_no_empty_run_folder(base, tmp_path):
    """A pretrain that fails before writing anything (here: a data folder with no images) does
    not leave a new, empty --out behind; an existing --out is kept as it was."""
    empty = tmp_path / "no-images"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image\n")
    out = tmp_path / "new" / "run"
    r = run_cli(*_args(base["prof"], empty, out))
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr + r.stdout
    assert not out.exists() and not out.parent.exists()  # nor the parent it made for it
    kept = tmp_path / "existing"
    kept.mkdir()
    r = run_cli(*_args(base["prof"], empty, kept))
    assert r.returncode == 2
    assert kept.is_dir()


def test_failed_evaluation_leaves_no_empty_out(base, tmp_path):
    """knn-eval that fails during extraction (an undecodable image: after the lock is taken,
    before anything is written) leaves no new, empty --out either."""
    labelled = tmp_path / "labelled"
    for split in ("train", "val"):
        noise_folder(labelled / split, n=12)
    (labelled / "train" / "c0" / "broken.png").write_bytes(b"")  # the first split extracted
    out = tmp_path / "knn"
    weights = checkpoint.resolve(base["done"]).weights
    r = run_cli("knn-eval", str(weights), "--data", str(labelled), "--out", str(out), "--k", "3")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "broken.png" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists(), sorted(p.name for p in out.iterdir())
