"""One plain Python function per subcommand, returning result dataclasses.

``sslctl.api`` is a package with one module per command so that each stays on a screen; the
functions are re-exported here so that ``from sslctl import api; api.pretrain(...)`` works.
Each is imported on first use (PEP 562): ``api.report`` reads run directories without loading
torch, which the training and evaluation commands need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module (under sslctl.api) that defines it
_EXPORTS = {
    "ConvertDetectronResult": "convert_detectron",
    "convert_detectron": "convert_detectron",
    "DataCheckResult": "data_check",
    "data_check": "data_check",
    "EvalReidOptions": "eval_reid",
    "EvalReidResult": "eval_reid",
    "eval_reid": "eval_reid",
    "ExtractResult": "extract",
    "extract": "extract",
    "KnnEvalOptions": "knn_eval",
    "KnnEvalResult": "knn_eval",
    "knn_eval": "knn_eval",
    "LinearEvalOptions": "linear_eval",
    "LinearEvalResult": "linear_eval",
    "linear_eval": "linear_eval",
    "Diverged": "pretrain",
    "PretrainResult": "pretrain",
    "pretrain": "pretrain",
    "ReportResult": "report",
    "report": "report",
}

if TYPE_CHECKING:  # what type checkers see: the same names, imported eagerly
    from sslctl.api.convert_detectron import ConvertDetectronResult, convert_detectron
    from sslctl.api.data_check import DataCheckResult, data_check
    from sslctl.api.eval_reid import EvalReidOptions, EvalReidResult, eval_reid
    from sslctl.api.extract import ExtractResult, extract
    from sslctl.api.knn_eval import KnnEvalOptions, KnnEvalResult, knn_eval
    from sslctl.api.linear_eval import LinearEvalOptions, LinearEvalResult, linear_eval
    from sslctl.api.pretrain import Diverged, PretrainResult, pretrain
    from sslctl.api.report import ReportResult, report


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sslctl.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sslctl.api.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "ConvertDetectronResult",
    "DataCheckResult",
    "Diverged",
    "EvalReidOptions",
    "EvalReidResult",
    "ExtractResult",
    "KnnEvalOptions",
    "KnnEvalResult",
    "LinearEvalOptions",
    "LinearEvalResult",
    "PretrainResult",
    "ReportResult",
    "convert_detectron",
    "data_check",
    "eval_reid",
    "extract",
    "knn_eval",
    "linear_eval",
    "pretrain",
    "report",
]
assert sorted(__all__) == sorted(_EXPORTS)
