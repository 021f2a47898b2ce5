"""The Kubernetes manifests, offline: `kubectl kustomize` renders each overlay, every object
passes the Kubernetes schema (kubernetes-validate, strict), and the pieces fit together: the
gateway's DNS entries name the headless Services, every container gets the cluster secret, the
worker and gateway flags are ones pdserve accepts, the GPU overlay asks for GPUs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from gateway.discovery import parse_entry
from pdserve.cli import build_parser

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
SECRET_ENV = "PDSERVE_CLUSTER_SECRET"

if shutil.which("kubectl") is None:
    pytest.skip("kubectl (with its built-in kustomize) is not installed", allow_module_level=True)


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def objects(request):
    return request.param, render(request.param)


def by_kind(objs, kind):
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_every_object_passes_the_schema(objects):
    _, objs = objects
    kinds = {o["kind"] for o in objs}
    assert kinds == {
        "Secret", "Service", "Deployment", "PodDisruptionBudget", "HorizontalPodAutoscaler"
    }  # fmt: skip
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _args(container) -> list[str]:
    env = {e["name"]: e.get("value", "10.0.0.7") for e in container.get("env", [])}
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in container["args"]]


def test_pools_are_headless_probed_budgeted_and_autoscaled(objects):
    overlay, objs = objects
    services, deployments = by_kind(objs, "Service"), by_kind(objs, "Deployment")
    pdbs, hpas = by_kind(objs, "PodDisruptionBudget"), by_kind(objs, "HorizontalPodAutoscaler")
    assert set(pdbs) == set(deployments) == {"pdserve-prefill", "pdserve-decode", "pdserve-gateway"}
    gateway = deployments["pdserve-gateway"]["spec"]["template"]["spec"]["containers"][0]
    entries = [parse_entry(a.split("=", 1)[1]) for a in _args(gateway) if a.startswith(("--prefill=", "--decode="))]  # fmt: skip
    assert len(entries) == 2
    for entry in entries:
        assert entry.dns
        service = services[entry.host]
        assert service["spec"]["clusterIP"] == "None"
        assert entry.port in [p["port"] for p in service["spec"]["ports"]]
        pool = deployments[entry.host]
        assert service["spec"]["selector"].items() <= pool["spec"]["template"]["metadata"]["labels"].items()  # fmt: skip
        worker = pool["spec"]["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert worker[probe]["grpc"]["port"] == entry.port
        hpa = hpas[entry.host]["spec"]
        assert hpa["scaleTargetRef"]["name"] == entry.host
        assert hpa["metrics"][0]["external"]["metric"]["name"] == "pdserve_worker_queue_depth"
        gpus = worker["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpus == "1") == (overlay == "gpu")
        assert f"--device={'cuda' if overlay == 'gpu' else 'cpu'}" in worker["args"]


def test_every_container_reads_the_cluster_secret_and_its_flags_parse(objects):
    _, objs = objects
    (secret,) = by_kind(objs, "Secret").values()
    for deployment in by_kind(objs, "Deployment").values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]}  # fmt: skip
            assert refs[SECRET_ENV] == {"name": secret["metadata"]["name"], "key": SECRET_ENV}
            assert container["command"] == ["pdserve"]
            argv = _args(container)
            build_parser(argv).parse_args(argv)  # exits (fails the test) on an unknown flag
