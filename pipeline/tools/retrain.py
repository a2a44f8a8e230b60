"""`python -m pipeline retrain`: what the CI workflow runs, as one command you can run anywhere.

dvc pull (data and the outputs of unchanged stages, from the team's remote) → dvc repro (only
what changed; evaluate registers the new model and applies the promotion gate; report writes
reports/report.md) → dvc push → a summary, also into the GitHub job summary when there is one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.progress import say

STAGE_LINE = re.compile(r"^Running stage '([^']+)'")
IMAGE_LINE = re.compile(r"^!\[.*\]\(.*\)\s*$")


def dvc_env() -> dict:
    """Stages run `python -m pipeline`: make that the interpreter running this command."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dvc(*args: str, stream: bool = False) -> subprocess.CompletedProcess:
    """Run `dvc ARGS`; with stream, echo its output as it comes (repro can take a while)."""
    command = [sys.executable, "-m", "dvc", *args]
    if not stream:
        return subprocess.run(command, env=dvc_env(), capture_output=True, text=True)
    lines = []
    with subprocess.Popen(command, env=dvc_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        for line in process.stdout:
            sys.stdout.write(line)
            lines.append(line)
    return subprocess.CompletedProcess(command, process.returncode, "".join(lines), "")


def check(result: subprocess.CompletedProcess, what: str, fix: str) -> subprocess.CompletedProcess:
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        last = detail[-1] if detail else ""
        raise PipelineError(f"retrain: `{what}` failed (exit {result.returncode}: {last}) — {fix}")
    return result


def remotes() -> list[str]:
    listed = check(dvc("remote", "list"), "dvc remote list", "run it inside the project")
    return [line.split()[0] for line in listed.stdout.splitlines() if line.strip()]


def job_summary(ran: list[str], decision: dict | None, metrics_diff: str) -> str:
    """The report for GitHub's job summary: images stay in the uploaded artifact (relative links
    cannot render there), everything else is the report itself, after DVC's metrics diff."""
    head = ["## Retrain", "", f"Stages re-run: {', '.join(ran) if ran else 'none (nothing changed)'}.", ""]
    if metrics_diff.strip():
        head += ["### Metrics against the last commit (`dvc metrics diff`)", "", metrics_diff.strip(), ""]
    if decision is None or not paths.REPORT.is_file():
        return "\n".join(head) + "\n"
    body = [line for line in paths.REPORT.read_text().splitlines() if not IMAGE_LINE.match(line)]
    return "\n".join(head + body + ["", "_Images: the `report` artifact of this run, or the MLflow run._"]) + "\n"


def main(remote: str | None = None, pull: bool = True, push: bool = True, summary: Path | None = None) -> list[str]:
    """Returns the stages that re-ran."""
    configured = remotes()
    if remote and remote not in configured:
        raise PipelineError(f"retrain: no DVC remote named {remote!r} (have: {', '.join(configured) or 'none'}) — "
                            "add it with `dvc remote add`")
    target = ["--remote", remote] if remote else []
    if not configured and (pull or push):
        say("retrain: no DVC remote configured — nothing to pull or push (add one: `dvc remote add -d NAME URL`)")
    if pull and configured:
        check(dvc("pull", "--allow-missing", *target), "dvc pull",
              "check the remote's URL and credentials (`dvc remote list`, `dvc remote modify`)")
    result = check(dvc("repro", stream=True), "dvc repro", "see the stage output above")
    ran = [m.group(1) for m in map(STAGE_LINE.match, result.stdout.splitlines()) if m]
    if push and configured:
        check(dvc("push", *target), "dvc push",
              "check write access to the remote (`dvc remote list`, `dvc remote modify`)")
    decision = json.loads(paths.DECISION.read_text()) if paths.DECISION.is_file() else None
    if decision is None:
        outcome = "no model evaluated"
    elif "evaluate" in ran:
        verdict = "champion" if decision["promote"] else "challenger (champion kept)"
        outcome = f"{decision['model']} v{decision['version']} is {verdict}: {decision['reason']}"
    else:
        outcome = f"registry unchanged ({decision['model']} v{decision['version']} is the evaluated model)"
    say(f"retrain: re-ran {', '.join(ran) if ran else 'nothing (up to date)'}; {outcome}; report: {paths.REPORT}")
    summary = summary or (Path(os.environ["GITHUB_STEP_SUMMARY"]) if os.environ.get("GITHUB_STEP_SUMMARY") else None)
    if summary:
        diff = dvc("metrics", "diff", "--md")
        with open(summary, "a", encoding="utf-8") as handle:
            handle.write(job_summary(ran, decision, diff.stdout if diff.returncode == 0 else ""))
    return ran
