"""The image, compose file and Kubernetes manifests: they parse, agree with each other and with the service.

No container engine runs here, so what can be checked is checked: YAML, `docker compose config`,
`kubectl kustomize`, shellcheck, the names of probes, ports and variables, and the entrypoint run for
real outside a container.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.settings import PROJECT_ROOT
from tests.servers import free_port

K8S_DIR = PROJECT_ROOT / "deploy" / "k8s"
COMPOSE = PROJECT_ROOT / "compose.yaml"
ENTRYPOINT = PROJECT_ROOT / "deploy" / "entrypoint.sh"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
ECARD_SERVICES = ("migrate", "ecard", "drain")
PORT = 8000


def _manifests() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        documents.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return documents


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in _manifests() if doc["kind"] == kind]


def _variables_read() -> set[str]:
    """Every variable the service, its entrypoint or prometheus-client reads."""
    settings = (PROJECT_ROOT / "app" / "settings.py").read_text()
    # Every reader there is a private helper called with the variable's name: _env, _env_int, _networks…
    read = set(re.findall(r"""\b_[a-z_]+\("([A-Z][A-Z0-9_]+)\"""", settings))
    read |= set(re.findall(r"\$\{([A-Z0-9_]+)", ENTRYPOINT.read_text()))
    return read | {"PROMETHEUS_MULTIPROC_DIR"}


def _containers() -> list[dict[str, Any]]:
    found = []
    for doc in _by_kind("Deployment") + _by_kind("Job"):
        found.extend(doc["spec"]["template"]["spec"]["containers"])
    return found


def test_every_yaml_file_parses_and_kustomize_names_them_all() -> None:
    kinds = {doc["kind"] for doc in _manifests()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Job"} <= kinds
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {path.name for path in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(_compose()["services"]) == {*ECARD_SERVICES, "redis", "postgres"}
    kubectl = shutil.which("kubectl")
    if kubectl:
        built = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60)
        assert built.returncode == 0, built.stderr
        assert len([doc for doc in yaml.safe_load_all(built.stdout) if doc]) == len(listed)


def test_docker_compose_config_accepts_the_file() -> None:
    commands = [["docker", "compose"], ["docker-compose"]]
    for command in commands:
        if not shutil.which(command[0]):
            continue
        probe = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            continue
        env = {**os.environ, "ECARD_DB_PASSWORD": "example"}
        checked = subprocess.run(
            [*command, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=60, env=env
        )
        assert checked.returncode == 0, checked.stderr
        config = yaml.safe_load(checked.stdout)
        assert config["services"]["ecard"]["environment"]["ECARD_MODE"] == "production"
        return
    pytest.skip("neither `docker compose` nor `docker-compose` is installed")


def test_probes_users_and_ports_agree() -> None:
    deployment = next(doc for doc in _by_kind("Deployment") if doc["metadata"]["name"] == "ecard")
    pod = deployment["spec"]["template"]["spec"]
    (api,) = pod["containers"]
    assert api["livenessProbe"]["httpGet"]["path"] == "/health"
    assert api["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert api["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert [port["containerPort"] for port in api["ports"]] == [PORT]
    (service,) = _by_kind("Service")
    assert service["spec"]["ports"][0]["port"] == PORT and service["spec"]["ports"][0]["targetPort"] == "http"
    mounts = {mount["mountPath"] for mount in api["volumeMounts"]}
    config = _by_kind("ConfigMap")[0]["data"]
    assert {"/app/var", config["PROMETHEUS_MULTIPROC_DIR"]} <= mounts and config["PORT"] == str(PORT)
    for doc in _by_kind("Deployment") + _by_kind("Job"):
        spec = doc["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        for container in spec["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
    hpa = _by_kind("HorizontalPodAutoscaler")[0]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "ecard" and hpa["metrics"][0]["resource"]["name"] == "cpu"
    compose = _compose()["services"]
    assert "/ready" in " ".join(compose["ecard"]["healthcheck"]["test"])
    assert compose["ecard"]["ports"] == [f"{PORT}:{PORT}"]
    redis = " ".join(compose["redis"]["command"])
    assert all(
        part in redis for part in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction")
    )
    dockerfile = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[1:]
    assert len(stages) == 2 and stages[1].startswith("python:3.11-slim AS runtime")
    runtime = stages[1]
    assert f"EXPOSE {PORT}" in runtime and "/health" in runtime and "USER 10001" in runtime
    assert "build-essential" not in runtime and "apt-get" not in runtime
    assert 'ENTRYPOINT ["/app/deploy/entrypoint.sh"]' in runtime


def test_every_variable_set_is_one_the_service_reads() -> None:
    read = _variables_read()
    assert {"DATABASE_URL", "REDIS_URL", "ECARD_KEYS_DIR", "ECARD_MODE", "WEB_CONCURRENCY", "PORT"} <= read
    set_here: dict[str, set[str]] = {}
    for key in _by_kind("ConfigMap")[0]["data"]:
        set_here.setdefault(key, set()).add("configmap.yaml")
    for container in _containers():
        for variable in container.get("env", []):
            set_here.setdefault(variable["name"], set()).add(container["name"])
    for name in ECARD_SERVICES:
        for key in _compose()["services"][name].get("environment", {}):
            set_here.setdefault(key, set()).add(f"compose {name}")
    runtime = DOCKERFILE.read_text().split("AS runtime", 1)[1]
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", runtime, flags=re.MULTILINE):
        for key in re.findall(r"([A-Z_][A-Z0-9_]*)=", block):
            if key not in ("PATH", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"):
                set_here.setdefault(key, set()).add("Dockerfile")
    assert {"ECARD_MODE", "ECARD_KEYS_DIR", "PORT"} <= {key for key, where in set_here.items() if "Dockerfile" in where}
    unknown = {name: where for name, where in set_here.items() if name not in read}
    assert unknown == {}, unknown


def test_entrypoint_runs_the_makefile_serve_command() -> None:
    """The Makefile's `serve` line and the entrypoint's ECARD_UVICORN_FLAGS must name the same flags."""
    makefile = (PROJECT_ROOT / "Makefile").read_text()
    make_flags = re.search(r"--workers \$\(WORKERS\) (.+)$", makefile, flags=re.MULTILINE)
    assert make_flags is not None
    env = {"PATH": os.environ["PATH"], "ECARD_MIGRATE": "1", "WEB_CONCURRENCY": "3", "PORT": "8123"}
    check = subprocess.run([str(ENTRYPOINT), "check"], capture_output=True, text=True, timeout=30, env=env)
    assert check.returncode == 0, check.stderr
    migrate, serve = check.stdout.splitlines()
    assert migrate == "litestar --app app.asgi:create_app ecard db upgrade"
    words = shlex.split(serve)
    assert words[:3] == ["uvicorn", "--factory", "app.asgi:create_app"]
    assert words[words.index("--port") + 1] == "8123" and words[words.index("--workers") + 1] == "3"
    assert " ".join(words[words.index("--workers") + 2 :]) == make_flags.group(1).strip()
    wrong = subprocess.run([str(ENTRYPOINT), "bogus"], capture_output=True, text=True, timeout=30, env=env)
    assert wrong.returncode == 2 and "usage" in wrong.stderr


def test_entrypoint_passes_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    checked = subprocess.run([shellcheck, str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout


@pytest.fixture
def entrypoint_server(tmp_path: Path) -> Iterator[str]:
    """The entrypoint serving for real on embedded defaults: SQLite in a temp dir, no Redis, one worker."""
    port = free_port()
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "stale.db").write_bytes(b"left by the previous start")
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(PROJECT_ROOT),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "ECARD_MIGRATE": "1",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'ecard.sqlite3'}",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    process = subprocess.Popen([str(ENTRYPOINT), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the entrypoint did not serve /health within 60 s"
            time.sleep(0.2)
        assert not (metrics_dir / "stale.db").exists()
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_entrypoint_migrates_and_serves_outside_a_container(entrypoint_server: str) -> None:
    assert httpx.get(f"{entrypoint_server}/health", timeout=5).json() == {"status": "ok"}
    # Migrated (else the lifespan could not load the directory) and reachable; a fresh database has no
    # region yet, so no issuer key: that, and only that, keeps it out of a load balancer.
    ready = httpx.get(f"{entrypoint_server}/ready", timeout=5)
    assert ready.status_code == 503, ready.text
    assert ready.json()["missing"] == ["issuer_keys"]
