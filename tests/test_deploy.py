"""deploy/, checked offline: Docker, Kubernetes and the network are not available to the suite.

What this proves: every YAML file parses. The compose file and the Kubernetes manifests start nothing but
`python -m services.<name>` of the five services (and nats-server), with flags that the service's own
argparse defines. Every AUTORESEARCH_* variable (compose, manifests, Dockerfile) names a real setting of
shared/config.py, and each service's environment, with the ConfigMap's autoresearch.toml on Kubernetes,
loads with load_config; the settings that the services must share agree. Executors reserve GPUs (as many
as --slots on Kubernetes); the ledger's data dir is on a volume, its token comes from the environment or
a Secret, and without a token its configuration is refused. The NATS configs pass `nats-server -t`, which
parses them and refuses unknown fields, but neither creates the store nor resolves the route hosts; the
cluster nodes' names, routes and ports are checked against each other and the compose services, and the
single node is started on loopback (its store moved to tmp_path) to show that JetStream comes up.

What it cannot prove: that the image builds, that docker compose, kubectl or helm accept these files
(their schemas are not checked, only the fields this project depends on), that the three nodes form a
cluster under these host names (the fault suite, tests/test_faults.py, runs deploy/nats-cluster on
loopback), that GPUs reach the containers, or that the executor's sandbox works under a container runtime.
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
import shlex
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from shared.config import ENV_PREFIX, Config, ConfigError, load_config
from shared.nats_server import binary, free_port
from shared.stack import SERVICES

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s" / "autoresearch"
NODES = ["node1", "node2", "node3"]
OPERATOR_ENV = {"AUTORESEARCH_LEDGER_HTTP_TOKEN": "token-from-dot-env"}
"""What the operator's deploy/.env gives compose."""
NOT_SETTINGS = {
    "AUTORESEARCH_CONFIG",  # the file itself (shared/config.py)
    "AUTORESEARCH_DATA",  # corpora, prepared data and run workspaces (shared/target/data.py)
    "AUTORESEARCH_LOG_LEVEL",  # shared/service.py
}
SHARED = [lambda c: c.nats, lambda c: c.stack.target, lambda c: (c.executor.ack_wait_s, c.executor.max_deliver)]
"""What every service must agree on: each one sets the stream and the work queue up with its own values."""


# -- helpers ---------------------------------------------------------------------------------------------

def unknown_settings(names) -> list[str]:
    """AUTORESEARCH_* names that are no setting. load_config refuses an unknown key of a known section, but
    ignores a name whose section does not exist (AUTORESEARCH_LEGDER_...), so the name is checked here."""
    unknown = []
    for name in names:
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        section, _, key = name.removeprefix(ENV_PREFIX).lower().partition("_")
        struct = getattr(Config(), section, None) if section in Config.__struct_fields__ else None
        if struct is None or key not in struct.__struct_fields__:
            unknown.append(name)
    return unknown


def service_parser(name: str) -> argparse.ArgumentParser:
    """The service's command line as its main.py defines it, rebuilt from the source (importing it would
    import torch, seconds). A main.py without add_argument parses no argv at all: it takes no flags."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}", add_help=False, exit_on_error=False)
    for call in ast.walk(ast.parse((REPO / "services" / name / "main.py").read_text())):
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument":
            options = {k.arg: {"int": int, "float": float, "str": str}[k.value.id] if k.arg == "type"
                       else ast.literal_eval(k.value) for k in call.keywords if k.arg in ("type", "action", "nargs")}
            parser.add_argument(*map(ast.literal_eval, call.args), **options)
    return parser


def check_command(argv: list[str]) -> str:
    """`python -m services.<name> [flags]` of a real service whose parser takes the flags; returns the name."""
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("services."), argv
    name = argv[2].removeprefix("services.")
    assert name in SERVICES, f"{argv[2]} is not one of the services {SERVICES}"
    assert f"from services.{name}.main import main" in (REPO / "services" / name / "__main__.py").read_text()
    try:
        service_parser(name).parse_args(argv[3:])
    except (argparse.ArgumentError, SystemExit) as error:  # unknown flags exit even with exit_on_error=False
        raise AssertionError(f"{shlex.join(argv)}: the service does not accept these arguments") from error
    return name


def interpolate(text: str, environ: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and ${VAR?error}."""
    def value(match: re.Match) -> str:
        name, operator, word = match.groups()
        if name in environ and (environ[name] or ":" not in (operator or "")):
            return environ[name]
        if operator and operator.endswith("?"):
            raise KeyError(f"compose requires {name}: {word}")
        return word or ""
    return re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", value, text)


def compose(environ: dict[str, str] = OPERATOR_ENV, text: str | None = None) -> dict:
    """The compose file as docker compose sees it: parsed, then its values interpolated."""
    def resolve(node):
        if isinstance(node, dict):
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        if isinstance(node, str):
            node = interpolate(node, environ)
            assert "$" not in node, f"{node!r}: a variable that interpolate() does not understand"
        return node
    return resolve(yaml.safe_load(text or (DEPLOY / "docker-compose.yml").read_text()))


def environment(service: dict) -> dict[str, str]:
    found = service.get("environment") or {}
    if isinstance(found, list):
        found = dict(item.split("=", 1) for item in found)
    return {name: "" if value is None else str(value) for name, value in found.items()}


@functools.cache
def manifests() -> list[tuple[str, dict]]:
    """(file, document) of every manifest; parsed once (the tests only read them)."""
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
            if doc and doc["kind"] != "Kustomization"]


def containers() -> list[tuple[dict, dict]]:
    """(pod spec, container) of every workload."""
    pods = [doc["spec"]["template"]["spec"] for _, doc in manifests() if doc["kind"] in ("Deployment", "StatefulSet")]
    return [(pod, container) for pod in pods for container in pod["containers"]]


def container_config(pod: dict, container: dict, tmp_path: Path, with_secrets: bool = True) -> Config:
    """The configuration the container's service loads: its env, secrets as placeholders, and the file that
    AUTORESEARCH_CONFIG names, taken from the ConfigMap volume mounted there."""
    env = {}
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = str(variable["value"])
        elif with_secrets:
            assert "secretKeyRef" in variable["valueFrom"], variable
            env[variable["name"]] = "token-from-secret"
    assert not unknown_settings(env), unknown_settings(env)
    path = Path(env["AUTORESEARCH_CONFIG"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_map = ("ConfigMap", volumes[mounts[str(path.parent)]]["configMap"]["name"])
    (data,) = [doc["data"] for _, doc in manifests() if (doc["kind"], doc["metadata"]["name"]) == config_map]
    local = tmp_path / path.name
    local.write_text(data[path.name])
    return load_config(local, environ=env)


def nats_conf(path: Path) -> dict:
    """The few fields the deployment depends on, read from the nats-server config text."""
    text = path.read_text()
    cluster = text[text.index("cluster {"):] if "cluster {" in text else ""
    return {"server_name": re.findall(r"^server_name:\s*(\S+)", text, re.M),
            "listen": re.findall(r"^listen:\s*(\S+)", text, re.M),
            "store_dir": re.findall(r"^\s*store_dir:\s*(\S+)", text, re.M),
            "cluster_name": re.findall(r"^\s*name:\s*(\S+)", cluster, re.M),
            "cluster_listen": re.findall(r"^\s*listen:\s*(\S+)", cluster, re.M),
            "routes": re.findall(r"nats://([\w.-]+:\d+)", cluster)}


# -- every file ------------------------------------------------------------------------------------------

def test_every_yaml_file_parses():
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 6
    for path in files:
        docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        assert docs and all(isinstance(doc, dict) for doc in docs), path


@pytest.mark.parametrize("name", ["AUTORESEARCH_LEGDER_HTTP_TOKEN", "AUTORESEARCH_LEDGER_HTTP_TOKN",
                                  "AUTORESEARCH_LEDGER_HTTPTOKEN", "AUTORESEARCH_LEDGER"])
def test_a_misspelt_variable_is_caught(name: str):
    text = (DEPLOY / "docker-compose.yml").read_text().replace("AUTORESEARCH_LEDGER_HTTP_TOKEN:", f"{name}:")
    assert unknown_settings(environment(compose(text=text)["services"]["ledger"])) == [name]


def test_an_unknown_flag_is_caught():
    assert check_command(["python", "-m", "services.executor", "--slots", "2"]) == "executor"
    for argv in (["python", "-m", "services.executor", "--gpus", "2"],  # no such flag
                 ["python", "-m", "services.executor", "--slots", "two"],  # not an int
                 ["python", "-m", "services.ledger", "--slots", "2"],  # the ledger takes no flags
                 ["python", "-m", "services.scheduler"]):  # no such service
        with pytest.raises(AssertionError):
            check_command(argv)


def test_the_dockerfile_installs_the_project_and_its_gpu_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "ARG GPU=0" in text and "'.[gpu]'" in text and "gpu" in extras  # CPU unless built with GPU=1
    copied = {part for line in re.findall(r"^COPY (.+)$", text, re.M) for part in line.split()}
    assert {"pyproject.toml", "shared", "services", "targets"} <= copied
    assert 'ENTRYPOINT ["tini", "--"]' in text  # the manifests give only args, so tini stays PID 1
    names = re.findall(r"\b(AUTORESEARCH_\w+)=", text)
    assert names and not unknown_settings(names)


# -- docker compose --------------------------------------------------------------------------------------

def test_compose_runs_nats_and_each_service_with_flags_it_accepts():
    services = compose()["services"]
    started = []
    for name, service in services.items():
        argv = shlex.split(service["command"]) if isinstance(service["command"], str) else service["command"]
        if argv[0] == "nats-server":
            assert name in NODES and argv[1:] == ["-c", "/etc/nats/node.conf"]
            assert f"./nats-cluster/{name}.conf:/etc/nats/node.conf:ro" in service["volumes"]
        else:
            started.append(check_command(argv))
    assert sorted(started) == sorted(SERVICES) and sorted(set(services) - set(started)) == NODES


def test_compose_environments_are_valid_configs_that_agree():
    services = compose()["services"]
    configs = {}
    for name in SERVICES:
        env = environment(services[name])
        assert not unknown_settings(env), f"{name}: {unknown_settings(env)}"
        configs[name] = load_config(REPO / "autoresearch.toml", environ=env)  # the image's /app/autoresearch.toml
        assert configs[name].nats.replicas == 3 and len(configs[name].nats.urls) == 3
    for shared in SHARED:
        assert len({repr(shared(config)) for config in configs.values()}) == 1
    assert [url.removeprefix("nats://").split(":")[0] for url in configs["ledger"].nats.urls] == NODES


def test_compose_ledger_listens_with_a_token_only_and_keeps_its_file_on_a_volume():
    file = compose()
    ledger = file["services"]["ledger"]
    config = load_config(REPO / "autoresearch.toml", environ=environment(ledger))
    assert config.ledger.http_host == "0.0.0.0"
    assert config.ledger.http_token == OPERATOR_ENV["AUTORESEARCH_LEDGER_HTTP_TOKEN"]
    assert f"{config.ledger.http_port}:{config.ledger.http_port}" in ledger["ports"]
    assert "/health" in " ".join(ledger["healthcheck"]["test"])  # the one endpoint open without the token
    named = {volume.split(":")[1]: volume.split(":")[0] for volume in ledger["volumes"]}
    assert named[str(config.data_dir)] in file["volumes"]
    without_token = compose({})["services"]["ledger"]
    with pytest.raises(ConfigError, match="token"):
        load_config(REPO / "autoresearch.toml", environ=environment(without_token))


def test_compose_executors_reserve_gpus():
    executor = compose()["services"]["executor"]
    devices = executor["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "DAC_READ_SEARCH" in executor["cap_add"]  # runs drop root for a per-slot uid keeping only that
    assert service_parser("executor").parse_args(shlex.split(executor["command"])[3:]).slots >= 1
    (data_root,) = re.findall(r"\bAUTORESEARCH_DATA=(\S+)", (DEPLOY / "Dockerfile").read_text())
    assert f"executor-cache:{data_root}" in executor["volumes"]  # prepared data outlives a restart


def test_compose_nats_nodes_keep_their_store_on_a_volume():
    file = compose()
    for name in NODES:
        store = nats_conf(DEPLOY / "nats-cluster" / f"{name}.conf")["store_dir"]
        named = {volume.split(":")[1]: volume.split(":")[0] for volume in file["services"][name]["volumes"]}
        assert named[store[0]] in file["volumes"], name


# -- NATS configs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("conf", ["nats-single.conf", *(f"nats-cluster/{node}.conf" for node in NODES)])
def test_nats_server_accepts_the_config(conf: str):
    result = subprocess.run([binary(), "-t", "-c", str(DEPLOY / conf)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_nats_server_t_refuses_a_wrong_field(tmp_path: Path):
    """-t is a real check: a misspelt field fails it."""
    conf = tmp_path / "bad.conf"
    conf.write_text((DEPLOY / "nats-single.conf").read_text().replace("store_dir:", "store_dir_:"))
    result = subprocess.run([binary(), "-t", "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "store_dir_" in result.stderr


def test_the_cluster_nodes_route_to_each_other():
    confs = {node: nats_conf(DEPLOY / "nats-cluster" / f"{node}.conf") for node in NODES}
    for node, conf in confs.items():
        assert conf["server_name"] == [node] and conf["listen"] == ["0.0.0.0:4222"]
        assert conf["cluster_listen"] == ["0.0.0.0:6222"] and conf["cluster_name"] == ["autoresearch"]
        assert sorted(conf["routes"]) == [f"{n}:6222" for n in NODES]
        assert len(conf["store_dir"]) == 1  # bench/faults.py moves the store by rewriting that one line


def test_the_single_node_starts_with_jetstream(tmp_path: Path):
    source = (DEPLOY / "nats-single.conf").read_text()
    (store,) = nats_conf(DEPLOY / "nats-single.conf")["store_dir"]
    conf = tmp_path / "single.conf"
    conf.write_text(source.replace(store, str(tmp_path / "store")))
    port = free_port()
    server = subprocess.Popen([binary(), "-c", str(conf), "-a", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
                    info = connection.recv(4096).decode()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "nats-server did not start"
                time.sleep(0.05)
        assert info.startswith("INFO ") and '"jetstream":true' in info and '"server_name":"single"' in info
    finally:
        server.terminate()
        server.wait(timeout=10)


# -- Kubernetes ------------------------------------------------------------------------------------------

def test_the_nats_chart_values_make_the_cluster_the_services_use(tmp_path: Path):
    values = yaml.safe_load((DEPLOY / "k8s" / "nats-values.yaml").read_text())
    assert values["config"]["cluster"]["enabled"] and values["config"]["jetstream"]["enabled"]
    assert values["config"]["jetstream"]["fileStore"]["pvc"]["size"]
    configs = [container_config(pod, container, tmp_path) for pod, container in containers()]
    assert {config.nats.replicas for config in configs} == {values["config"]["cluster"]["replicas"]}
    assert {tuple(config.nats.urls) for config in configs} == {(f"nats://{values['fullnameOverride']}:4222",)}


def test_k8s_manifests_run_each_service_with_flags_it_accepts():
    for file, doc in manifests():
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], file
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(path.name for path in K8S.glob("*.yaml") if path.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    started = []
    for _, container in containers():
        assert "command" not in container, "the image's ENTRYPOINT (tini) must stay: give args"
        started.append(check_command([str(arg) for arg in container["args"]]))
    assert sorted(started) == sorted(SERVICES)


def test_k8s_configs_are_valid_and_agree(tmp_path: Path):
    configs = [container_config(pod, container, tmp_path) for pod, container in containers()]
    for shared in SHARED:
        assert len({repr(shared(config)) for config in configs}) == 1


def test_k8s_singletons_never_run_twice():
    for _, doc in manifests():
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] != "executor":
            assert doc["spec"]["replicas"] == 1 and doc["spec"]["strategy"]["type"] == "Recreate", doc["metadata"]
        if doc["kind"] == "StatefulSet":
            assert doc["spec"]["replicas"] == 1


def test_k8s_ledger_has_its_volume_token_service_and_probe(tmp_path: Path):
    (ledger,) = [doc for _, doc in manifests() if doc["kind"] == "StatefulSet"]
    pod = ledger["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][2] == "services.ledger"
    config = container_config(pod, container, tmp_path)
    assert config.ledger.http_host == "0.0.0.0" and config.ledger.http_token
    with pytest.raises(ConfigError, match="token"):  # the Secret missing from the env: refused
        container_config(pod, container, tmp_path, with_secrets=False)
    (token,) = [v for v in container["env"] if v["name"] == "AUTORESEARCH_LEDGER_HTTP_TOKEN"]
    secret = token["valueFrom"]["secretKeyRef"]
    readme = (DEPLOY / "README.md").read_text()
    assert f"kubectl create secret generic {secret['name']} --from-literal={secret['key']}=" in readme
    claims = {claim["metadata"]["name"] for claim in ledger["spec"]["volumeClaimTemplates"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(config.data_dir)]
    assert mount["name"] in claims
    port = next(p for p in container["ports"] if p["containerPort"] == config.ledger.http_port)
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    (service,) = [doc for _, doc in manifests() if doc["kind"] == "Service"]
    assert service["spec"]["selector"].items() <= ledger["spec"]["template"]["metadata"]["labels"].items()
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(config.ledger.http_port, port["name"])]


def test_k8s_executors_request_as_many_gpus_as_slots():
    (executor,) = [doc for _, doc in manifests() if doc["metadata"]["name"] == "executor"]
    (container,) = executor["spec"]["template"]["spec"]["containers"]
    args = service_parser("executor").parse_args([str(arg) for arg in container["args"][3:]])
    assert args.slots >= 1 and container["resources"]["limits"]["nvidia.com/gpu"] == args.slots
    assert "DAC_READ_SEARCH" in container["securityContext"]["capabilities"]["add"]
    anti = executor["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
