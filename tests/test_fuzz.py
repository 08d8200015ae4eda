"""Property-based fuzzing: hostile profiles, list files and safetensors headers give one clear
UserError (a single line), never another exception."""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hypothesis")  # a dev extra; the GPU machine may lack it

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sslctl import UserError, checkpoint, config  # noqa: E402
from sslctl.data.listfile import read_list_file  # noqa: E402

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
)
known_sections = st.sampled_from(
    [
        "model",
        "method",
        "loss",
        "optim",
        "train",
        "data",
        "ckpt",
        "init",
        "eval",
        "description",
        "kind",
        "bogus",
    ]
)
known_keys = st.sampled_from(
    [
        "arch",
        "lr",
        "epochs",
        "batch_size",
        "backend",
        "gamma",
        "keep",
        "name",
        "weights",
        "x",
        "precision",
    ]
)
profiles = st.dictionaries(
    known_sections, st.one_of(scalars, st.dictionaries(known_keys, scalars, max_size=4)), max_size=5
)


def _one_line(e: UserError) -> None:
    msg = str(e)
    assert msg and "\n" not in msg.strip(), msg


def _expect_user_error_or_ok(fn) -> None:
    try:
        fn()
    except UserError as e:
        _one_line(e)


@contextlib.contextmanager
def _written(name: str, data: str | bytes) -> Iterator[Path]:
    """``data`` in a new temporary file ``name`` (hypothesis runs a test's body many times, so a
    function-scoped tmp_path would be shared by its examples)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / name
        if isinstance(data, str):
            p.write_text(data)
        else:
            p.write_bytes(data)
        yield p


@FUZZ
@given(profiles)
def test_fuzzed_profile_mappings(raw):
    with _written("p.yaml", yaml.safe_dump(raw)) as p:
        _expect_user_error_or_ok(lambda: config.load(str(p)))


@FUZZ
@given(st.text(max_size=200))
def test_fuzzed_profile_text(text):
    with _written("p.yaml", text) as p:
        _expect_user_error_or_ok(lambda: config.load(str(p)))


@FUZZ
@given(
    st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12), max_size=6)
)
def test_fuzzed_set_overrides(sets):
    _expect_user_error_or_ok(lambda: config.load("demo-cpu", sets))


@FUZZ
@given(st.binary(max_size=300))
def test_fuzzed_list_files(blob):
    with _written("list.txt", blob) as lst:
        (lst.parent / "a.png").write_bytes(b"")
        _expect_user_error_or_ok(lambda: read_list_file(lst, lst.parent))


header_values = st.one_of(
    scalars,
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "Q9", ""]),
            "shape": st.lists(st.integers(-3, 5), max_size=3),
            "data_offsets": st.lists(st.integers(-5, 200), max_size=3),
        }
    ),
)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=8), header_values, max_size=4),
    st.binary(max_size=64),
    st.integers(-2, 2),
)
def test_fuzzed_safetensors_headers(header, payload, size_skew):
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", max(len(raw) + size_skew, 0)) + raw + payload
    with _written("w.safetensors", blob) as p:
        _expect_user_error_or_ok(lambda: checkpoint.load_safetensors(p))
        _expect_user_error_or_ok(lambda: checkpoint.read_metadata(p))


@FUZZ
@given(st.binary(max_size=200))
def test_fuzzed_safetensors_bytes(blob):
    with _written("w.safetensors", blob) as p:
        _expect_user_error_or_ok(lambda: checkpoint.load_safetensors(p))
