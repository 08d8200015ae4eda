"""--trust-pickle is the only way to read a pickle that runs code, and it warns first."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from sslctl import UserError, api
from sslctl.cli.app import app
from tests.trust_helpers import booby_trapped


def test_refused_by_default_nothing_runs(tmp_path):
    evil, marker = booby_trapped(tmp_path)
    with pytest.raises(UserError, match="--trust-pickle"):
        api.extract(evil, tmp_path / "o.safetensors")
    assert not marker.exists()
    r = CliRunner().invoke(app, ["extract", str(evil), "-o", str(tmp_path / "o2.safetensors")])
    assert r.exit_code == 2 and not marker.exists()


def test_trust_pickle_warns_then_loads(tmp_path, capsys):
    evil, marker = booby_trapped(tmp_path)
    res = api.extract(evil, tmp_path / "o.safetensors", trust_pickle=True)
    assert marker.exists()  # the code did run: that is what trusting means
    assert res.arch == "resnet18" and (tmp_path / "o.safetensors").is_file()
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "runs now" in err
