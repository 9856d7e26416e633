"""The drift report of served windows: JSON plus plots, and `monitor_run`, which reads the served inputs
of a model from the store, checks them window by window and writes the report."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from forgeml.errors import ConfigError, ForgeError
from forgeml.evaluate.plots import plt, save_figure
from forgeml.monitor.monitor import MIN_ROWS, DriftMonitor, Reference, Window
from forgeml.monitor.served import served_rows
from forgeml.workspace import atomic_write_json

TOP_FEATURES = 4  # distribution plots for this many of the most drifted features


def monitor_run(
    run_dir: str | Path,
    db_url: str,
    model: str | None = None,
    since: datetime | None = None,
    window: int = 500,
    output_dir: str | Path | None = None,
    version: str | None = None,
    limit: int | None = 100_000,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Check the inputs served by `model` (default: the run's name) since `since` against the run's
    training data, in windows of `window` rows, and write `report.json` and plots to `output_dir`
    (default `<run>/monitor/<UTC time>/`). Returns the report.

    Windows are cut back from the newest row, so the last window is always a full, current one; older
    rows that do not fill a window are left out (and counted). Fewer rows than one window make one
    window of all of them. The plots show the newest window.
    """
    if window < MIN_ROWS:
        raise ConfigError(f"window: {window} rows; a drift check needs at least {MIN_ROWS}")
    monitor = DriftMonitor(run_dir, alpha=alpha)
    predictor = monitor.predictor
    model = model or predictor.run.name
    inputs, answers, times = served_rows(db_url, model, since, version, limit)
    if len(inputs) < MIN_ROWS:
        when = f" since {since.isoformat()}" if since else ""
        raise ForgeError(
            f"monitor: {len(inputs)} served predictions of model {model!r}{when}; a drift check needs at least "
            f"{MIN_ROWS} (serve the model, or widen --since)"
        )
    described = monitor.describe(inputs, answers)  # one model pass over every row; windows select from it
    bounds = window_bounds(len(inputs), window)
    windows = []
    for index, (start, stop) in enumerate(bounds):
        result = monitor.compare(described.take(np.arange(start, stop)))
        first, last = times[start].isoformat(), times[stop - 1].isoformat()
        windows.append({"window": index, "first": first, "last": last, **result})
    latest = windows[-1]
    report = {
        "model": model,
        "version": version,
        "run": str(predictor.run.path),
        "since": since.isoformat() if since else None,
        "window": window,
        "rows": len(inputs),
        "rows_left_out": bounds[0][0],
        "alpha": alpha,
        "drift": latest["drift"],
        "windows_drifted": sum(w["drift"] for w in windows),
        "reference": monitor.reference.sources,
        "windows": windows,
    }
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    folder = Path(output_dir) if output_dir else predictor.run.path / "monitor" / stamp
    newest = described.take(np.arange(*bounds[-1]))
    report["files"] = [str(path) for path in write_report(report, monitor.reference, newest, folder)]
    return report


def window_bounds(rows: int, window: int) -> list[tuple[int, int]]:
    """[start, stop) of each window, oldest first, cut back from the newest row."""
    if rows <= window:
        return [(0, rows)]
    stops = range(rows, window - 1, -window)
    return [(stop - window, stop) for stop in reversed(stops)]


def write_report(report: dict[str, Any], reference: Reference, window: Window, folder: str | Path) -> list[Path]:
    """`report.json` and the plots of one checked window (`report` is `DriftMonitor.compare`'s result, or
    `monitor_run`'s with its windows, of which the newest is plotted) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    latest = report["windows"][-1] if "windows" in report else report
    written = [folder / "report.json"]
    atomic_write_json(written[0], report)
    written.append(test_chart(latest, folder / "tests.png"))
    if latest["kind"] == "tabular":
        features = [name.split(":", 1)[1] for name in latest["ranking"] if name.startswith("feature:")]
        for name in features[:TOP_FEATURES]:
            written.append(
                feature_plot(name, latest["features"][name], reference, window, folder / f"feature-{_safe(name)}.png")
            )
    else:
        written.append(length_plot(reference.inputs.words, window.words, folder / "lengths.png"))
    if "predictions" in latest:
        written.append(prediction_plot(latest["predictions"], reference, window, folder / "predictions.png"))
    if len(report.get("windows", [])) > 1:
        written.append(timeline(report["windows"], report["alpha"], folder / "timeline.png"))
    return written


def test_chart(result: dict[str, Any], path: Path) -> Path:
    """Each test's Holm-adjusted p-value (as -log10, the alpha line drawn) and, beside it, PSI."""
    tests = tests_by_name(result)
    names = list(reversed(result["ranking"]))  # most drifted on top
    strength = [-np.log10(max(tests[name]["p_adjusted"], 1e-300)) for name in names]
    psis = [tests[name].get("psi") or 0.0 for name in names]
    colors = ["tab:red" if tests[name]["drift"] else "tab:gray" for name in names]
    labels = [name.split(":", 1)[-1] for name in names]
    height = max(2.5, 0.32 * len(names) + 1.2)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, height), sharey=True)
    left.barh(labels, np.minimum(strength, 50), color=colors)
    left.axvline(
        -np.log10(result["alpha"]), color="black", linestyle="--", linewidth=1, label=f"alpha {result['alpha']}"
    )
    left.set_xlabel("-log10 adjusted p (Holm)")
    left.legend(loc="lower right", fontsize=8)
    right.barh(labels, psis, color=colors)
    for level in (0.1, 0.25):
        right.axvline(level, color="black", linestyle=":", linewidth=1)
    right.set_xlabel("PSI")
    figure.suptitle(f"Drift tests ({result['rows']} rows): {'DRIFT' if result['drift'] else 'no drift'}")
    return save_figure(figure, path)


def feature_plot(name: str, test: dict[str, Any], reference: Reference, window: Window, path: Path) -> Path:
    """A feature's distribution in the training rows and in the window."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if test["kind"] == "numeric":
        ref = reference.inputs.columns[name]
        win = window.columns[name]
        ref, win = ref[~np.isnan(ref)], win[~np.isnan(win)]
        edges = np.histogram_bin_edges(np.concatenate([ref, win]), bins=30)
        axis.hist(ref, bins=edges, density=True, alpha=0.5, label="training")
        axis.hist(win, bins=edges, density=True, alpha=0.5, label="window")
        axis.set_ylabel("density")
    else:
        bins = test["bins"][:20]
        positions = np.arange(len(bins))
        axis.bar(positions - 0.2, test["shares"]["reference"][:20], 0.4, label="training")
        axis.bar(positions + 0.2, test["shares"]["window"][:20], 0.4, label="window")
        axis.set_xticks(positions, [b or "(missing)" for b in bins], rotation=45, ha="right", fontsize=8)
        axis.set_ylabel("share of rows")
    axis.set_title(f"{name}: p (Holm) = {test['p_adjusted']:.2g}, PSI = {test.get('psi') or 0:.3f}")
    axis.legend()
    return save_figure(figure, path)


def length_plot(reference: np.ndarray, window: np.ndarray, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    edges = np.histogram_bin_edges(np.concatenate([reference, window]), bins=40)
    axis.hist(reference, bins=edges, density=True, alpha=0.5, label="training")
    axis.hist(window, bins=edges, density=True, alpha=0.5, label="window")
    axis.set_xlabel("input length (words)")
    axis.set_ylabel("density")
    axis.set_title("Input lengths")
    axis.legend()
    return save_figure(figure, path)


def prediction_plot(test: dict[str, Any], reference: Reference, window: Window, path: Path) -> Path:
    """Predicted classes (shares) or values (density): held-out reference rows against the window."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if test["of"] == "label":
        positions = np.arange(len(test["bins"]))
        axis.bar(positions - 0.2, test["shares"]["reference"], 0.4, label="reference")
        axis.bar(positions + 0.2, test["shares"]["window"], 0.4, label="window")
        axis.set_xticks(positions, test["bins"], rotation=30 if len(positions) > 4 else 0)
        axis.set_ylabel("share of predictions")
    else:
        edges = np.histogram_bin_edges(np.concatenate([reference.model.values, window.values]), bins=30)
        axis.hist(reference.model.values, bins=edges, density=True, alpha=0.5, label="reference")
        axis.hist(window.values, bins=edges, density=True, alpha=0.5, label="window")
        axis.set_ylabel("density")
    axis.set_title(f"Predictions: p (Holm) = {test['p_adjusted']:.2g}")
    axis.legend()
    return save_figure(figure, path)


def timeline(windows: list[dict[str, Any]], alpha: float, path: Path) -> Path:
    """The smallest adjusted p-value of each window over time (drifted windows in red)."""
    figure, axis = plt.subplots(figsize=(7, 3.5))
    smallest = [min(tests_by_name(w)[name]["p_adjusted"] for name in w["ranking"]) for w in windows]
    positions = np.arange(len(windows))
    axis.plot(positions, np.maximum(smallest, 1e-300), color="tab:gray", marker="o")
    drifted = [i for i, w in enumerate(windows) if w["drift"]]
    axis.scatter(drifted, [max(smallest[i], 1e-300) for i in drifted], color="tab:red", zorder=3, label="drift")
    axis.axhline(alpha, color="black", linestyle="--", linewidth=1, label=f"alpha {alpha}")
    axis.set_yscale("log")
    axis.set_xlabel("window (oldest to newest)")
    axis.set_ylabel("smallest adjusted p")
    axis.legend()
    return save_figure(figure, path)


def tests_by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every test of a window's result by its name in `ranking`."""
    tests = {f"feature:{name}": test for name, test in result.get("features", {}).items()}
    tests |= {f"text:{name}": test for name, test in result.get("text", {}).items()}
    if "predictions" in result:
        tests["predictions"] = result["predictions"]
    return tests


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
