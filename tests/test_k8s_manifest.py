"""The Kubernetes manifest: valid against the Kubernetes schemas and consistent with the code it deploys.

Values come from the manifest and from this checkout's sources (parsed, not imported: the installed
h33_bento may be another checkout's), so changing either side without the other fails here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli comes with pytest
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "bentos" / "k8s" / "h33-inference.yaml"
# the oldest release with every API the manifest uses still served, and the newest bundled one
KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.utils.latest_version())
# volume types Pod Security "restricted" allows
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}

DOCS = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def _one(kind: str) -> dict:
    (doc,) = [d for d in DOCS if d["kind"] == kind]
    return doc


DEPLOYMENT = _one("Deployment")
POD = DEPLOYMENT["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
ENV = {e["name"]: e["value"] for e in CONTAINER["env"]}


def _project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _request_timeout_default() -> float:
    """The default of ``H33_REQUEST_TIMEOUT_S`` in runners/service.py: ``os.environ.get(name, default)``."""
    tree = ast.parse((REPO / "runners" / "service.py").read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and [a.value for a in node.args[:1] if isinstance(a, ast.Constant)] == ["H33_REQUEST_TIMEOUT_S"]):
            return float(ast.literal_eval(node.args[1]))
    raise AssertionError("runners/service.py no longer reads H33_REQUEST_TIMEOUT_S with a default")


def _cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("doc", DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_document_validates_against_the_kubernetes_schema(doc, version):
    kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields fail too


def test_the_schema_check_rejects_a_misspelt_field():
    broken = yaml.safe_load(yaml.safe_dump(DEPLOYMENT))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 960
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_an_hpa_owns_the_replicas_and_a_pdb_limits_evictions():
    hpa, pdb = _one("HorizontalPodAutoscaler"), _one("PodDisruptionBudget")
    assert hpa["apiVersion"] == "autoscaling/v2" and pdb["apiVersion"] == "policy/v1"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", DEPLOYMENT["metadata"]["name"])
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"] == ["cpu"]
    assert "replicas" not in DEPLOYMENT["spec"]  # `kubectl apply` would undo the HPA's scaling
    # the PDB must still allow one eviction at the HPA's minimum, and select the Deployment's pods
    assert hpa["spec"]["minReplicas"] >= 2 and pdb["spec"]["maxUnavailable"] == 1
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert CONTAINER["resources"]["requests"]["cpu"]  # Utilization is relative to the request


def test_pod_security_restricted():
    for container in POD["containers"] + POD.get("initContainers", []):
        ctx = {**POD.get("securityContext", {}), **container["securityContext"]}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert not container["securityContext"]["capabilities"].get("add")
        assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0
        assert ctx["seccompProfile"]["type"] == "RuntimeDefault"
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert not container["securityContext"].get("privileged")
    for volume in POD["volumes"]:
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume


def test_what_the_service_writes_lies_on_writable_volumes():
    """With a read-only root, the key store and the temporary directory must be mounted volumes."""
    writable = {m["mountPath"] for m in CONTAINER["volumeMounts"] if not m.get("readOnly")}
    assert ENV["H33_KEY_STORE"] in writable
    assert ENV["TMPDIR"] in writable


def test_the_image_is_pinned_to_the_project_version():
    version = _project_version()
    assert CONTAINER["image"].rsplit(":", 1)[1] == version
    # the Bento ships the wheel of the same version
    wheels = yaml.safe_load((REPO / "bentos" / "bentofile.yaml").read_text())["python"]["wheels"]
    assert [w for w in wheels if Path(w).name.startswith(f"h33_bento-{version}-")]


def test_openmp_threads_match_the_cpu_request():
    """No CPU limit means no cgroup quota for h33_bento._omp to size from: the manifest must say it."""
    cpus = _cpus(CONTAINER["resources"]["requests"]["cpu"])
    assert cpus == int(cpus) and int(ENV["OMP_NUM_THREADS"]) == cpus
    assert ENV["OMP_WAIT_POLICY"] == "PASSIVE"


def test_grace_period_and_proxy_timeouts_outlast_the_longest_request():
    timeout = float(ENV.get("H33_REQUEST_TIMEOUT_S", _request_timeout_default()))
    pre_stop = CONTAINER.get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    delay = int(command[1]) if command[:1] == ["sleep"] else pre_stop.get("sleep", {}).get("seconds", 0)
    # SIGTERM comes after preStop, and an admitted request may then still run `timeout` seconds
    assert POD["terminationGracePeriodSeconds"] > delay + timeout
    annotations = _one("Ingress")["metadata"]["annotations"]
    for name in ("proxy-read-timeout", "proxy-send-timeout"):
        assert float(annotations[f"nginx.ingress.kubernetes.io/{name}"]) > timeout, name


def _service_options() -> dict:
    """The literal arguments of ``@bentoml.service`` in runners/service.py (name, resources, ...)."""
    tree = ast.parse((REPO / "runners" / "service.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "service":
            options = {}
            for kw in node.keywords:
                try:
                    options[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:  # computed, e.g. traffic={"timeout": REQUEST_TIMEOUT_S}
                    pass
            return options
    raise AssertionError("runners/service.py has no @bentoml.service")


def test_the_bentocloud_config_pins_the_same_bento_and_threads():
    config = yaml.safe_load((REPO / "bentos" / "bentocloud.yaml").read_text())
    options = _service_options()
    assert config["bento"] == f"h33-inference:{_project_version()}"
    envs = {e["name"]: e["value"] for e in config["envs"]}
    # BentoCloud sizes the instance from the service's resources
    assert int(envs["OMP_NUM_THREADS"]) == _cpus(options["resources"]["cpu"])
    assert list(config["services"]) == [options["name"]]
