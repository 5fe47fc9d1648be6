"""deploy/k8s: every manifest is a valid Kubernetes object (kubernetes-validate's schemas, strict),
and the pieces fit: probes on the right paths and port, a grace period longer than the drain, the
PVC at --data-dir, the keys Secret at --keys-file, one replica, the HPA example not applied.
deploy/k8s/shared (N replicas) and rayservice.yaml have their own test files.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest

from tests.deploy import files
from tests.deploy.files import (
    K8S,
    RAYSERVICE,
    dockerfile_stages,
    exec_form,
    load_yaml,
    load_yaml_documents,
    serve_options,
)

KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")  # oldest and newest in kubernetes-validate's schemas
UVICORN_SHUTDOWN_S = 6  # after the drain: failed requests' error events (1 s) + uvicorn's own (5 s)


def manifests() -> dict[str, list[dict]]:
    """File name → its Kubernetes objects (the kustomization file is not one, and the RayService,
    a KubeRay custom resource, is checked by test_rayservice.py)."""
    return {
        path.name: load_yaml_documents(path)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name not in ("kustomization.yaml", RAYSERVICE.name)
    }


def objects() -> list[dict]:
    return [obj for docs in manifests().values() for obj in docs]


def one(kind: str) -> dict:
    [found] = [obj for obj in objects() if obj["kind"] == kind]
    return found


def pod_spec() -> dict:
    return one("Deployment")["spec"]["template"]["spec"]


def container() -> dict:
    [found] = pod_spec()["containers"]
    return found


def container_options() -> dict[str, object]:
    """``loraplex serve`` as the pod runs it: the image's entrypoint and ENV, then the pod's."""
    _, stages = dockerfile_stages()
    [entrypoint] = stages[-1].all("ENTRYPOINT")
    environ = {**stages[-1].env(), **{e["name"]: e["value"] for e in container().get("env", [])}}
    return serve_options([*exec_form(entrypoint)[2:], *container()["args"]], environ)


def mount_at(path: str) -> tuple[dict, dict]:
    return files.mount_at(pod_spec(), path)


def test_every_manifest_is_a_valid_kubernetes_object():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    assert len(objects()) >= 4
    for obj in objects():
        assert obj["apiVersion"] and obj["kind"] and obj["metadata"]["name"], obj
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    broken = copy.deepcopy(one("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_kustomization_applies_everything_but_the_hpa_example():
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization["resources"]) == set(manifests()) - {"hpa-example.yaml"}


def test_the_server_arguments_parse_and_bind_all_interfaces_on_the_container_port():
    options = container_options()
    assert options["host"] == "0.0.0.0"
    [port] = container()["ports"]
    assert port["containerPort"] == options["port"]


def test_probes_hit_readiness_and_liveness_on_the_container_port():
    [port] = container()["ports"]
    expected = {"readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health"}
    for probe, path in expected.items():
        get = container()[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] in (port["name"], port["containerPort"]), probe


def test_the_grace_period_covers_pre_stop_drain_and_shutdown():
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + float(container_options()["drain_timeout"]) + UVICORN_SHUTDOWN_S
    assert pod_spec()["terminationGracePeriodSeconds"] > needed


def test_the_adapter_store_is_the_persistent_volume_claim():
    mount, volume = mount_at(str(container_options()["data_dir"]))
    assert mount["mountPath"] == str(container_options()["data_dir"])
    assert not mount.get("readOnly")
    assert volume["persistentVolumeClaim"]["claimName"] == one("PersistentVolumeClaim")["metadata"]["name"]
    assert one("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_one_replica_replaced_not_rolled_because_the_store_is_per_replica():
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two pods on the RWO claim


def test_the_keys_file_comes_from_a_secret_directory():
    keys_file = Path(str(container_options()["keys_file"]))
    mount, volume = mount_at(str(keys_file))
    assert mount["readOnly"] is True and "subPath" not in mount  # subPath mounts miss key rotations
    [item] = volume["secret"]["items"]
    assert Path(mount["mountPath"]) / item["path"] == keys_file
    assert volume["secret"]["secretName"]


def test_the_service_selects_the_pods_and_targets_the_container_port():
    service, deployment = one("Service"), one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [port] = container()["ports"]
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_requests_and_limits_are_set_and_consistent():
    resources = container()["resources"]
    for resource in ("cpu", "memory"):
        request, limit = resources["requests"][resource], resources["limits"][resource]
        assert quantity(request) <= quantity(limit), resource


def quantity(text: str) -> float:
    """A Kubernetes quantity (2, 500m, 4Gi, 1G) as a number."""
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text)).groups()
    scale = {
        "": 1,
        "m": 1e-3,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
    }
    return float(number) * scale[unit]


def test_the_pod_runs_as_the_images_non_root_user():
    _, stages = dockerfile_stages()
    [user] = stages[-1].all("USER")
    uid = int(user.split(":")[0])
    security = pod_spec()["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == uid != 0
    assert security["fsGroup"] == int(user.split(":")[1])  # the PVC becomes writable by it
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False
    if container()["securityContext"].get("readOnlyRootFilesystem"):  # uploads are spooled in /tmp
        mount, volume = mount_at("/tmp")
        assert mount["mountPath"] == "/tmp" and "emptyDir" in volume


def test_the_hpa_example_scales_the_deployment():
    hpa, deployment = one("HorizontalPodAutoscaler"), one("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] == 1 < hpa["spec"]["maxReplicas"]
    text = (K8S / "hpa-example.yaml").read_text()
    assert "own store" in text and "S3" in text  # the note on why it is not applied
