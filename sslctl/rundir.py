"""Run and output directories: one owner at a time, and never a lost verified checkpoint.

The promise (README "What sslctl promises about your run directory"): a verified checkpoint is
never deleted or overwritten, except by ``ckpt.keep_last`` pruning of older steps of the same run.
Everything here runs on rank 0 with the directory's lock held:

- ``DirLock``: ``fcntl.flock`` on ``DIR/.lock`` for the life of the process (the kernel releases
  it when the process dies, however it dies); a second process is refused at once.
- ``plan_resume``: which checkpoint ``pretrain`` continues from, refusing every surprise (an
  older ``--resume PATH``, ``--resume none`` beside checkpoints, nothing that verifies, changed
  settings) with one line that names the way forward.
- ``supersede``: what ``--fresh`` and ``--rewind`` do first — move the run's checkpoints,
  metrics and status to ``RUN/superseded/<timestamp>/``. Nothing is ever deleted.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import json
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sslctl import UserError, checkpoint, dist, files, log

LOCK_NAME = ".lock"
SUPERSEDED = "superseded"
# What --fresh/--rewind move aside: everything that describes the superseded lineage
# (tb/: its TensorBoard events, log.tensorboard).
RUN_FILES = ("checkpoints", "metrics.jsonl", "status.json", "config.yaml", "tb")


def check_writable(out: Path) -> None:
    """``out`` is, or can become, a writable folder; nothing is created, so that a refusal later
    on leaves no empty ``--out`` behind (DirLock creates it when the work starts)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file, not a folder: choose a folder path")
    if out.is_dir():
        try:  # a write probe: permissions, ACLs, a read-only mount
            probe = out / f".sslctl-write-test-{os.getpid()}"  # not a temporary another run removes
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(
                f"--out {out}: cannot write there ({e.strerror or e}); choose a writable directory"
            ) from None
        return
    base = out.absolute().parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UserError(f"--out {out}: {base} is a file, not a folder; choose another --out")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(
            f"--out {out}: cannot create it, {base} is not writable; choose a writable folder"
        )


class DirLock:
    """An exclusive lock on ``directory`` (created if missing), held until ``release``/exit.

    The lock file holds who owns it (pid, host, start time) so that the refusal can say so.
    """

    def __init__(self, directory: Path, what: str = "--out"):
        self.directory = directory
        self._fh: IO[str] | None = None
        # folders this lock creates (the directory and missing parents, deepest first): removed
        # again, when empty, if the command fails before writing anything
        self.created = [p for p in [directory, *directory.absolute().parents] if not p.exists()]
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fh = open(directory / LOCK_NAME, "a+", encoding="utf-8")  # noqa: SIM115 - held open
        except OSError as e:
            raise UserError(
                f"{what} {directory}: cannot write there ({e.strerror or e}); choose a writable directory"
            ) from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = _owner(fh.read())
            fh.close()
            raise UserError(
                f"{directory} is in use by {owner}; wait for that process to finish (or stop it), "
                "or choose another directory"
            ) from None
        except OSError as e:  # a filesystem without locks: say so rather than run unprotected
            fh.close()
            raise UserError(
                f"{what} {directory}: cannot lock it ({e.strerror or e}); use a local or "
                "lock-capable filesystem for run directories"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                }
            )
            + "\n"
        )
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the descriptor drops the flock
            self._fh = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self.created:
            self._discard_if_unused()
        self.release()

    def _discard_if_unused(self) -> None:
        """A command that failed before writing anything (bad --data, an undecodable image)
        leaves no new output folder behind: remove the folder this lock created when it holds
        only the lock and empty folders (a features cache/ made ready, say)."""
        try:
            walk = list(os.walk(self.directory, topdown=False))
            files = [os.path.join(d, f) for d, _, fs in walk for f in fs]
            if files != [str(self.directory / LOCK_NAME)]:
                return
            (self.directory / LOCK_NAME).unlink()
            for d, _, _ in walk:  # deepest first
                os.rmdir(d)
            for parent in self.created[1:]:
                os.rmdir(parent)  # only while empty: OSError otherwise, and we stop
        except OSError:
            pass  # best effort: an empty folder is harmless


def lock_on_main(directory: Path, is_main: bool) -> contextlib.AbstractContextManager[Any]:
    """The output directory's lock, taken by rank 0 (a no-op elsewhere); a refusal is raised on
    every rank alike, so no rank waits for one that has left."""
    lock: DirLock | None = None
    error = ""
    if is_main:
        try:
            lock = DirLock(directory)
            # ours now: temporaries left by a killed run or evaluation are stale
            for d in [directory, *(p for p in directory.iterdir() if p.is_dir())]:
                files.remove_stale_temps(d)
        except UserError as e:
            error = str(e)
        except OSError as e:  # permissions, a read-only disk
            error = f"{directory}: {e.strerror or e}; fix the directory, then rerun"
        if error and lock is not None:
            lock.release()
            lock = None
    error = str(dist.broadcast_object(error))
    if error:
        raise UserError(error)
    return lock if lock is not None else contextlib.nullcontext()


def _owner(text: str) -> str:
    try:
        o = json.loads(text)
        return f"pid {o['pid']} on host {o['host']} since {o['since']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


def supersede(run: Path) -> Path | None:
    """Move the run's checkpoints, metrics.jsonl, status.json and config.yaml to
    ``RUN/superseded/<timestamp>/``; the destination, or None when there was nothing to move."""
    present = [run / n for n in RUN_FILES if (run / n).exists()]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = run / SUPERSEDED / stamp
    n = 1
    while dest.exists():
        dest = run / SUPERSEDED / f"{stamp}-{n}"
        n += 1
    dest.mkdir(parents=True)
    for p in present:
        os.replace(p, dest / p.name)  # a rename within RUN: atomic, nothing copied or lost
    log.info(f"moved the previous {', '.join(p.name for p in present)} to {dest} (nothing deleted)")
    return dest


@dataclass(frozen=True)
class ResumeRequest:
    """What the user asked for: ``resume`` is auto | none | a checkpoint path."""

    resume: str = "auto"
    fresh: bool = False
    rewind: bool = False
    allow_changes: bool = False


@dataclass(frozen=True)
class ResumePlan:
    """What pretrain will do: continue from ``checkpoint`` (None: from scratch)."""

    checkpoint: Path | None
    changes: dict[str, list[Any]] = field(default_factory=dict)  # key: [old, new]
    moved_to: Path | None = None


def check_request(req: ResumeRequest) -> None:
    """Contradictory flags, refused before anything is touched."""
    explicit = req.resume not in ("auto", "none")
    if req.fresh and req.rewind:
        raise UserError(
            "--fresh (start over) and --rewind (continue from --resume PATH) exclude each other; give one"
        )
    if req.fresh and explicit:
        raise UserError(
            f"--fresh starts over, but --resume {req.resume} continues from a checkpoint; "
            "use --rewind to continue from it instead"
        )
    if req.rewind and not explicit:
        raise UserError("--rewind continues from an older checkpoint: name it with --resume PATH")


def plan_resume(run: Path, req: ResumeRequest, config: dict[str, Any]) -> ResumePlan:
    """Decide where ``pretrain`` starts; rank 0, with the run's lock held (``lock_on_main``,
    which also removed stale temporaries). ``config`` is the run's new resolved configuration
    (``Config.to_dict()``)."""
    ckdir = run / "checkpoints"
    found = checkpoint.list_checkpoints(ckdir)
    newest = checkpoint.newest_valid(
        ckdir, lambda c, why: log.warn(f"skipping checkpoint {c.weights.name}: {why}")
    )
    if req.fresh:
        return ResumePlan(None, moved_to=supersede(run))
    if req.resume == "none":
        if found:
            raise UserError(
                f"{run} already holds checkpoints ({_steps(found, newest)}) and --resume none would "
                f"start a second run beside them; add --fresh to move them to {run / SUPERSEDED}/ "
                "and start over, or drop --resume none to continue the run"
            )
        return ResumePlan(None)
    if req.resume == "auto":
        if newest is None:
            if found:
                raise UserError(_none_verify(run, found))
            return ResumePlan(None)
        return _continue(run, newest, config, req)
    return _explicit(run, req, config, found, newest)


def _explicit(
    run: Path,
    req: ResumeRequest,
    config: dict[str, Any],
    found: list[checkpoint.CkptPaths],
    newest: checkpoint.CkptPaths | None,
) -> ResumePlan:
    """--resume PATH: the run's own newest checkpoint, any checkpoint into an empty run, or
    (with --rewind, after moving the run's checkpoints aside) anything else."""
    ck = checkpoint.resolve(Path(req.resume))
    ok, why = checkpoint.verify(ck)
    if not ok:
        raise UserError(
            f"--resume {ck.weights}: it does not verify ({why}); pick one that does "
            f"(`sslctl checkpoints {ck.weights.parent}` lists them)"
        )
    ckdir = run / "checkpoints"
    inside = ck.weights.parent.resolve() == ckdir.resolve()
    if not found or (inside and newest is not None and ck.step == newest.step):
        return _continue(run, ck, config, req)
    if not req.rewind:
        what = (
            f"step {ck.step} is older than this run's newest"
            if inside and newest is not None and ck.step < newest.step
            else "it is not this run's newest checkpoint"
        )
        raise UserError(
            f"--resume {ck.weights}: {what} ({_steps(found, newest)} in {ckdir}); add --rewind to "
            f"continue from it (the run's checkpoints and metrics.jsonl move to {run / SUPERSEDED}/ "
            "first), or drop --resume to continue from the newest"
        )
    plan = _continue(run, ck, config, req)  # settings refused before anything moves
    moved = supersede(run)
    if inside and moved is not None:  # the rewound run starts from its own copy of the point
        ck = _link_back(checkpoint.CkptPaths.of(moved / "checkpoints", ck.step), ckdir)
        if (moved / "metrics.jsonl").is_file():  # its history: resume trims it to the step
            shutil.copy2(moved / "metrics.jsonl", run / "metrics.jsonl")
    return ResumePlan(ck.weights, plan.changes, moved)


def _link_back(src: checkpoint.CkptPaths, ckdir: Path) -> checkpoint.CkptPaths:
    """Hard links (a copy where links are not allowed) of ``src`` in ``ckdir``, manifest last:
    a rerun after a stop before the first new step still continues from the rewind point."""
    dst = checkpoint.CkptPaths.of(ckdir, src.step)
    ckdir.mkdir(parents=True, exist_ok=True)
    for a, b in ((src.weights, dst.weights), (src.state, dst.state), (src.manifest, dst.manifest)):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    return dst


def _continue(
    run: Path, ck: checkpoint.CkptPaths, config: dict[str, Any], req: ResumeRequest
) -> ResumePlan:
    meta = checkpoint.read_metadata(ck.weights)
    # Checkpoints of sslctl before the resolved data root was recorded (no "data_root" in their
    # metadata) hold the profile's data.root and kNN monitor: those two cannot be compared.
    legacy = () if "data_root" in meta else ("data.root", "eval.knn_every")
    changes = config_changes(meta.get("config", ""), config, ignore=legacy)
    if changes and not req.allow_changes:
        listed = ", ".join(
            f"{k} {show_value(a)} → {show_value(b)}" for k, (a, b) in changes.items()
        )
        raise UserError(
            f"{run} was started with other settings ({listed}); rerun with its settings to "
            "continue, add --allow-changes to continue with the new ones (recorded in "
            "metrics.jsonl and status.json), or --fresh to start over"
        )
    return ResumePlan(ck.weights, changes)


# Keys (or, ending in ".", key prefixes) that never make a resumed run "changed": what they set
# is bookkeeping or speed, not what is trained.
NEVER_CHANGES = (
    "description",
    "data.allow_outside_root",
    "paper.",
    "log.",
    "train.cudnn_benchmark",
)


def _never_changes(key: str) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in NEVER_CHANGES)


def config_changes(
    saved_json: str, new: dict[str, Any], ignore: tuple[str, ...] = ()
) -> dict[str, list[Any]]:
    """Every key whose value differs between a checkpoint's config and the new one. Continuing
    a run longer (a larger ``train.epochs``) is not a change; neither is the description, nor
    ``data.allow_outside_root`` (a safety switch: which files are read is the data's business,
    and runs made before it existed read such files without it), nor the paper's number, the
    logging (TensorBoard on or off) and cuDNN autotuning (``NEVER_CHANGES``)."""
    try:
        old = json.loads(saved_json) if saved_json else {}
    except ValueError:
        old = {}
    if not isinstance(old, dict) or not old:
        return {}  # a checkpoint without a readable config: the weights check still guards
    a, b = _flat(old), _flat(new)
    out: dict[str, list[Any]] = {}
    for k in sorted(set(a) | set(b)):
        if _never_changes(k) or k in ignore or a.get(k) == b.get(k):
            continue
        if k == "train.epochs" and isinstance(a.get(k), int) and b.get(k, 0) > a[k]:
            continue
        if k not in a and k in b and _is_default(k, b[k], linear="linear" in new):
            continue  # a key added by a newer sslctl, at its default: nothing changed
        out[k] = [a.get(k), b.get(k)]
    return out


@functools.cache
def _defaults(linear: bool) -> dict[str, Any]:
    from sslctl.config import Config, LinearConfig

    return _flat((LinearConfig() if linear else Config()).to_dict())


def _is_default(key: str, value: Any, linear: bool) -> bool:
    """``value`` is ``key``'s default in the new config's kind (pretrain, or linear-eval)."""
    return bool(_defaults(linear).get(key, object()) == value)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def show_value(v: Any) -> str:
    """A config value as a message shows it: strings quoted, None as (unset)."""
    return "(unset)" if v is None else repr(v) if isinstance(v, str) else str(v)


def _steps(found: list[checkpoint.CkptPaths], newest: checkpoint.CkptPaths | None) -> str:
    if newest is None:
        return f"{len(found)} checkpoint(s), none verified"
    return f"newest verified: step {newest.step}"


def _none_verify(run: Path, found: list[checkpoint.CkptPaths]) -> str:
    steps = ", ".join(str(c.step) for c in found[-5:])
    last = found[-1]
    _, why = checkpoint.verify(last)
    return (
        f"{run / 'checkpoints'} holds {len(found)} checkpoint(s) (steps {steps}) but none "
        f"verifies (step {last.step}: {why}); nothing was changed — inspect them with "
        f"`sslctl checkpoints {run}`, or start over with --fresh (moves them to {run / SUPERSEDED}/)"
    )
