"""There is no Docker engine here, so the images and compose file are checked statically."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_there_is_a_cpu_and_a_cuda_image() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_non_root_and_start_the_service(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    bases = [  # a base given as a build argument is pinned by the argument's default
        defaults.get(b[2:-1], b) if b.startswith("${") else b
        for b in re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    ]
    assert bases
    for base in bases:
        assert re.search(r":\d[\w.\-]*$", base), f"{base} is not pinned to a version"
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1] not in {"root", "0"}
    for source in re.findall(r"^COPY\s+(.+)\s+\S+$", text, flags=re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"{dockerfile.name} copies missing {path}"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"', text, flags=re.M)
    assert entry and entry.group(1) in scripts


def test_redis_is_healthy_persistent_and_private(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert "ports" not in redis  # only reachable inside the compose network
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    command = redis["command"]
    # An acknowledged write must be on disk: AOF on, fsynced before every reply.
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "always"
    volume = redis["volumes"][0].split(":")[0]
    assert volume in compose["volumes"]
    assert not redis["image"].endswith(":latest")


@pytest.mark.parametrize("name", ["api", "api-gpu"])
def test_the_api_waits_for_a_healthy_redis(compose: dict[str, Any], name: str) -> None:
    api = compose["services"][name]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["environment"]["VISREC_REDIS_URL"].startswith("redis://redis:")
    assert all(p.startswith("127.0.0.1:") for p in api["ports"])
    assert (ROOT / api["build"]["dockerfile"]).is_file()


def test_the_gpu_service_is_an_opt_in_profile(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["api-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "profiles" not in compose["services"]["api"]


def test_compose_without_keys_says_what_to_set(compose: dict[str, Any]) -> None:
    """`docker compose up` with no key must explain itself: the interpolation's error message
    names the variable's rule and a command that makes a key."""
    value = compose["services"]["api"]["environment"]["VISREC_API_KEYS"]
    match = re.fullmatch(r"\$\{VISREC_API_KEYS:\?(.+)\}", value)
    assert match, value
    message = match.group(1)
    assert "16+ characters" in message and "secrets.token_urlsafe" in message
    assert "$(" not in message.replace("$$(", "")  # a literal $ is $$ in compose files
    assert "}" not in message  # it would end the interpolation early


def test_the_readme_says_compose_v2() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "Compose v2" in readme and "docker-compose" in readme


def test_the_replicas_profile_puts_haproxy_before_three_alike_replicas(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    replicas = [f"replica-{i}" for i in (1, 2, 3)]
    assert all(services[r]["profiles"] == ["replicas"] for r in replicas)
    assert all(services[r]["environment"] == services["api"]["environment"] for r in replicas)
    assert all(services[r]["build"] == services["api"]["build"] for r in replicas)
    assert all("ports" not in services[r] for r in replicas)  # reached through the LB only
    for later in replicas[1:]:  # the first builds what is missing, alone
        assert services[later]["depends_on"]["replica-1"] == {"condition": "service_healthy"}
    lb = services["lb"]
    assert lb["profiles"] == ["replicas"]
    assert "./docker/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    config = (ROOT / "docker" / "haproxy.cfg").read_text()
    named = set(re.findall(r'"\$\{(REPLICA_\d)\}"', config))
    assert named == {k for k in lb["environment"] if k.startswith("REPLICA_")}
    assert {v.split(":")[0] for k, v in lb["environment"].items() if k in named} == set(replicas)
    assert '"${LB_BIND}"' in config and lb["environment"]["LB_BIND"].endswith(":8000")
    assert set(lb["depends_on"]) == set(replicas)


def test_the_stream_consumer_runs_beside_the_api_on_its_redis_and_features(
    compose: dict[str, Any],
) -> None:
    ingest, api = compose["services"]["ingest"], compose["services"]["api"]
    assert ingest["entrypoint"] == ["visrec-ingest"] and ingest["profiles"] == ["stream"]
    assert ingest["build"] == api["build"]
    assert ingest["environment"]["VISREC_REDIS_URL"] == api["environment"]["VISREC_REDIS_URL"]
    assert ingest["depends_on"]["api"] == {"condition": "service_healthy"}  # features built
    runs = next(v for v in api["volumes"] if v.startswith("runs:")).split(":")[1]
    assert ingest["volumes"] == [f"runs:{runs}:ro"]
    assert ingest["environment"]["VISREC_FEATURES"].startswith(runs + "/")
