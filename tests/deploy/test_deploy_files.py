"""The deploy files (compose, Kubernetes, systemd) parse, hang together, and use only commands,
flags and environment variables that pf-metering really has: a renamed flag or setting must
break this test, not a deployment."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from typing import Any

import click
import pytest
import typer
import yaml

from common.settings import Settings, load_settings
from pf_metering.cli import build_app
from tests.support import REPO

DEPLOY = REPO / "deploy"
SETTINGS_VARS = frozenset(name.upper() for name in Settings.model_fields)
BINARY = "pf-metering"
# The long-running and nightly parts every deployment must run.
ROLES = {("consume",), ("webhooks", "serve"), ("bill",)}
# ... and in embedded mode (one shared data folder) the usage-alert watcher too.
EMBEDDED_ROLES = ROLES | {("alerts", "watch")}


def check_invocation(args: list[str]) -> tuple[str, ...]:
    """Parse ``pf-metering ARGS`` with the CLI's own click parser (nothing runs); returns the
    command path. Unknown commands or flags, missing arguments and bad values raise."""
    command: click.Command = typer.main.get_command(build_app())
    rest = list(args)
    path: list[str] = []
    while isinstance(command, click.Group):
        if rest == ["--help"]:
            return tuple(path)
        if not rest:
            raise click.UsageError(f"no command in {args}")
        name = rest.pop(0)
        sub = command.get_command(click.Context(command), name)
        if sub is None:
            raise click.UsageError(f"no such command {name!r} in {args}")
        path.append(name)
        command = sub
    if rest[-1:] == ["--help"]:
        rest.pop()
    command.make_context(" ".join([BINARY, *path]), rest)
    return tuple(path)


def test_the_checker_rejects_what_does_not_exist() -> None:
    assert check_invocation(["consume", "--drain", "--metrics-port", "9108"]) == ("consume",)
    assert check_invocation(["webhooks", "serve", "--port", "80"]) == ("webhooks", "serve")
    for bad in (
        ["consume", "--metrics-file", "x.prom"],
        ["bil"],
        ["consume", "--metrics-port", "not-a-port"],
        ["usage", "acme-corp"],
        ["webhooks"],
    ):
        with pytest.raises(click.UsageError):
            check_invocation(bad)


# --- docker compose ---------------------------------------------------------------------


def _compose(name: str = "docker-compose.yml") -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / name).read_text())
    assert isinstance(data, dict)
    return data


def _pf_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc for name, svc in compose["services"].items() if svc.get("entrypoint") == [BINARY]
    }


def test_compose_runs_kafka_two_workers_webhooks_and_the_nightly_job() -> None:
    compose = _compose()
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert kafka["environment"]["CLUSTER_ID"]
    pf = _pf_services(compose)
    roles = [check_invocation(svc["command"]) for svc in pf.values()]
    assert roles.count(("consume",)) == 2
    assert set(roles) >= EMBEDDED_ROLES
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith((".", "/")) or source in compose["volumes"], volume
    worker_ports = [
        p for svc in pf.values() if svc["command"][0] == "consume" for p in svc["ports"]
    ]
    assert len({p.rsplit(":", 1)[0] for p in worker_ports}) == len(worker_ports)


def test_compose_sets_only_real_settings() -> None:
    for name, svc in _pf_services(_compose()).items():
        unknown = set(svc["environment"]) - SETTINGS_VARS
        assert not unknown, f"{name}: {unknown} are not pf-metering settings"
        assert svc["environment"]["METERING_DATA_DIR"] == "/data"
        assert "pf-data:/data" in svc["volumes"], f"{name} must share the data volume"


# --- Kubernetes -------------------------------------------------------------------------


def _k8s(folder: str = "k8s") -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((DEPLOY / folder).glob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d is not None)
    return docs


def _named(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "Deployment":
        return dict(doc["spec"]["template"]["spec"])
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return None


def _containers(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for doc in docs:
        spec = _pod_spec(doc)
        for container in spec["containers"] if spec else []:
            yield spec or {}, container


def test_k8s_manifests_hang_together() -> None:
    docs = _k8s()
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    config_maps = _named(docs, "ConfigMap")
    claims = _named(docs, "PersistentVolumeClaim")
    deployments = _named(docs, "Deployment")
    roles = set()
    for spec, container in _containers(docs):
        assert container["command"] == [BINARY]
        roles.add(check_invocation(container["args"]))
        for source in container.get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps
        for volume in spec.get("volumes", []):
            assert volume["persistentVolumeClaim"]["claimName"] in claims
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in spec.get("volumes", [])}
    assert roles == EMBEDDED_ROLES
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in _named(docs, "Service").values():
        selector = service["spec"]["selector"].items()
        backends = [
            d
            for d in deployments.values()
            if selector <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert backends, f"service {service['metadata']['name']} selects no pods"
        ports = {p["name"] for _, c in _containers(backends) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    assert {"worker", "bill", "webhooks", "alerts"} <= {c["name"] for _, c in _containers(docs)}
    assert any(d["kind"] == "CronJob" for d in docs)


def test_k8s_sets_only_real_settings() -> None:
    docs = _k8s()
    for name, config_map in _named(docs, "ConfigMap").items():
        unknown = set(config_map["data"]) - SETTINGS_VARS
        assert not unknown, f"ConfigMap {name}: {unknown} are not pf-metering settings"
    secrets = set()
    for _, container in _containers(docs):
        for var in container.get("env", []):
            assert var["name"] in SETTINGS_VARS, var["name"]
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secrets.add(ref["name"])
    assert {"pf-metering-stripe", "pf-metering-alerts"} <= secrets  # never the ConfigMap
    assert not {"STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "METERING_ALERT_SECRET"} & {
        k for cm in _named(docs, "ConfigMap").values() for k in cm["data"]
    }


# --- systemd ----------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file: section -> (key, value) pairs in order (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None and "=" in line and not line.endswith("\\"), raw
        key, value = line.split("=", 1)
        sections[current].append((key.strip(), value.strip()))
    return sections


def _units() -> dict[str, dict[str, list[tuple[str, str]]]]:
    folder = DEPLOY / "systemd"
    return {
        p.name: parse_unit(p.read_text())
        for p in sorted(folder.iterdir())
        if p.suffix in (".service", ".timer")
    }


def _values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def test_systemd_units_run_real_commands() -> None:
    units = _units()
    roles = set()
    for name, unit in units.items():
        assert _values(unit["Unit"], "Description"), name
        if name.endswith(".service"):
            (exec_start,) = _values(unit["Service"], "ExecStart")
            argv = shlex.split(exec_start.replace("%i", "1"))
            assert argv[0].endswith("/" + BINARY), exec_start
            roles.add(check_invocation(argv[1:]))
    assert roles == EMBEDDED_ROLES
    worker = units["pf-metering-worker@.service"]
    assert _values(worker["Install"], "WantedBy") == ["multi-user.target"]
    timer = units["pf-metering-bill.timer"]
    (target,) = _values(timer["Timer"], "Unit")
    assert target in units and check_invocation(
        shlex.split(_values(units[target]["Service"], "ExecStart")[0])[1:]
    ) == ("bill",)
    assert _values(units[target]["Service"], "Type") == ["oneshot"]
    assert _values(timer["Timer"], "OnCalendar") and _values(timer["Timer"], "Persistent") == [
        "true"
    ]
    assert _values(timer["Install"], "WantedBy") == ["timers.target"]


def test_systemd_environment_is_real_settings() -> None:
    shipped = DEPLOY / "systemd" / "pf-metering.env"
    keys = [
        line.split("=", 1)[0]
        for line in shipped.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert keys and set(keys) <= SETTINGS_VARS, set(keys) - SETTINGS_VARS
    assert not {"STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "METERING_ALERT_SECRET"} & set(keys)
    for name, unit in _units().items():
        if not name.endswith(".service"):
            continue
        files = [f.lstrip("-") for f in _values(unit["Service"], "EnvironmentFile")]
        assert f"/etc/pf-metering/{shipped.name}" in files, name
        for assignment in _values(unit["Service"], "Environment"):
            for pair in shlex.split(assignment):
                assert pair.split("=", 1)[0] in SETTINGS_VARS, pair


# --- cluster mode: compose and Kubernetes without a shared volume ------------------------

_SUBSTITUTION = re.compile(r"\$\{([A-Z_]+)(?::?-([^}]*))?\}")


def _as_settings(env: dict[str, str]) -> Settings:
    """``env`` (compose's ``${VAR:-default}`` taken as its default) read by the real settings:
    a bad value fails here as it would at start."""
    values = {
        k.lower(): _SUBSTITUTION.sub(lambda m: m.group(2) or "x", str(v)) for k, v in env.items()
    }
    return load_settings(**values)


def test_cluster_compose_runs_three_brokers_postgres_minio_and_shares_no_volume() -> None:
    compose = _compose("docker-compose.cluster.yml")
    services = compose["services"]
    brokers = [s for s in services.values() if "KAFKA_PROCESS_ROLES" in s.get("environment", {})]
    assert len(brokers) == 3
    for broker in brokers:
        env = broker["environment"]
        assert len(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == 3
        assert (
            env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == 3 and env["KAFKA_MIN_INSYNC_REPLICAS"] == 2
        )
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 3
    pf = _pf_services(compose)
    roles = [check_invocation(svc["command"]) for svc in pf.values()]
    assert roles.count(("consume",)) == 3 and set(roles) >= ROLES
    assert check_invocation(["lake", "maintain"]) == ("lake", "maintain")
    for name, svc in pf.items():
        assert "volumes" not in svc, f"{name} must share no volume: caches go to its tmpfs"
        assert svc["environment"]["METERING_DATA_DIR"] in svc["tmpfs"]
        unknown = set(svc["environment"]) - SETTINGS_VARS
        assert not unknown, f"{name}: {unknown} are not pf-metering settings"
        settings = _as_settings(svc["environment"])
        assert settings.cluster_mode and str(settings.metering_lake_path).startswith("s3://")
        host = settings.catalog_shown().split("@", 1)[1].split(":", 1)[0]
        assert host in services and services[host]["image"].startswith("postgres:15")
        assert settings.metering_s3_endpoint == "http://minio:9000" and "minio" in services
        assert "${" in svc["environment"]["METERING_CATALOG"]  # the password is never literal
        assert "${" in svc["environment"]["AWS_SECRET_ACCESS_KEY"]
        for dep in svc["depends_on"]:
            assert dep in services


def test_cluster_k8s_has_no_shared_volume_and_only_real_settings() -> None:
    docs = _k8s("k8s-cluster")
    kustomization = yaml.safe_load((DEPLOY / "k8s-cluster" / "kustomization.yaml").read_text())
    files = {p.name for p in (DEPLOY / "k8s-cluster").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert not _named(docs, "PersistentVolumeClaim")
    for stateful in _named(docs, "StatefulSet").values():
        for claim in stateful["spec"].get("volumeClaimTemplates", []):
            assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (config,) = _named(docs, "ConfigMap").values()
    assert set(config["data"]) <= SETTINGS_VARS, set(config["data"]) - SETTINGS_VARS
    assert "METERING_CATALOG" not in config["data"]
    roles = set()
    for spec, container in _containers(docs):
        assert container["command"] == [BINARY]
        roles.add(check_invocation(container["args"]))
        assert all("emptyDir" in v for v in spec["volumes"]), "pods keep only caches"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert config["data"]["METERING_DATA_DIR"] in mounts
        env = {var["name"]: var for var in container.get("env", [])}
        assert set(env) <= SETTINGS_VARS, set(env) - SETTINGS_VARS
        for secret in ("METERING_CATALOG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[secret]["valueFrom"]["secretKeyRef"]["key"] == secret
        given = {"METERING_CATALOG": "postgresql://pfmeter:pw@pf-postgres:5432/metering"}
        settings = _as_settings({**config["data"], **given})
        assert settings.cluster_mode and str(settings.metering_lake_path).startswith("s3://")
    assert roles == ROLES
    services = _named(docs, "Service")
    assert "pf-postgres" in services and "pf-minio" in services
    assert config["data"]["METERING_S3_ENDPOINT"] == "http://pf-minio:9000"
