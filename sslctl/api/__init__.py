"""One plain Python function per subcommand, returning result dataclasses.

``sslctl.api`` is a package with one module per command so that each stays on a screen; the
functions are re-exported here so that ``from sslctl import api; api.pretrain(...)`` works.
"""

from sslctl.api.convert_detectron import ConvertDetectronResult, convert_detectron
from sslctl.api.data_check import DataCheckResult, data_check
from sslctl.api.eval_reid import EvalReidResult, eval_reid
from sslctl.api.extract import ExtractResult, extract
from sslctl.api.knn_eval import KnnEvalOptions, KnnEvalResult, knn_eval
from sslctl.api.linear_eval import LinearEvalOptions, LinearEvalResult, linear_eval
from sslctl.api.pretrain import Diverged, PretrainResult, pretrain
from sslctl.api.report import ReportResult, report
from sslctl.eval.reid.options import EvalReidOptions

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
