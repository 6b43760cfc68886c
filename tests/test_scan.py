"""checkov, an IaC scanner, over every kustomize and chart rendering and over the Dockerfile, offline.

Every check either passes or is in k8s/checkov-skips.yaml with a reason specific to these workloads;
a skip that no longer fails must go, so the list cannot hide a regression. checkov runs from a venv
of its own (`make install` builds .venv-checkov), as its pins clash with the jobs'.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from manifests import RENDERINGS, REPO, rendering

CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
SKIPS = yaml.safe_load((REPO / "k8s" / "checkov-skips.yaml").read_text())


def failed_checks(framework: str, files: list[Path]) -> dict[str, set[str]]:
    """checkov's failed checks over `files`: check id -> the resources that fail it."""
    command = [CHECKOV, "--framework", framework, "--skip-download", "--quiet", "--compact", "-o", "json"]
    for file in files:
        command += ["-f", file]
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=600)
    reports = json.loads(done.stdout)
    failed: dict[str, set[str]] = {}
    for report in reports if isinstance(reports, list) else [reports]:
        for check in report.get("results", {}).get("failed_checks", []):
            failed.setdefault(check["check_id"], set()).add(check["resource"])
    return failed


def test_every_skip_has_a_reason_of_its_own():
    assert len({skip["id"] for skip in SKIPS}) == len(SKIPS)
    assert all(len(skip["reason"].split()) >= 8 for skip in SKIPS), "a skip needs a reason"


def test_checkov_finds_nothing_but_the_skipped_checks(tmp_path: Path):
    files = []
    for name in RENDERINGS:
        files.append(tmp_path / f"{name.replace(' ', '-').replace('/', '-')}.yaml")
        files[-1].write_text(yaml.safe_dump_all(rendering(name)))
    failed = failed_checks("kubernetes", files) | failed_checks("dockerfile", [REPO / "Dockerfile"])
    skipped = {skip["id"] for skip in SKIPS}
    unexpected = {check: sorted(resources)[:3] for check, resources in failed.items() if check not in skipped}
    assert not unexpected, unexpected
    assert skipped == set(failed), f"skips that no longer fail: {sorted(skipped - set(failed))}"
