"""docker-compose.yml is valid and wires every service through the environment."""

from __future__ import annotations

import os
import shutil
import subprocess

import yaml

from settings import ROOT
from tests import services


def config() -> dict:
    services.require(shutil.which("docker-compose") is not None, "docker-compose (Debian's package)")
    result = subprocess.run(["docker-compose", "--env-file", ".env.example", "config"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid_and_complete():
    spec = config()["services"]
    assert {"rabbitmq", "mongo", "redis", "minio", "minio-init", "api", "proxy", "coordinator", "monitor",
            "peer-a", "peer-b", "flower"} <= set(spec)
    assert "15672" in str(spec["rabbitmq"]["ports"])


def test_peers_get_no_database_credentials_and_the_rest_do():
    spec = config()["services"]
    for name in ("peer-a", "peer-b"):
        env = spec[name]["environment"]
        assert "MONGODB_URI" not in env and "JWT_SECRET_KEY" not in env
        assert env["BROKER_URL"].startswith("amqp://") and env["RESULT_BACKEND"].startswith("redis://")
        assert env["STORAGE_URL"].startswith("s3://")
    for name in ("api", "coordinator", "monitor"):
        assert spec[name]["environment"]["MONGODB_URI"].startswith("mongodb://")
    assert spec["api"]["environment"]["JWT_SECRET_KEY"]


def test_compose_refuses_to_start_without_secrets(tmp_path):
    services.require(shutil.which("docker-compose") is not None, "docker-compose (Debian's package)")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("JWT_SECRET_KEY", "FLOWER_PASSWORD")}
    result = subprocess.run(["docker-compose", "--env-file", str(empty), "config", "-q"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode != 0
    assert "JWT_SECRET_KEY" in result.stderr or "FLOWER_PASSWORD" in result.stderr


def test_flower_is_behind_basic_auth():
    command = " ".join(config()["services"]["flower"]["command"])
    assert "--basic-auth=admin:change-me" in command


def test_the_api_is_reached_only_through_the_buffering_proxy():
    spec = config()["services"]
    assert "ports" not in spec["api"]
    assert "8000" in str(spec["proxy"]["ports"])
    mount = next(v for v in spec["proxy"]["volumes"] if "nginx.conf.template" in str(v))
    source = mount["source"] if isinstance(mount, dict) else str(mount).split(":")[0]
    assert (ROOT / "deploy" / "nginx.conf.template").samefile(source)
    # Both enforce one upload cap: the API's and nginx's refusals agree.
    assert spec["proxy"]["environment"]["MAX_UPLOAD_MB"] == spec["api"]["environment"]["MAX_UPLOAD_MB"]


def test_the_api_counts_sign_ins_in_redis_per_address_nginx_saw():
    env = config()["services"]["api"]["environment"]
    assert env["TRUSTED_PROXIES"] == "1"  # nginx, the one proxy in front
    assert env["RATE_LIMIT_STORAGE_URL"].startswith("redis://redis:")
