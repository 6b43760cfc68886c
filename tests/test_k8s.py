"""The Kubernetes manifests: kustomize base and overlays, and every chart rendering, checked offline.

Schemas by kubernetes-validate (strict), style by yamllint, and the project's rules by the policy
tests below, which run over every rendering so that the base, the overlays and the chart all obey.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from manifests import RENDERINGS, REPO, component, kustomize, pods, rendering

from jobs.config import LAUNCHER_VARIABLES, JobConfig
from jobs.launch import Topology, topology
from jobs.registry import JOBS

BIN = Path(sys.executable).parent
ALL = pytest.mark.parametrize("name", RENDERINGS)
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
CONFIGS = {name: job.config for name, job in JOBS.items()} | {"prefetch": JobConfig}  # `hf download $(MODEL_NAME)`
RECOMMENDED_LABELS = {
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/managed-by",
}


def env_names(config_cls: type[JobConfig]) -> set[str]:
    """The environment variables a job reads: field names and their aliases, upper case (jobs/config.py)."""
    names = set()
    for field_name, field in config_cls.model_fields.items():
        names.add(field_name)
        names.update(choice for choice in getattr(field.validation_alias, "choices", []) if isinstance(choice, str))
    return {name.upper() for name in names if name.lower() not in LAUNCHER_VARIABLES}


def platform_variables() -> set[str]:
    """The variables docs/kubernetes.md documents in its "Platform variables" table."""
    text = (REPO / "docs" / "kubernetes.md").read_text()
    table = text.split("## Platform variables", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z0-9_]+)`", table, flags=re.M))


def test_validates_strictly(tmp_path: Path) -> None:
    files = []
    for name in RENDERINGS:
        files.append(tmp_path / f"{name.replace(' ', '-').replace('/', '-')}.yaml")
        files[-1].write_text(yaml.safe_dump_all(rendering(name)))
    for version in KUBERNETES_VERSIONS:
        result = subprocess.run(
            [BIN / "kubernetes-validate", "--strict", "--quiet", "-k", version, *files], capture_output=True, text=True
        )
        assert result.returncode == 0, f"Kubernetes {version}:\n{result.stdout}{result.stderr}"


def test_yamllint() -> None:
    result = subprocess.run([BIN / "yamllint", "--strict", "k8s", "helm"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@ALL
def test_every_object_has_the_recommended_labels(name: str) -> None:
    manifests = rendering(name)
    for manifest in manifests:
        assert RECOMMENDED_LABELS <= manifest["metadata"]["labels"].keys(), manifest["metadata"]["name"]
    for manifest, job, _ in pods(manifests):  # pods, and each night's Job, carry them too
        assert RECOMMENDED_LABELS <= job["template"]["metadata"]["labels"].keys()
        if manifest["kind"] == "CronJob":
            assert RECOMMENDED_LABELS <= manifest["spec"]["jobTemplate"]["metadata"]["labels"].keys()


@ALL
def test_every_job_pod_follows_the_rules(name: str) -> None:
    found = set()
    for manifest, job, pod in pods(rendering(name)):
        what = f"{name}: {manifest['metadata']['name']}"
        found.add(component(manifest))
        [container] = pod["containers"]
        assert container["name"] == component(manifest), what

        # Failure handling: exit 2 is final, disruptions are free, pods are never restarted in place.
        per_index = "backoffLimitPerIndex" in job
        rules = job["podFailurePolicy"]["rules"]
        assert {
            "action": "FailIndex" if per_index else "FailJob",
            "onExitCodes": {"containerName": container["name"], "operator": "In", "values": [2]},
        } in rules, what
        assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
        assert pod["restartPolicy"] == "Never", what
        assert job["activeDeadlineSeconds"] > 0 and job["ttlSecondsAfterFinished"] > 0, what
        if component(manifest) in ("finetune", "lora"):
            assert pod["terminationGracePeriodSeconds"] >= 300, f"{what}: too short to save a checkpoint"

        # Restricted pod security.
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, what
        assert pod["serviceAccountName"], what

        # Resources: CPU and memory requested; a GPU, on GPU nodes, for all but the download.
        resources = container["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys(), what
        gpu = component(manifest) not in ("prefetch", "pack")
        assert ("nvidia.com/gpu" in resources["limits"]) == gpu, what
        if gpu:
            assert resources["limits"]["nvidia.com/gpu"] >= 1
            assert "nodeSelector" in pod or "tolerations" in pod or name == "helm custom", what

        # Writable scratch space: /tmp and an in-memory /dev/shm.
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", what
        assert "emptyDir" in volumes[mounts["/tmp"]], what
        assert set(mounts.values()) == set(volumes), what
    assert found, name


@ALL
def test_env_vars_are_settings_of_the_job_or_documented(name: str) -> None:
    platform = platform_variables()
    assert {"HF_HOME", "HF_HUB_OFFLINE", "CONFIG_FILE", "NNODES", "MASTER_ADDR", "PET_NNODES"} <= platform
    for manifest, _, pod in pods(rendering(name)):
        [container] = pod["containers"]
        known = env_names(CONFIGS[component(manifest)]) | platform
        defined: list[str] = []
        for var in container["env"]:
            assert var["name"] in known, f"{name}: {var['name']} is no setting of {component(manifest)}"
            for reference in re.findall(r"\$\((\w+)\)", var.get("value", "")):
                assert reference in defined, f"{var['name']} uses $({reference}) before it is defined"
            defined.append(var["name"])


@ALL
def test_claims_are_shared_and_left_to_the_cluster(name: str) -> None:
    manifests = rendering(name)
    claims = [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    for claim in claims:
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
        if not name.endswith("custom"):
            assert "storageClassName" not in claim["spec"]
    [account] = [m for m in manifests if m["kind"] == "ServiceAccount"]
    assert account["automountServiceAccountToken"] is False
    claimed = {
        v["persistentVolumeClaim"]["claimName"]
        for _, _, pod in pods(manifests)
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert {c["metadata"]["name"] for c in claims} <= claimed


@ALL
def test_nightly_generate_is_sharded_into_its_own_folder(name: str) -> None:
    manifests = rendering(name)
    [cron] = [m for m in manifests if m["kind"] == "CronJob"]
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["timeZone"] and spec["startingDeadlineSeconds"] > 0
    assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    assert job["completionMode"] == "Indexed" and job["backoffLimitPerIndex"] >= 1
    assert job["completions"] == job["parallelism"]
    env = {v["name"]: v for v in job["template"]["spec"]["containers"][0]["env"]}
    assert int(env["NUM_SHARDS"]["value"]) == job["completions"]
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"
    assert env["OUTPUT_DIR"]["value"].endswith("/$(JOB_NAME)")
    # The prompt list the CronJob mounts exists and is the file PROMPTS_FILE names.
    [prompts] = [m for m in manifests if m["kind"] == "ConfigMap"]
    pod = job["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == prompts["metadata"]["name"]
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"]]
    assert env["PROMPTS_FILE"]["value"] == f"{mount['mountPath']}/prompts.txt"
    assert len(prompts["data"]["prompts.txt"].splitlines()) >= 5


def multinode_jobs(manifests: list[dict]) -> list[dict]:
    return [m for m in manifests if m["kind"] == "Job" and m["spec"].get("completionMode") == "Indexed"]


@pytest.mark.parametrize("name", ["kustomize overlays/multinode", "helm multinode", "helm custom"])
def test_multinode_pods_find_node_0_and_launch_every_gpu(name: str) -> None:
    """The Indexed Job's env, read by jobs/launch.py as each pod would, gives nodes x GPUs processes."""
    manifests = rendering(name)
    [job] = multinode_jobs(manifests)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["podReplacementPolicy"] == "Failed" and spec["completions"] == spec["parallelism"]
    [service] = [m for m in manifests if m["kind"] == "Service"]
    assert service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    container = pod["containers"][0]
    env = {v["name"]: v["value"] for v in container["env"] if "value" in v}
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    nodes = spec["completions"]
    master = f"{job['metadata']['name']}-0.{service['metadata']['name']}"  # pod hostname . subdomain
    for index in range(nodes):
        shape = topology({**env, "JOB_COMPLETION_INDEX": str(index)}, gpus)
        assert shape == Topology(nodes, gpus, index, master, service["spec"]["ports"][0]["port"], False)


def test_single_node_jobs_launch_every_gpu_of_their_pod() -> None:
    for manifest, _, pod in pods(list(kustomize("base"))):
        container = pod["containers"][0]
        env = {v["name"]: v["value"] for v in container["env"] if "value" in v}
        if component(manifest) in ("finetune", "lora"):
            assert topology(env, gpus=4).world_size == 4


@pytest.mark.parametrize("name", ["kustomize overlays/kueue", "helm kueue"])
def test_kueue_admits_every_job(name: str) -> None:
    manifests = rendering(name)
    jobs = [m for m in manifests if m["kind"] == "Job"]
    jobs += [m["spec"]["jobTemplate"] for m in manifests if m["kind"] == "CronJob"]
    assert len(jobs) == 6  # prefetch, pack, finetune, lora, img2img, the nightly generate
    for job in jobs:
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "pai-diffusion"
        assert job["spec"]["suspend"] is True


def quantity_gi(value: str) -> float:
    """A memory or storage quantity in Gi (the manifests use Gi and Mi)."""
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * {"Gi": 1, "Mi": 1 / 1024, "Ti": 1024}[unit]


@ALL
def test_pods_are_hardened_for_a_production_cluster(name: str) -> None:
    for manifest, job, pod in pods(rendering(name)):
        what = f"{name}: {manifest['metadata']['name']}"
        assert pod["automountServiceAccountToken"] is False, what
        assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", what
        [container] = pod["containers"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")["emptyDir"]["sizeLimit"]
        # Ephemeral storage requested and bounded, so a pod is scheduled where /tmp fits and never evicted for it.
        assert quantity_gi(requests["ephemeral-storage"]) >= quantity_gi(tmp), what
        assert quantity_gi(limits["ephemeral-storage"]) >= quantity_gi(requests["ephemeral-storage"]), what
        if component(manifest) in ("finetune", "lora"):  # multi-day pods: not first in line for eviction
            assert requests["memory"] == limits["memory"], what
        if job.get("completionMode") == "Indexed" and "backoffLimitPerIndex" not in job:
            assert job["backoffLimit"] == 3 * job["completions"], what  # one node's failure fails them all


def selects(policy: dict, labels: dict) -> bool:
    wanted = policy["spec"]["podSelector"].get("matchLabels", {})
    return all(labels.get(key) == value for key, value in wanted.items())


@ALL
def test_job_pods_accept_no_connections_but_a_training_jobs_own(name: str) -> None:
    manifests = rendering(name)
    policies = [m for m in manifests if m["kind"] == "NetworkPolicy"]
    assert policies and all(p["spec"]["policyTypes"] == ["Ingress"] for p in policies)  # egress stays open
    for manifest, job, _ in pods(manifests):
        labels = dict(job["template"]["metadata"]["labels"])
        if manifest["kind"] == "Job":
            labels["batch.kubernetes.io/job-name"] = manifest["metadata"]["name"]  # set by the Job controller
        mine = [p for p in policies if selects(p, labels)]
        assert mine, f"{name}: {manifest['metadata']['name']} is selected by no NetworkPolicy"
        sources = [source for p in mine for rule in p["spec"].get("ingress", []) for source in rule["from"]]
        if job.get("completionMode") == "Indexed" and manifest["kind"] == "Job":
            own = {"batch.kubernetes.io/job-name": manifest["metadata"]["name"]}
            assert sources == [{"podSelector": {"matchLabels": own}}], name
        else:
            assert sources == [], f"{name}: {manifest['metadata']['name']} accepts connections"
