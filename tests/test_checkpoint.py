import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sslctl import UserError, checkpoint, files


def _save(d: Path, step: int, epoch: int = 0, position: int = 0) -> checkpoint.CkptPaths:
    t = {"online.w": torch.full((4, 4), float(step)), "module.target.w": torch.ones(2)}
    st = {"step": step, "epoch": epoch, "batch_in_epoch": position, "x": torch.arange(3)}
    return checkpoint.save(d, step, t, {"method": "triplet"}, st)


def test_save_verify_load(tmp_path):
    ck = _save(tmp_path, 7)
    assert checkpoint.verify(ck) == (True, "ok")
    tensors, meta = checkpoint.load_safetensors(ck.weights)
    assert set(tensors) == {"online.w", "target.w"}  # module. prefix stripped
    assert meta["step"] == "7" and meta["format"] == checkpoint.FORMAT
    st = checkpoint.load_train_state(ck.state)
    assert st["step"] == 7 and torch.equal(st["x"], torch.arange(3))
    assert not list(tmp_path.glob(".sslctl-tmp.*"))


def test_channels_last_tensor_saves(tmp_path):
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    ck = checkpoint.save(tmp_path, 1, {"w": x}, {}, {"step": 1})
    assert torch.equal(checkpoint.load_safetensors(ck.weights)[0]["w"], x)


@pytest.mark.parametrize("damage", ["truncate", "zero", "flip", "no_manifest"])
def test_damaged_newest_is_skipped(tmp_path, damage):
    _save(tmp_path, 1)
    ck2 = _save(tmp_path, 2)
    data = bytearray(ck2.weights.read_bytes())
    if damage == "truncate":
        ck2.weights.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "zero":
        ck2.weights.write_bytes(bytes(len(data)))
    elif damage == "flip":
        data[-3] ^= 0x10
        ck2.weights.write_bytes(bytes(data))
    else:
        ck2.manifest.unlink()
    skipped = []
    found = checkpoint.newest_valid(tmp_path, lambda c, why: skipped.append((c.step, why)))
    assert found is not None and found.step == 1
    assert skipped and skipped[0][0] == 2


def test_resolve_forms(tmp_path):
    run = tmp_path / "run"
    _save(run / "checkpoints", 3)
    _save(run / "checkpoints", 5)
    assert checkpoint.resolve(run).step == 5
    assert checkpoint.resolve(run / "checkpoints").step == 5
    assert checkpoint.resolve(run / "checkpoints" / "last").step == 5
    assert checkpoint.resolve(run / "checkpoints" / "step_00000003.safetensors").step == 3
    with pytest.raises(UserError, match="no valid checkpoint"):
        checkpoint.resolve(tmp_path)


def test_prune_keeps_last_and_permanent(tmp_path):
    for s in range(1, 8):
        _save(tmp_path, s, epoch=s, position=0)
    removed = checkpoint.prune(tmp_path, 2, lambda m: m["epoch"] % 3 == 0)
    left = [c.step for c in checkpoint.list_checkpoints(tmp_path)]
    assert left == [3, 6, 7] and sorted(removed) == [1, 2, 4, 5]
    m = json.loads(checkpoint.CkptPaths.of(tmp_path, 7).manifest.read_text())
    assert m["step"] == 7 and m["epoch"] == 7


def test_prune_never_deletes_only_verified(tmp_path):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    bad.manifest.unlink()
    checkpoint.prune(tmp_path, 1, lambda m: False)
    assert checkpoint.newest_valid(tmp_path).step == 1


def test_kill_during_atomic_write_leaves_no_partial_file(tmp_path):
    """A process killed in the middle of a save leaves only a temp file, never a visible partial."""
    target = tmp_path / "big.safetensors"
    code = textwrap.dedent(
        f"""
        import os, signal, torch
        from pathlib import Path
        from sslctl import files
        def write(tmp):
            with open(tmp, "wb") as fh:
                fh.write(b"x" * 1000)
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        files.atomic_write(Path({str(target)!r}), write)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert r.returncode == -9
    assert not target.exists()
    assert os.listdir(tmp_path)  # the temp file stays behind, under a name sslctl owns
    assert all(n.startswith(files.TMP_PREFIX) for n in os.listdir(tmp_path))
    assert files.remove_stale_temps(tmp_path) == 1 and not os.listdir(tmp_path)


def test_a_verified_step_is_never_rewritten(tmp_path):
    ck = _save(tmp_path, 4)
    before = {p: p.read_bytes() for p in (ck.weights, ck.state, ck.manifest)}
    t = {"online.w": torch.full((4, 4), -1.0)}
    again = checkpoint.save(tmp_path, 4, t, {}, {"step": 4, "epoch": 9, "batch_in_epoch": 0})
    assert again == ck
    assert {p: p.read_bytes() for p in before} == before
    assert not list(tmp_path.glob(".sslctl-tmp.*"))


def test_an_unverified_step_is_replaced(tmp_path):
    ck = _save(tmp_path, 4)
    ck.manifest.unlink()  # a half-written step from a killed process
    t = {"online.w": torch.full((4, 4), 8.0)}
    checkpoint.save(tmp_path, 4, t, {}, {"step": 4, "epoch": 0, "batch_in_epoch": 0})
    assert checkpoint.verify(ck) == (True, "ok")
    assert checkpoint.load_safetensors(ck.weights)[0]["online.w"][0, 0] == 8.0


@pytest.mark.parametrize("during", ["weights", "state"])
def test_kill9_during_save_leaves_existing_checkpoints_and_no_visible_part(tmp_path, during):
    """SIGKILL while writing either file of a step: the earlier checkpoint still verifies,
    nothing under the new step's names exists, and start-up cleaning removes the temporaries."""
    code = textwrap.dedent(
        f"""
        import os, signal, torch
        from pathlib import Path
        from sslctl import checkpoint
        d = Path({str(tmp_path)!r})
        st = {{"step": 1, "epoch": 0, "batch_in_epoch": 0}}
        checkpoint.save(d, 1, {{"w": torch.ones(3)}}, {{}}, st)
        real = checkpoint.write_bytes
        calls = []
        def dying(path, data):  # the first call writes the weights, the second the state
            calls.append(path)
            real(path, data[: len(data) // 2])
            if len(calls) == {1 if during == "weights" else 2}:
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)
        checkpoint.write_bytes = dying
        checkpoint.save(d, 2, {{"w": torch.zeros(3)}}, {{}}, {{**st, "step": 2}})
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert checkpoint.verify(checkpoint.CkptPaths.of(tmp_path, 1)) == (True, "ok")
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [1]
    assert files.remove_stale_temps(tmp_path) >= 1
    assert sorted(os.listdir(tmp_path)) == sorted(
        p.name for p in (checkpoint.CkptPaths.of(tmp_path, 1).weights,
                         checkpoint.CkptPaths.of(tmp_path, 1).state,
                         checkpoint.CkptPaths.of(tmp_path, 1).manifest)
    )  # fmt: skip


def test_a_write_that_does_not_read_back_is_never_renamed_into_place(tmp_path, monkeypatch):
    """The manifest holds the sums of the bytes meant; a file that reads back otherwise (a bad
    disk, a lying filesystem) fails the save and leaves nothing under the step's names."""
    _save(tmp_path, 1)
    real = checkpoint.write_bytes

    def flipping(path, data):
        real(path, bytes([data[0] ^ 1]) + data[1:])

    monkeypatch.setattr(checkpoint, "write_bytes", flipping)
    with pytest.raises(OSError, match="did not read back"):
        _save(tmp_path, 2)
    assert [c.step for c in checkpoint.list_checkpoints(tmp_path)] == [1]
    assert checkpoint.verify(checkpoint.CkptPaths.of(tmp_path, 1)) == (True, "ok")
    assert not list(tmp_path.glob(".sslctl-tmp.*"))


def test_stale_temporaries_of_older_versions_are_removed_too(tmp_path):
    for name in (".tmpab12cd", ".step_00000001.safetensors.x1y2.tmp", ".sslctl-tmp.step_1.z"):
        (tmp_path / name).write_bytes(b"x")
    keep = tmp_path / "notes.tmp"
    keep.write_text("mine")
    assert files.remove_stale_temps(tmp_path) == 3
    assert sorted(os.listdir(tmp_path)) == ["notes.tmp"]


@pytest.mark.parametrize(
    "manifest, said",
    [
        ('{"files": null}', "'files' is not a mapping"),
        ("[1, 2]", "not a JSON object"),
        ('{"files": {"a": 1}}', "'files' is not a mapping"),
        ("EPOCH", "'epoch' is not a non-negative integer"),
        ('{"files": ', "not JSON"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_unverified_not_a_crash(tmp_path, manifest, said):
    """Valid JSON of another shape: 'malformed manifest (why)' everywhere it is read — verify,
    resume's search, pruning and `sslctl checkpoints` — never a TypeError/AttributeError."""
    from typer.testing import CliRunner

    from sslctl.cli.app import app

    good = _save(tmp_path / "checkpoints", 1, epoch=1)
    bad = _save(tmp_path / "checkpoints", 2, epoch=1)
    if manifest == "EPOCH":  # every sum right, the epoch a string: "1" % 2 would format
        m = json.loads(bad.manifest.read_text())
        manifest = json.dumps({**m, "epoch": "1"})
    bad.manifest.write_text(manifest)
    ok, why = checkpoint.verify(bad)
    assert not ok and why.startswith(f"malformed manifest ({said}")
    assert checkpoint.newest_valid(tmp_path / "checkpoints") == good
    r = CliRunner().invoke(app, ["checkpoints", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert "malformed manifest" in r.output
    with pytest.raises(UserError, match="malformed manifest"):
        checkpoint.verify_explicit(bad.weights)
    # pruning reads manifests too: the unverified step goes, the verified one stays
    assert checkpoint.prune(tmp_path / "checkpoints", 1, lambda m: m["epoch"] % 2 == 0) == [2]
    assert checkpoint.verify(good) == (True, "ok")


def test_checkpoints_of_a_folder_that_is_not_a_run_is_an_error(tmp_path):
    from typer.testing import CliRunner

    from sslctl.cli.app import app

    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    r = CliRunner().invoke(app, ["checkpoints", str(tmp_path / "photos")])
    assert r.exit_code == 2 and "not a run directory" in r.output, r.output
    r = CliRunner().invoke(app, ["checkpoints", str(tmp_path / "photos" / "a.jpg")])
    assert r.exit_code == 2 and "a file, not a run directory" in r.output, r.output
    started = tmp_path / "run"
    started.mkdir()
    (started / "config.yaml").write_text("{}")  # a run before its first checkpoint
    r = CliRunner().invoke(app, ["checkpoints", str(started)])
    assert r.exit_code == 0 and "no checkpoints yet" in r.output, r.output
