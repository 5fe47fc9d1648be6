"""deploy/k8s/shared: N replicas over one shared adapter catalogue. Every manifest is a valid
Kubernetes object (strict), the kustomization applies them all (rendered by kubectl where it is
installed), and the pieces fit: the store flags parse and name PostgreSQL and S3 with no password
in the URL, every credential the code reads comes from the Secret whose keys the header's
`kubectl create secret` command creates, --data-dir is an emptyDir (no PVC), the rollout never
drops below the replica count, and probes, shutdown, security and resources stay those of the
single-replica deploy/k8s/deployment.yaml.
"""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.deploy import files
from tests.deploy.files import (
    K8S,
    K8S_SHARED,
    container_env,
    image_options,
    load_yaml,
    load_yaml_documents,
    secret_refs,
    tool,
)
from tests.deploy.test_k8s import KUBERNETES_VERSIONS, UVICORN_SHUTDOWN_S

# what adapters/shared_store.py (libpq) and adapters/blobs.py (boto3) read from the environment
STORE_SECRETS = ("PGPASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# kept identical to the single-replica Deployment's container
SAME_AS_SINGLE = ("ports", "startupProbe", "readinessProbe", "livenessProbe", "lifecycle", "resources",
                  "securityContext")  # fmt: skip


def manifests() -> dict[str, list[dict]]:
    return {
        p.name: load_yaml_documents(p)
        for p in sorted(K8S_SHARED.glob("*.yaml"))
        if p.name != "kustomization.yaml"
    }


def one(kind: str, directory: Path = K8S_SHARED) -> dict:
    objects = [obj for p in sorted(directory.glob("*.yaml")) if p.name != "kustomization.yaml"
               for obj in load_yaml_documents(p)]  # fmt: skip
    [found] = [obj for obj in objects if obj.get("kind") == kind]
    return found


def pod_spec(directory: Path = K8S_SHARED) -> dict:
    return one("Deployment", directory)["spec"]["template"]["spec"]


def container(directory: Path = K8S_SHARED) -> dict:
    [found] = pod_spec(directory)["containers"]
    return found


def options() -> dict[str, object]:
    return image_options(container()["args"], container_env(container()))


def mount_at(path: str) -> tuple[dict, dict]:
    return files.mount_at(pod_spec(), path)


def test_every_manifest_is_a_valid_kubernetes_object():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = [obj for docs in manifests().values() for obj in docs]
    assert {obj["kind"] for obj in objects} == {"Deployment", "Service", "PodDisruptionBudget"}
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
    broken = copy.deepcopy(one("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"] = {"secretRef": {"name": "x"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_kustomization_applies_every_manifest():
    kustomization = load_yaml(K8S_SHARED / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(manifests())


def test_kubectl_kustomize_renders_it():
    kubectl = tool("kubectl")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S_SHARED)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    import yaml

    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(obj["kind"] for obj in rendered) == ["Deployment", "PodDisruptionBudget", "Service"]
    assert all(obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "loraplex" for obj in rendered)


def test_the_store_flags_name_postgresql_and_s3_with_the_password_kept_out_of_the_url():
    resolved = options()
    assert resolved["host"] == "0.0.0.0" and resolved["adapters"] == {}  # --adapter is refused when shared
    store, blobs = urlsplit(str(resolved["adapter_store"])), urlsplit(str(resolved["adapter_blobs"]))
    assert store.scheme == "postgresql" and store.hostname and store.username and store.path.strip("/")
    assert store.password is None, "the password comes from PGPASSWORD (a Secret), never the URL"
    assert blobs.scheme == "s3" and blobs.hostname
    [port] = container()["ports"]
    assert port["containerPort"] == resolved["port"]


def test_every_credential_comes_from_the_secret_the_header_creates():
    refs = secret_refs(container())
    assert set(STORE_SECRETS) <= set(refs)
    store_refs = {name: ref for name, ref in refs.items() if name in STORE_SECRETS}
    [secret] = {secret for secret, _ in store_refs.values()}
    header = (K8S_SHARED / "deployment.yaml").read_text()
    command = re.search(rf"kubectl create secret generic {secret}((?:.*\\\n)*.*)", header)[1]
    created = set(re.findall(r"--from-literal=(\w+)=", command))
    assert {key for _, key in store_refs.values()} == created
    env = container_env(container())
    assert env["AWS_DEFAULT_REGION"]
    if "AWS_ENDPOINT_URL" in env:
        assert urlsplit(env["AWS_ENDPOINT_URL"]).scheme in ("http", "https")
    for name, value in env.items():  # nothing secret is written in the manifest
        if any(word in name for word in ("PASSWORD", "SECRET", "ACCESS_KEY")):
            assert value.startswith("<secret "), name


def test_the_data_dir_is_an_empty_dir_and_nothing_claims_a_volume():
    mount, volume = mount_at(str(options()["data_dir"]))
    assert mount["mountPath"] == str(options()["data_dir"]) and not mount.get("readOnly")
    assert "emptyDir" in volume
    assert not any("persistentVolumeClaim" in v for v in pod_spec()["volumes"])
    assert "PersistentVolumeClaim" not in {obj["kind"] for docs in manifests().values() for obj in docs}


def test_several_replicas_rolled_without_dropping_below_the_count():
    deployment = one("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0
    pdb = one("PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    [spread] = pod_spec()["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


def test_probes_shutdown_security_and_resources_are_the_single_replicas():
    single, shared = container(K8S), container()
    for key in SAME_AS_SINGLE:
        assert shared[key] == single[key], key
    for key in ("terminationGracePeriodSeconds", "securityContext"):
        assert pod_spec()[key] == pod_spec(K8S)[key], key
    assert one("Service") == one("Service", K8S)
    shared_meta = one("Deployment")["spec"]["template"]["metadata"]
    assert shared_meta == one("Deployment", K8S)["spec"]["template"]["metadata"]
    pre_stop = shared["lifecycle"]["preStop"]["exec"]["command"]
    needed = float(pre_stop[1]) + float(options()["drain_timeout"]) + UVICORN_SHUTDOWN_S
    assert pod_spec()["terminationGracePeriodSeconds"] > needed


def test_the_keys_file_comes_from_a_secret_directory():
    keys_file = Path(str(options()["keys_file"]))
    mount, volume = mount_at(str(keys_file))
    assert mount["readOnly"] is True and "subPath" not in mount
    [item] = volume["secret"]["items"]
    assert Path(mount["mountPath"]) / item["path"] == keys_file
    if container()["securityContext"].get("readOnlyRootFilesystem"):
        mount, volume = mount_at("/tmp")
        assert mount["mountPath"] == "/tmp" and "emptyDir" in volume
