"""``sslctl eval-reid``: person re-identification evaluation with cached features and ranks.

Flow: ``validate`` (every option, the input paths, --out; the layout detected when not given)
→ features (from the cache in OUT/features/, or extracted with torchrun sharding, or given
as --query-features/--gallery-features) → positive ranks (cached in OUT/ranks.safetensors,
keyed by both features digests) → CMC / mAP / mINP → results.json and cmc.png (the latest
run) plus results-<options hash>.json and cmc-<options hash>.png (kept per set of options).
Changing the AP definition, denominator, tie rule or max rank re-uses both caches and never
recomputes scores. Defaults of the fusion, precision, AP and denominator depend on the layout
(``layout_defaults``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sslctl import UserError, checkpoint, dist, files, log, rundir
from sslctl.convert.weights import PARTS
from sslctl.eval.command import EvalResult, run_locked
from sslctl.eval.features import FUSIONS
from sslctl.eval.reid import features as rf
from sslctl.eval.reid import layouts as rl
from sslctl.eval.reid import metrics as rmx
from sslctl.eval.reid import pipeline
from sslctl.eval.reid.options import COMPAT, PRECISIONS, EvalReidOptions, layout_defaults
from sslctl.eval.reid.plot import save_cmc_plot


@dataclass(frozen=True)
class EvalReidResult(EvalResult):
    """results.json (its ``results_path``: OUT/results.json, the latest run) and the other
    outputs of a re-ID evaluation."""

    plot_path: Path | None  # OUT/cmc.png
    extracted: tuple[str, ...]  # splits whose features were computed in this call
    ranks_cached: bool
    run_results_path: Path | None = None  # OUT/results-<options hash>.json: this run's options
    run_plot_path: Path | None = None  # OUT/cmc-<options hash>.png


def _defaults_layout(o: EvalReidOptions) -> str | None:
    """The layout whose defaults apply: a features file's own, as features_from_files reads it."""
    path = o.query_features
    if path is not None and path.is_file():  # a missing file is reported when it is loaded
        return checkpoint.read_metadata(path).get("layout") or o.layout
    return o.layout


def _check_choices(o: EvalReidOptions) -> None:
    """Every option that needs no file: a mistake fails here, before any work is done."""
    for flag, value, known in (
        ("--compat", o.compat, tuple(COMPAT)),
        ("--layout", o.layout, rl.LAYOUTS),
        ("--ap", o.ap, rmx.AP_DEFINITIONS),
        ("--denominator", o.denominator, rmx.DENOMINATORS),
        ("--ties", o.ties, rmx.TIE_RULES),
        ("--metric", o.metric, rmx.SCORE_METRICS),
        ("--precision", o.precision, PRECISIONS),
        ("--flip-fusion", o.flip_fusion, FUSIONS),
        ("--cache-dtype", o.cache_dtype, tuple(rf.CACHE_DTYPES)),
        ("--part", o.part, PARTS),
    ):
        if value is not None and value not in known:
            raise UserError(f"{flag} must be one of {', '.join(known)}, got {str(value)[:40]!r}")
    for flag, number in (
        ("--max-rank", o.max_rank),
        ("--batch-size", o.batch_size),
        ("--mem-budget", o.mem_budget),
    ):
        if number < 1:
            raise UserError(f"{flag} must be a positive number, got {number}")
    if o.workers is not None and o.workers < 0:
        raise UserError(f"--workers must be 0 or more, got {o.workers}")
    if o.camera_regex is not None:
        rl.camera_pattern(o.camera_regex)


def _resolve(o: EvalReidOptions) -> EvalReidOptions:
    """Check choices, then fill defaults (explicit flag, then --compat, then the layout's)."""
    _check_choices(o)
    preset = COMPAT.get(o.compat or "", {})
    defaults = layout_defaults(_defaults_layout(o))

    def pick(key: str, unset: str | None = None) -> str:
        value = getattr(o, key)
        return str(value if value != unset else preset.get(key, defaults[key]))

    return replace(
        o,
        ap=pick("ap"),
        denominator=pick("denominator"),
        flip_fusion=pick("flip_fusion"),
        precision=pick("precision", unset="auto"),
    )


def _check_inputs(o: EvalReidOptions) -> EvalReidOptions:
    """Input paths exist and fit together; the layout is detected when not given (said on the
    console). Returns the options with the layout set."""
    if o.query_features is not None or o.gallery_features is not None:
        if o.query_features is None or o.gallery_features is None:
            raise UserError("give both --query-features and --gallery-features")
        images = (o.weights, o.data, o.query, o.gallery)
        if any(p is not None for p in images):
            raise UserError(
                "--query-features/--gallery-features replace WEIGHTS and the image folders: "
                "give one or the other"
            )
        given = (("--query-features", o.query_features), ("--gallery-features", o.gallery_features))
        for flag, path in given:
            if not path.is_file():
                raise UserError(f"{flag} {path}: no such file (a features .safetensors)")
        return o
    if o.weights is None:
        raise UserError(
            "give WEIGHTS (a checkpoint, extracted backbone or torchvision .pth), "
            "or --query-features and --gallery-features"
        )
    if not o.weights.exists() and not (o.weights.name == "last" and o.weights.parent.is_dir()):
        raise UserError(
            f"WEIGHTS {o.weights}: no such file or directory; give a checkpoint (file, run dir "
            "or …/last), an extracted backbone or a torchvision .pth"
        )
    layout = o.layout
    if layout is None:
        layout, why = rl.detect_layout(o.data, o.query, o.gallery)
        log.info(f"layout: {layout} (detected: {why}; --layout overrides)")
    qroot, groot = rl.resolve_roots(layout, o.data, o.query, o.gallery)
    for what, root in (("query", qroot), ("gallery", groot)):
        if not root.is_dir():
            raise UserError(f"{what} folder {root} does not exist or is not a directory")
    return replace(o, layout=layout)


def _check_out(out: Path) -> None:
    """--out is (or can become) a writable folder; rank 0 only, as only rank 0 writes there."""
    if out.exists() and not out.is_dir():
        raise UserError(
            f"--out {out} is an existing file, not a folder: choose a folder path (it will "
            "hold results.json, cmc.png, features/ and the ranks cache)"
        )
    rundir.check_writable(out)


def validate(opts: EvalReidOptions) -> EvalReidOptions:
    """Every check that needs no weights, features or ranking, as the first thing a run does
    (on SYSU-30k the work behind a late refusal is hours): the options resolved."""
    _check_choices(opts)
    dist.check_device(opts.device)
    o = _resolve(_check_inputs(opts))
    if dist.is_main():
        _check_out(o.out)
    return o


@dataclass(frozen=True)
class _Written:
    results: Path
    plot: Path
    run_results: Path
    run_plot: Path


def _write_outputs(o: EvalReidOptions, results: dict[str, Any], m: rmx.ReidMetrics) -> _Written:
    """results.json and cmc.png (the latest run) and results-<hash>.json, cmc-<hash>.png (this
    run's options, kept when a later run uses others), each written atomically."""
    h = results["options_hash"]
    w = _Written(
        o.out / "results.json", o.out / "cmc.png",
        o.out / f"results-{h}.json", o.out / f"cmc-{h}.png",
    )  # fmt: skip
    results["results_files"] = {"latest": w.results.name, "this_run": w.run_results.name}
    for path in (w.run_results, w.results):  # the latest last: it names a file that exists
        files.write_json(path, results)
    layout = results["layout"] or "features"
    label = f"CMC {layout} ({m.num_valid_queries} queries, {m.ap_definition} AP)"
    for path in (w.run_plot, w.plot):
        save_cmc_plot(path, results["cmc"], label, m_ap=results["mAP"], log_x=o.cmc_log_x)
    return w


def eval_reid(weights: str | os.PathLike[str] | None = None, **options: Any) -> EvalReidResult:
    """Evaluate re-ID features of the backbone in ``weights`` (or of given features files); see
    the module doc. ``options``: keyword arguments named as the fields of ``EvalReidOptions``
    (the CLI's flags: ``data``, ``layout``, ``out`` …); paths may be str or PathLike. Every
    option is checked first (``validate``), before weights, features or ranks.

    >>> api.eval_reid("runs/r50", data="/data/Market-1501", out="reid-market")
    """
    return _eval_reid(EvalReidOptions(weights=weights, **options))  # type: ignore[arg-type]


def _eval_reid(opts: EvalReidOptions) -> EvalReidResult:
    o = validate(opts)
    return run_locked(o.out, o.device, lambda di: _run(o, di))


def _run(o: EvalReidOptions, di: dist.DistInfo) -> EvalReidResult:
    q: rf.FeatureFile | None
    g: rf.FeatureFile | None
    sources: dict[str, Any] = {}
    if o.query_features is not None or o.gallery_features is not None:
        q, g = pipeline.features_from_files(o)
        extracted: tuple[str, ...] = ()
    else:
        q, g, extracted, sources = pipeline.features_from_images(o, di)
    if not di.is_main or q is None or g is None:
        return EvalReidResult({}, None, None, extracted, False)
    results, m = pipeline.evaluate(o, q, g, di.device, sources)
    w = _write_outputs(o, results, m)
    return EvalReidResult(
        results, w.results, w.plot, extracted, bool(results["ranks_cached"]),
        run_results_path=w.run_results, run_plot_path=w.run_plot,
    )  # fmt: skip
