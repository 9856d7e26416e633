"""`forgeml models compare` and `forgeml models promote`: the gate between a candidate and an alias."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgeml.config import GateConfig, load_config
from forgeml.encryption import on_plaintext, plaintext_view
from forgeml.errors import ForgeError
from forgeml.improve.gate import COMPARISON, Contender, gate_plot, judge, refusal, require_same_split, run_facts
from forgeml.registry import Registry, parse_reference
from forgeml.workspace import MANIFEST, RunDir, atomic_write_json, read_json, resolve_run_path

GATE_REPORT = "gate/report.json"
GATE_PLOT = "gate/gate.png"


def compare(
    champion: str | Path,
    candidate: str | Path,
    workspace: str | Path | None = None,
    gate: GateConfig | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Score both models on the candidate's fixed test split (the champion's too: their recorded hashes must
    match) and apply the gate (`gate`, else the candidate's `gate:` section). With `write`, the report and
    its plot go to the candidate's gate/ folder and card."""
    from forgeml.api import Predictor
    from forgeml.tasks import prepare_data

    contenders = {"champion": _contender(champion, workspace), "candidate": _contender(candidate, workspace)}
    predictors = {side: Predictor(c.run_dir) for side, c in contenders.items()}
    _require_comparable(predictors)
    config = predictors["candidate"].config
    gate = gate or config.gate
    data = prepare_data(config)
    if data.test is None:
        raise ForgeError(
            f"{contenders['candidate'].run_dir}: the run has no test split to compare on (data.split.test is 0 and "
            "data.test is unset); the gate needs a fixed test split"
        )
    recorded = {side: _recorded_hashes(c.run_dir) for side, c in contenders.items()}
    require_same_split(
        "test", {"rows": data.hashes["test"], **{side: recorded[side].get("test") for side in contenders}}
    )
    facts = {side: _facts(c.run_dir) for side, c in contenders.items()}
    split = {"name": "test", "rows": len(data.test), "sha256": data.hashes["test"]}
    truth, answers = _answers(predictors, data.test)
    report = judge(contenders["champion"], contenders["candidate"], truth, answers, gate, split, facts)
    held_out = data.splits.get("feedback")
    if held_out is not None and len(held_out):  # corrections kept out of training: evidence, not the gate's
        feedback_split = {"name": "feedback", "rows": len(held_out), "sha256": data.hashes["feedback"]}
        truth, answers = _answers(predictors, held_out)
        no_facts = {"champion": {}, "candidate": {}}
        feedback = judge(
            contenders["champion"], contenders["candidate"], truth, answers, gate, feedback_split, no_facts
        )
        report["feedback_holdout"] = {key: feedback[key] for key in ("split", "metric", "values", "gain", "test")}
    if write:
        _write_report(contenders["candidate"].run_dir, report)
    return report


def promote(
    name: str,
    candidate: str | Path,
    alias: str = "champion",
    force: bool = False,
    reason: str = "",
    workspace: str | Path | None = None,
    gate: GateConfig | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Point `name@alias` at `candidate` (a run folder or a reference; registered first if it is not).

    An alias in the gate's `protected` list (champion by default) moves only when the candidate passes
    the gate against the version it points at now, or with `force`; either way the promotion log records
    who, when, why and the gate's figures. Returns the log entry (plus the gate report, when one ran).
    """
    registry = Registry.for_workspace(workspace)
    try:
        run_dir = resolve_run_path(candidate, workspace).resolve()
        version = registry.version_of_run(name, run_dir) or registry.register(name, run_dir, actor=actor)
        current = registry.alias_version(name, alias)
        if current == version["version"]:
            raise ForgeError(f"{name}@{alias} already points at version {current}")
        gate = gate or gate_settings(run_dir)
        report = None
        if current is not None and alias in gate.protected:
            report = _earlier_report(run_dir, current, gate) or compare(f"{name}@{current}", run_dir, workspace, gate)
            if not report["passed"] and not force:
                raise ForgeError(refusal(report))
        why = reason or ("first version under this alias" if current is None else "")
        if report is not None and not why:
            why = f"passed the gate: {report['metric']} {report['gain']:+.4f}, p = {report['test']['p_value']:.3g}"
        entry = registry.set_alias(
            name,
            alias,
            version["version"],
            actor=actor,
            reason=why,
            forced=bool(force and report is not None and not report["passed"]),
            gate=_gate_summary(report),
        )
        return {**entry, "report": report}
    finally:
        registry.close()


def _earlier_report(run_dir: Path, champion_version: int, gate: GateConfig) -> dict[str, Any] | None:
    """The candidate's last comparison, when it was against this very version under the same gate settings
    (both runs' files are hash-checked, so the same versions give the same answers: no need to score again)."""
    with plaintext_view(run_dir, only=(MANIFEST, GATE_REPORT)) as plain:
        if not (plain / GATE_REPORT).is_file():
            return None
        RunDir(plain).verify(GATE_REPORT)
        report = read_json(plain / GATE_REPORT)
    same = report.get("champion", {}).get("version") == champion_version and report.get("gate") == gate.model_dump()
    return report if same else None


def _contender(reference: str | Path, workspace: str | Path | None) -> Contender:
    parsed = parse_reference(str(reference)) if not Path(reference).exists() else None
    if parsed is None:
        return Contender(Path(reference).name, resolve_run_path(reference, workspace).resolve())
    registry = Registry.for_workspace(workspace)
    try:
        version = registry.resolve(str(reference))
    finally:
        registry.close()
    return Contender(f"{version['name']}@{version['version']}", Path(version["run_path"]), version["version"])


def _answers(predictors: dict[str, Any], rows: Any) -> tuple[list[Any] | None, dict[str, list[dict[str, Any]]]]:
    """Both models' answers on the same rows, and the true values (a language model's answers are its scores
    of the rows' text: there is nothing else to compare them with)."""
    from forgeml.data.io import column

    if predictors["candidate"].generates:
        return None, {side: predictor.paired_scores(rows) for side, predictor in predictors.items()}
    truth = column(rows, predictors["candidate"].config.data.label)
    return truth, {side: predictor.predict(rows) for side, predictor in predictors.items()}


def _require_comparable(predictors: dict[str, Any]) -> None:
    champion, candidate = predictors["champion"], predictors["candidate"]
    if champion.config.task != candidate.config.task:
        raise ForgeError(f"models compare: a {candidate.config.task} run cannot replace a {champion.config.task} run")
    classes = [getattr(p.task.target, "classes", None) for p in (champion, candidate)]
    if classes[0] != classes[1]:
        raise ForgeError(f"models compare: the label sets differ ({classes[0]} against {classes[1]})")


def _recorded_hashes(run_dir: Path) -> dict[str, str]:
    with plaintext_view(run_dir, only=("data_profile.json",)) as plain:
        profile = plain / "data_profile.json"
        return read_json(profile).get("sha256", {}) if profile.is_file() else {}


def _facts(run_dir: Path) -> dict[str, float | None]:
    with plaintext_view(run_dir, only=("metrics.json", COMPARISON)) as plain:
        return run_facts(plain)


def gate_settings(run_dir: Path) -> GateConfig:
    """The `gate:` section of a run's config (decrypted for the moment it is read)."""
    with plaintext_view(run_dir, only=("config.yaml",)) as plain:
        return load_config(plain / "config.yaml").gate


def _gate_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the promotion log keeps of a gate report: the figures, not the rows."""
    if report is None:
        return None
    keys = ("champion", "candidate", "split", "metric", "values", "gain", "test", "checks", "passed")
    return {key: report[key] for key in keys}


@on_plaintext(writes=True)
def _write_report(run_dir: Path, report: dict[str, Any]) -> None:
    from forgeml.api import report as write_card

    run = RunDir.open(run_dir)
    atomic_write_json(run.path / GATE_REPORT, report)
    gate_plot(report, run.path / GATE_PLOT)
    run.record([run.path / GATE_REPORT, run.path / GATE_PLOT])
    write_card(run.path)
