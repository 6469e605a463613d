"""deploy/: every kustomize overlay builds, and what it renders is what STYLE.md's "Deployment" asks for.

Each overlay under deploy/kustomize/overlays is rendered once with ``kubectl kustomize`` (skipped when
kubectl is missing) and checked: native gRPC probes on each container's port, requests and limits,
non-root with a read-only root filesystem (and a writable mount for every path the service writes), one
ServiceAccount per service, a Service on the default port, single replicas where state is on a
ReadWriteOnce volume, GPUs only where the gpu component puts them, network policies that let only the
orchestrator reach the inner services. Every TRAPLINE_* variable in the manifests and the Dockerfile must be
a field of that service's settings class, and the literal values must validate, so manifests cannot drift
from the code. Fast: one kubectl call per overlay, no cluster, no images.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from unittest import mock

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the dev extra: pip install -e '.[dev]'")

from pydantic import AliasChoices  # noqa: E402

from trapline.defaults import PORTS  # noqa: E402
from trapline.runtime.settings import ServiceSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
OVERLAYS = sorted(p.name for p in (KUSTOMIZE / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
SERVICES = tuple(PORTS)  # orchestrator, detector, embedder, selector, trainer
INNER = tuple(s for s in SERVICES if s != "orchestrator")
GPU_SERVICES = {"detector", "embedder", "trainer"}
KUBECTL = shutil.which("kubectl")

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (with its built-in kustomize) is not on PATH: cannot render the overlays"
)


# ---------------------------------------------------------------------------------------------- helpers

@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    assert KUBECTL is not None
    done = subprocess.run([KUBECTL, "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay} failed:\n{done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def components_of(overlay: str) -> set[str]:
    k = yaml.safe_load((KUSTOMIZE / "overlays" / overlay / "kustomization.yaml").read_text())
    return {PurePosixPath(c).name for c in k.get("components") or []}


def objects(docs, kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def deployment(docs, service: str) -> dict[str, Any]:
    deps = objects(docs, "Deployment")
    assert f"trapline-{service}" in deps, f"no Deployment trapline-{service}; have {sorted(deps)}"
    return deps[f"trapline-{service}"]


def container(dep: dict[str, Any]) -> dict[str, Any]:
    containers = dep["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{dep['metadata']['name']}: expected one container"
    return containers[0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env") or []}


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    selector = selector or {}
    assert not selector.get("matchExpressions"), "only matchLabels selectors are checked here"
    return all(labels.get(k) == v for k, v in (selector.get("matchLabels") or {}).items())


def under(path: str, mount: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(mount) or PurePosixPath(mount) in PurePosixPath(path).parents


@functools.cache
def settings_class(service: str) -> type[ServiceSettings]:
    mod = importlib.import_module(f"trapline.{service}.server")
    found = [v for v in vars(mod).values() if isinstance(v, type) and issubclass(v, ServiceSettings)
             and v is not ServiceSettings and v.__module__ == mod.__name__]
    assert len(found) == 1, f"trapline.{service}.server: expected one settings class, found {found}"
    return found[0]


def env_names(cls: type[ServiceSettings]) -> set[str]:
    """Every environment variable name pydantic-settings reads for ``cls`` (upper case)."""
    prefix = cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(c.upper() for c in alias.choices if isinstance(c, str))
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{name}".upper())
    return names


# ---------------------------------------------------------------------------------------------- overlays

def test_the_planned_overlays_exist():
    assert {"single-node", "gpu"} <= set(OVERLAYS)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_is_deployed_as_style_asks(overlay):
    docs = render(overlay)
    accounts = objects(docs, "ServiceAccount")
    services = objects(docs, "Service")
    used_accounts = []
    for svc in SERVICES:
        dep = deployment(docs, svc)
        pod = dep["spec"]["template"]["spec"]
        c = container(dep)
        where = f"{overlay}: {svc}"
        ports = [p["containerPort"] for p in c.get("ports") or []]
        assert ports == [PORTS[svc]], f"{where}: container ports {ports}, want [{PORTS[svc]}]"
        port = PORTS[svc]

        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c.get(probe, {}).get("grpc", {}).get("port") == port, \
                f"{where}: {probe} must be a native gRPC probe on {port}, got {c.get(probe)}"
        assert "service" not in c["livenessProbe"]["grpc"], f"{where}: probe the server's overall health"
        startup = c["startupProbe"]
        assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 120, \
            f"{where}: startupProbe should allow minutes for model loading"

        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(kind) or {}), f"{where}: resources.{kind}: cpu and memory"

        psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
        assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{where}: runAsNonRoot"
        assert (csc.get("runAsUser", psc.get("runAsUser")) or 0) != 0, f"{where}: runs as uid 0"
        assert csc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
        assert csc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation"

        sa = pod.get("serviceAccountName")
        assert sa == f"trapline-{svc}" and sa in accounts, f"{where}: own ServiceAccount, got {sa!r}"
        used_accounts.append(sa)

        grace = float(env_of(c).get(f"TRAPLINE_{svc.upper()}_GRACE_SECONDS", 10))
        assert pod.get("terminationGracePeriodSeconds", 30) > grace, \
            f"{where}: terminationGracePeriodSeconds must exceed GRACE_SECONDS ({grace})"

        service = services.get(f"trapline-{svc}")
        assert service is not None, f"{where}: no Service trapline-{svc}"
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selects({"matchLabels": service["spec"]["selector"]}, pod_labels), f"{where}: Service selector"
        sports = service["spec"]["ports"]
        assert [p["port"] for p in sports] == [port], f"{where}: Service ports {sports}"
        named = {p.get("name"): p["containerPort"] for p in c["ports"]}
        target = sports[0].get("targetPort", port)
        assert named.get(target, target) == port, f"{where}: Service targetPort {target!r} is not {port}"
    assert len(set(used_accounts)) == len(used_accounts), f"{overlay}: a ServiceAccount is shared"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_path_a_service_writes_is_a_writable_mount(overlay):
    """With a read-only root filesystem, DATA_DIR, /tmp and the stores must be volumes; shared stores must be
    the same claim at the same path in every service that passes their paths around."""
    docs = render(overlay)
    claims = objects(docs, "PersistentVolumeClaim")
    mounts: dict[str, dict[str, tuple[str, bool]]] = {}  # service -> mountPath -> (volume source, readOnly)
    for svc in SERVICES:
        dep = deployment(docs, svc)
        pod, c = dep["spec"]["template"]["spec"], container(dep)
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        mine = {}
        for m in c.get("volumeMounts") or []:
            assert m["name"] in volumes, f"{overlay}: {svc} mounts undefined volume {m['name']}"
            vol = volumes[m["name"]]
            if "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{overlay}: {svc} uses a missing PVC {claim}"
                source = f"pvc:{claim}"
            else:
                assert "emptyDir" in vol, f"{overlay}: {svc} volume {m['name']}: emptyDir or PVC expected"
                source = "emptyDir"
            mine[m["mountPath"]] = (source, bool(m.get("readOnly")))
        mounts[svc] = mine

        def writable(path: str) -> bool:
            return any(under(path, mp) and not ro for mp, (_, ro) in mine.items())

        env = env_of(c)
        prefix = f"TRAPLINE_{svc.upper()}_"
        data_dir = env.get(prefix + "DATA_DIR")
        assert data_dir and writable(data_dir), f"{overlay}: {svc} DATA_DIR {data_dir!r} not writable"
        assert writable("/tmp"), f"{overlay}: {svc} needs a writable /tmp"
        for var in ("MODEL_STORE", "CROP_STORE_URI"):
            if isinstance(env.get(prefix + var), str):
                assert writable(env[prefix + var]), f"{overlay}: {svc} {var} is not on a writable volume"
        if isinstance(env.get(prefix + "DATABASE_URL"), str):
            db = env[prefix + "DATABASE_URL"].removeprefix("sqlite:///")
            assert writable(str(PurePosixPath(db).parent)), f"{overlay}: {svc} database is not on a volume"

    def source(svc: str, path: str) -> str:
        hits = [src for mp, (src, _) in mounts[svc].items() if under(path, mp)]
        assert hits, f"{overlay}: {svc} has no volume at {path}"
        return hits[-1]

    orch = env_of(container(deployment(docs, "orchestrator")))
    trainer = env_of(container(deployment(docs, "trainer")))
    embedder = env_of(container(deployment(docs, "embedder")))
    # The trainer writes model versions where the embedder reads them.
    store = embedder["TRAPLINE_EMBEDDER_MODEL_STORE"]
    assert trainer["TRAPLINE_TRAINER_MODEL_STORE"] == store
    assert source("embedder", store) == source("trainer", store) != "emptyDir"
    # The trainer reads the orchestrator's crops by the paths the orchestrator hands it.
    crops = orch["TRAPLINE_ORCHESTRATOR_CROP_STORE_URI"]
    roots = [r.strip() for r in trainer["TRAPLINE_TRAINER_CROP_ROOTS"].split(",") if r.strip()]
    assert any(under(crops, r) for r in roots), f"{overlay}: crop store {crops} outside CROP_ROOTS {roots}"
    assert source("orchestrator", crops) == source("trainer", crops) != "emptyDir"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_state_on_a_read_write_once_volume_means_one_replica(overlay):
    docs = render(overlay)
    claims = objects(docs, "PersistentVolumeClaim")
    for svc in SERVICES:
        dep = deployment(docs, svc)
        pod = dep["spec"]["template"]["spec"]
        own = [v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes") or []
               if "persistentVolumeClaim" in v]
        rwo = [c for c in own if claims[c]["spec"]["accessModes"] == ["ReadWriteOnce"]
               and claims[c]["metadata"].get("labels", {}).get("app.kubernetes.io/name") == f"trapline-{svc}"]
        if rwo:
            assert dep["spec"].get("replicas", 1) == 1, f"{overlay}: {svc} keeps state on {rwo}: one replica"
            assert dep["spec"].get("strategy", {}).get("type") == "Recreate", \
                f"{overlay}: {svc} keeps state on {rwo}: Recreate, so two pods never open it at once"
    # SQLite never scales out, whatever the overlay.
    assert deployment(docs, "orchestrator")["spec"].get("replicas", 1) == 1


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_orchestrator_calls_the_other_services_by_their_service_names(overlay):
    docs = render(overlay)
    services = objects(docs, "Service")
    env = env_of(container(deployment(docs, "orchestrator")))
    for svc in INNER:
        address = env.get(f"TRAPLINE_ORCHESTRATOR_{svc.upper()}_ADDRESS")
        assert address == f"trapline-{svc}:{PORTS[svc]}", f"{overlay}: orchestrator -> {svc}: {address!r}"
        assert f"trapline-{svc}" in services


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_go_only_to_the_gpu_services_and_only_with_the_gpu_component(overlay):
    docs = render(overlay)
    want = GPU_SERVICES if "gpu" in components_of(overlay) else set()
    got = set()
    for svc in SERVICES:
        c = container(deployment(docs, svc))
        limits = (c.get("resources") or {}).get("limits") or {}
        if "nvidia.com/gpu" in limits:
            assert int(limits["nvidia.com/gpu"]) >= 1
            got.add(svc)
        device = env_of(c).get(f"TRAPLINE_{svc.upper()}_DEVICE")
        if svc in want and svc in ("detector", "embedder"):
            assert device == "cuda", f"{overlay}: {svc} has a GPU but DEVICE={device!r}"
        elif device is not None:
            assert device != "cuda", f"{overlay}: {svc} asks for CUDA without a GPU"
    assert got == want, f"{overlay}: nvidia.com/gpu on {sorted(got)}, want {sorted(want)}"


def test_the_gpu_overlay_uses_the_gpu_component():
    assert "gpu" in components_of("gpu")


@needs_kubectl
@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if "network-policy" in components_of(o)])
def test_network_policy_lets_only_the_orchestrator_reach_the_inner_services(overlay):
    docs = render(overlay)
    policies = [p for p in objects(docs, "NetworkPolicy").values()
                if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    pods = {svc: deployment(docs, svc)["spec"]["template"]["metadata"]["labels"] for svc in SERVICES}
    for svc, labels in pods.items():
        mine = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        assert mine, f"{overlay}: no ingress policy isolates {svc}"
        rules = [r for p in mine for r in p["spec"].get("ingress") or []]
        assert rules, f"{overlay}: nothing may reach {svc}"
        for r in rules:
            ports = r.get("ports") or []
            assert ports and all(p.get("port") in (PORTS[svc], "grpc") for p in ports), \
                f"{overlay}: {svc} opens ports other than its gRPC port: {r}"
        if svc == "orchestrator":
            assert any(not r.get("from") for r in rules), f"{overlay}: anyone may call the orchestrator"
            continue
        for r in rules:
            assert r.get("from"), f"{overlay}: {svc} is open to everyone: {r}"
            for peer in r["from"]:
                assert set(peer) == {"podSelector"}, f"{overlay}: {svc} admits {peer} (namespaces/IP blocks)"
                reached_by = {s for s, lab in pods.items() if selects(peer["podSelector"], lab)}
                assert reached_by == {"orchestrator"}, f"{overlay}: {svc} reachable from {sorted(reached_by)}"


@needs_kubectl
def test_some_overlay_has_network_policies():
    assert any("network-policy" in components_of(o) for o in OVERLAYS)
    assert any(d["kind"] == "NetworkPolicy" for o in OVERLAYS for d in render(o))


@needs_kubectl
def test_the_qdrant_server_component_makes_the_selector_remote():
    overlays = [o for o in OVERLAYS if "qdrant-server" in components_of(o)]
    assert overlays, "no overlay uses components/qdrant-server, so nothing renders it"
    for overlay in overlays:
        docs = render(overlay)
        env = env_of(container(deployment(docs, "selector")))
        assert env["TRAPLINE_SELECTOR_STORE"] == "remote"
        url = env["TRAPLINE_SELECTOR_QDRANT_URL"]
        assert isinstance(url, dict) and url["configMapKeyRef"]["name"] in objects(docs, "ConfigMap")
        assert "trapline-selector-data" not in objects(docs, "PersistentVolumeClaim")


# ---------------------------------------------------------------------------------------------- no drift

@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_trapline_variable_in_the_manifests_is_a_settings_field(overlay):
    for svc in SERVICES:
        cls = settings_class(svc)
        known = env_names(cls)
        env = env_of(container(deployment(render(overlay), svc)))
        ours = {k: v for k, v in env.items() if k.startswith("TRAPLINE_")}
        unknown = sorted(set(ours) - known)
        assert not unknown, f"{overlay}: {svc} sets {unknown}, which {cls.__name__} does not read"
        # ...and the literal values validate (valueFrom references get a stand-in).
        values = {k: (v if isinstance(v, str) else "http://stand-in:6333") for k, v in ours.items()}
        with mock.patch.dict(os.environ, values, clear=True):
            settings = cls()
        assert settings.port == PORTS[svc] and settings.host == "0.0.0.0"


def test_every_trapline_variable_in_the_dockerfile_is_a_settings_field():
    names = set(re.findall(r"\bTRAPLINE_[A-Z0-9_]+", (DEPLOY / "Dockerfile").read_text()))
    assert names, "the Dockerfile sets no TRAPLINE_* variables (HOST 0.0.0.0 is expected)"
    for name in sorted(names):
        svc = name.split("_")[1].lower()
        assert svc in SERVICES, f"Dockerfile: {name} names no service"
        assert name in env_names(settings_class(svc)), f"Dockerfile: {name} is not a {svc} setting"
    for svc in SERVICES:
        assert f"TRAPLINE_{svc.upper()}_HOST" in names, f"Dockerfile: {svc} must listen on 0.0.0.0"


def test_the_dockerfile_pins_torch_as_setup_does_and_knows_every_service():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    pins = re.compile(r"\b(torch(?:vision)?==[0-9][0-9.]*)")
    assert set(pins.findall(dockerfile)) == set(pins.findall(setup)) != set()
    for svc in SERVICES:
        assert re.search(rf"\b{svc}\b[|)]", dockerfile), f"Dockerfile's SERVICE check does not accept {svc}"
    assert "USER 10001" in dockerfile and 'pip install -e ".[${SERVICE}]"' in dockerfile
