"""What `mlxbatch status` reports: a store's row counts, its last run and what changed since.

`read_status` reads the store (never writes it) into a plain dict, which is also the `--json`
output; `status_lines` turns it into the text report. A run still marked running whose
process is gone is reported as died. It does not open output files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from mlxbatch.jobs.store import Store

# Settings that go into result keys (or choose the rows); a change means new results.
RESULT_SETTINGS = (
    "input",
    "model",
    "adapter_path",
    "dtype",
    "template",
    "system",
    "chat_template",
    "input_format",
    "id_field",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
)


def read_status(path: str) -> dict[str, Any]:
    """The store at `path`: counts, results, the last run (with its state) and its changes."""
    db = Store(path, create=False)
    try:
        counts, run, results = db.counts(), db.last_run(), db.result_counts()
        before = db.run_before(run["run_id"]) if run else None
    finally:
        db.close()
    changed = _changed_settings(before, run) if run and before else {}
    prov = run.pop("provenance", None) if run else None
    if run:
        run["state"] = _run_state(run)
    return {
        "store": path,
        **counts,
        "results": results,
        "last_run": run,
        "changed": changed,
        "provenance": prov,
        "changed_since": before["run_id"] if changed and before else None,
    }


def status_lines(report: dict[str, Any]) -> list[str]:
    """The text report of `read_status`."""
    lines = [
        f"store: {report['store']}",
        f"rows: {report['rows']} total, {report['done']} done, {report['failed']} failed, "
        f"{report['pending']} pending",
        f"tokens: {report['prompt_tokens']} prompt, {report['completion_tokens']} generated",
    ]
    run, prov = report["last_run"], report["provenance"]
    if run:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["started"]))
        stats = run["stats"]
        state = run["state"]
        if state == "died":
            state = "did not finish (killed or crashed; run the same command again to resume)"
        lines.append(f"last run: #{run['run_id']} {state}, started {when}, pid {run['pid']}")
        lines.append(f"model: {run['model']} ({run['model_identity']})")
        if stats:
            lines.append(
                f"throughput: {stats['tokens_per_second']:.1f} generated tok/s over "
                f"{stats['wall']:.1f} s; peak memory {stats['peak_memory'] / 2**20:.0f} MiB"
            )
        if prov:
            from mlxbatch.jobs.provenance import manifest_path, summary_lines

            lines.append(f"provenance: {manifest_path(run['output'])}")
            lines += [f"  {line}" for line in summary_lines(prov)]
    results = report["results"]
    other = (
        f", {results['other']} from other settings or rows (not used; --fresh drops them)"
        if results["other"]
        else ""
    )
    lines.append(f"results: {results['current']} for these rows and settings{other}")
    if report["changed_since"] is not None:
        diffs = ", ".join(
            f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in report["changed"].items()
        )
        lines.append(f"settings changed since run #{report['changed_since']}: {diffs}")
    return lines


def _changed_settings(before: dict, run: dict) -> dict[str, tuple[Any, Any]]:
    """Settings of `run` that differ from the run before it: name -> (old, new)."""
    old, new = before["spec"], run["spec"]
    changed = {k: (old.get(k), new.get(k)) for k in RESULT_SETTINGS if old.get(k) != new.get(k)}
    if before["model_identity"] != run["model_identity"] and "model" not in changed:
        changed["model_identity"] = (before["model_identity"], run["model_identity"])
    return changed


def _run_state(run: dict) -> str:
    """The run's status, or 'died' for a run marked running whose process is gone."""
    if run["status"] != "running":
        return str(run["status"])
    try:
        os.kill(int(run["pid"]), 0)
    except ProcessLookupError:
        return "died"
    except (PermissionError, ValueError, TypeError):
        pass
    return "running"
