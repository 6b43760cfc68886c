"""Render the Kubernetes manifests with the real tools, offline: `kubectl kustomize` and Helm's Go SDK.

Shared by tests/test_k8s.py and tests/test_helm.py; every rendering is cached for the session.
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
CHART = REPO / "helm" / "pai-diffusion"
RELEASE = "pai-diffusion"  # with this release name the chart's object names are the base's

Manifest = dict[str, Any]

# Value sets that must render what the overlays render, and one that exercises the other switches.
HELM_MULTINODE = {"finetune": {"nodes": 2, "gpus": 8}}  # resources per GPU: 8 GPUs get 8 times the CPU and memory
HELM_KUEUE = {"kueue": {"queueName": "pai-diffusion"}}
HELM_CUSTOM = {
    "image": {"repository": "registry.example.com/ml/pai-diffusion-jobs", "tag": "1.2.3"},
    "model": "alibaba-pai/pai-diffusion-food-large-zh",
    "storage": {"datasets": {"existingClaim": "team-datasets"}, "models": {"storageClassName": "cephfs"}},
    "nodeSelector": {"nvidia.com/gpu.present": None, "node.kubernetes.io/instance-type": "gpu-a100"},
    "tolerations": [],
    "prefetch": {"enabled": False},
    "pack": {"enabled": False},
    "img2img": {"enabled": False},
    "lora": {"nodes": 3, "gpus": 4, "env": {"MAX_TRAIN_STEPS": 200, "TRAIN_TEXT_ENCODER": True}},
    "generate": {"shards": 8, "schedule": "30 2 * * 1-5", "timeZone": "Europe/Berlin"},
}
HELM_VALUES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "multinode": HELM_MULTINODE,
    "kueue": HELM_KUEUE,
    "custom": HELM_CUSTOM,
}
OVERLAYS = ("base", "overlays/multinode", "overlays/kueue")


@cache
def kustomize(directory: str) -> tuple[Manifest, ...]:
    """`kubectl kustomize k8s/<directory>`, parsed."""
    output = subprocess.run(
        ["kubectl", "kustomize", str(K8S / directory)], capture_output=True, text=True, check=True
    ).stdout
    return tuple(doc for doc in yaml.safe_load_all(output) if doc)


@cache
def _helm(values_name: str) -> tuple[Manifest, ...]:
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render(HELM_VALUES[values_name], name=RELEASE, namespace="default")
    docs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return tuple(docs)


def helm(values_name: str) -> list[Manifest]:
    """The chart rendered with one of HELM_VALUES (a copy: tests may change it)."""
    return copy.deepcopy(list(_helm(values_name)))


RENDERINGS = [f"kustomize {d}" for d in OVERLAYS] + [f"helm {name}" for name in HELM_VALUES]


def rendering(name: str) -> list[Manifest]:
    """One of RENDERINGS, e.g. `kustomize overlays/kueue` or `helm custom`."""
    tool, which = name.split(" ")
    return copy.deepcopy(list(kustomize(which))) if tool == "kustomize" else helm(which)


def job_specs(manifest: Manifest) -> Iterator[Manifest]:
    """The Job spec of a Job, or of a CronJob's job template."""
    if manifest["kind"] == "Job":
        yield manifest["spec"]
    elif manifest["kind"] == "CronJob":
        yield manifest["spec"]["jobTemplate"]["spec"]


def pods(manifests: list[Manifest]) -> Iterator[tuple[Manifest, Manifest, Manifest]]:
    """(object, job spec, pod spec) for every Job and CronJob."""
    for manifest in manifests:
        for spec in job_specs(manifest):
            yield manifest, spec, spec["template"]["spec"]


def component(manifest: Manifest) -> str:
    return manifest["metadata"]["labels"]["app.kubernetes.io/component"]
