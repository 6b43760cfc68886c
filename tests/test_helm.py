"""The Helm chart, through Helm's own Go SDK (helm-python-sdk): lint, schema, and parity with kustomize.

Rendered manifests are also checked by tests/test_k8s.py (schemas and policies) with the others.
"""

from __future__ import annotations

from typing import Any

import helm_python
import pytest
import yaml
from manifests import CHART, HELM_VALUES, RELEASE, helm, kustomize, pods

# What the chart renders with these values must be exactly what kustomize renders from that folder,
# apart from the labels only one of the tools sets.
PARITY = {"defaults": "base", "multinode": "overlays/multinode", "kueue": "overlays/kueue"}
TOOL_LABELS = {"helm.sh/chart", "app.kubernetes.io/managed-by"}


@pytest.mark.parametrize("values_name", sorted(HELM_VALUES))
def test_lint_strict(values_name: str) -> None:
    report = helm_python.lint(CHART, HELM_VALUES[values_name], strict=True, namespace="default")
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] > 1] == [], report


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"finetune": {"gpus": "two"}}, "/finetune/gpus"),
        ({"generate": {"shards": 0}}, "/generate/shards"),
        ({"generate": {"shard": 3}}, "'shard' not allowed"),
        ({"storage": {"outputs": {"existingClaim": "x", "readOnly": True}}}, "'readOnly' not allowed"),
        ({"imagee": {"tag": "1"}}, "'imagee' not allowed"),
        ({"lora": {"env": {"lora_rank": "8"}}}, "lora_rank"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"prefetch": {"resources": {"requests": {"cpu": "lots", "memory": "1Gi"}}}}, "/prefetch/resources"),
    ],
)
def test_schema_rejects_wrong_types_and_unknown_keys(values: dict[str, Any], complaint: str) -> None:
    with helm_python.Chart.load(CHART) as chart:
        with pytest.raises(helm_python.HelmValuesError, match=complaint):
            chart.validate_schema(values)


def test_schema_covers_every_value() -> None:
    """Every key of values.yaml is described by the schema (which rejects keys it does not know)."""
    with helm_python.Chart.load(CHART) as chart:
        values, schema = chart.values, chart.schema
        chart.validate_schema({})

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if "properties" not in node:
            return
        assert node.get("additionalProperties") is False, f"{path or 'values'} accepts unknown keys"
        assert set(value) <= set(node["properties"]), path
        for key, child in value.items():
            if isinstance(child, dict):
                walk(child, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")


def without_tool_labels(manifest: Any) -> Any:
    """The manifest with the labels that say which tool rendered it removed, and env sorted by name."""
    if isinstance(manifest, list):
        items = [without_tool_labels(item) for item in manifest]
        if items and all(isinstance(i, dict) and "name" in i and ("value" in i or "valueFrom" in i) for i in items):
            items.sort(key=lambda var: var["name"])
        return items
    if isinstance(manifest, dict):
        return {key: without_tool_labels(value) for key, value in manifest.items() if key not in TOOL_LABELS}
    return manifest


@pytest.mark.parametrize("values_name", sorted(PARITY))
def test_chart_renders_what_kustomize_renders(values_name: str) -> None:
    """Same objects, names, env, volumes, security settings and policies: no drift between the two."""

    def by_object(manifests: list[dict]) -> dict[tuple[str, str], dict]:
        return {(m["kind"], m["metadata"]["name"]): without_tool_labels(m) for m in manifests}

    chart = by_object(helm(values_name))
    base = by_object(list(kustomize(PARITY[values_name])))
    assert sorted(chart) == sorted(base)
    for key in base:
        assert chart[key] == base[key], key


def test_switches_storage_and_image() -> None:
    """helm custom: jobs switched off, an existing claim, another registry, model and shard count."""
    manifests = helm("custom")
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in manifests)
    assert ("Job", f"{RELEASE}-prefetch") not in kinds and ("Job", f"{RELEASE}-img2img") not in kinds
    assert ("Job", f"{RELEASE}-pack") not in kinds
    claims = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "PersistentVolumeClaim"}
    assert sorted(claims) == [f"{RELEASE}-models", f"{RELEASE}-outputs"]  # datasets: the team's own claim
    assert claims[f"{RELEASE}-models"]["spec"]["storageClassName"] == "cephfs"
    for _, _, pod in pods(manifests):
        container = pod["containers"][0]
        assert container["image"] == "registry.example.com/ml/pai-diffusion-jobs:1.2.3"
        env = {v["name"]: v.get("value") for v in container["env"]}
        assert env["MODEL_NAME"] == "alibaba-pai/pai-diffusion-food-large-zh"
        assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "gpu-a100"}
        assert "tolerations" not in pod
        claims_used = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        if "TRAIN_DIR" in env:
            assert "team-datasets" in claims_used
    [cron] = [m for m in manifests if m["kind"] == "CronJob"]
    assert cron["spec"]["schedule"] == "30 2 * * 1-5" and cron["spec"]["timeZone"] == "Europe/Berlin"
    assert cron["spec"]["jobTemplate"]["spec"]["completions"] == 8
    [lora] = [m for m in manifests if m["metadata"]["name"] == f"{RELEASE}-lora" and m["kind"] == "Job"]
    env = {v["name"]: v.get("value") for v in lora["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MAX_TRAIN_STEPS"] == "200" and env["TRAIN_TEXT_ENCODER"] == "true" and env["NNODES"] == "3"


def test_notes_tell_how_to_follow_the_jobs() -> None:
    with helm_python.Chart.load(CHART) as chart:
        notes = chart.render({}, name=RELEASE, namespace="ml")[f"{RELEASE}/templates/NOTES.txt"]
    assert f"kubectl -n ml logs -f job/{RELEASE}-finetune" in notes
    assert f"wait --for=condition=complete --timeout=2h job/{RELEASE}-prefetch" in notes
    assert f"create job --from=cronjob/{RELEASE}-generate" in notes


def test_pod_settings_for_every_job_and_a_jobs_own_override_them() -> None:
    values = {
        "image": {"digest": "sha256:" + "ab" * 32},
        "imagePullSecrets": [{"name": "registry"}],
        "priorityClassName": "batch-low",
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
        "podAnnotations": {"team": "ml"},
        "env": {"HF_HUB_ENABLE_HF_TRANSFER": "1", "MAX_TRAIN_STEPS": "9"},
        "envFrom": [{"secretRef": {"name": "hf-token"}}],
        "lora": {"priorityClassName": "batch-high", "env": {"MAX_TRAIN_STEPS": "20000"}, "podAnnotations": {"x": "y"}},
    }
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(values)
        rendered = chart.render(values, name=RELEASE, namespace="default")
    docs = [doc for path, text in rendered.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]
    for manifest, _, pod in pods(docs):
        container = pod["containers"][0]
        assert container["image"] == "pai-diffusion-jobs@sha256:" + "ab" * 32
        assert pod["imagePullSecrets"] == [{"name": "registry"}] and "nodeAffinity" in pod["affinity"]
        assert {"secretRef": {"name": "hf-token"}} in container["envFrom"]
        env = {v["name"]: v.get("value") for v in container["env"]}
        assert env["HF_HUB_ENABLE_HF_TRANSFER"] == "1"
        template = (
            manifest["spec"]["template"]
            if manifest["kind"] == "Job"
            else manifest["spec"]["jobTemplate"]["spec"]["template"]
        )
        lora = manifest["metadata"]["name"] == f"{RELEASE}-lora"
        assert pod["priorityClassName"] == ("batch-high" if lora else "batch-low")
        assert template["metadata"]["annotations"] == ({"team": "ml", "x": "y"} if lora else {"team": "ml"})
        if lora:
            assert env["MAX_TRAIN_STEPS"] == "20000"  # the job's own setting wins over the chart-wide one


def test_multinode_resources_scale_with_the_gpus() -> None:
    """The docs' `--set finetune.nodes=4,finetune.gpus=8`: 8 GPUs a pod with 8 times a GPU's CPU and memory."""
    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render({"finetune": {"nodes": 4, "gpus": 8}}, name=RELEASE, namespace="default")
    docs = [doc for path, text in rendered.items() if path.endswith(".yaml") for doc in yaml.safe_load_all(text) if doc]
    [job] = [d for d in docs if d["kind"] == "Job" and d["metadata"]["name"] == f"{RELEASE}-finetune"]
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 8
    assert resources["requests"]["cpu"] == "64" and resources["requests"]["memory"] == "512Gi"
    assert resources["limits"]["memory"] == "512Gi" and resources["requests"]["ephemeral-storage"] == "20Gi"
    assert job["spec"]["backoffLimit"] == 12 and job["spec"]["completions"] == 4
