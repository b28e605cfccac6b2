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


def test_peers_get_only_their_own_login_and_the_platform_gets_the_rest():
    spec = config()["services"]
    for name, other in (("peer-a", "peer-b"), ("peer-b", "peer-a")):
        env = spec[name]["environment"]
        assert not any(key.startswith(("BROKER", "RESULT", "MONGODB", "STORAGE", "S3", "AWS", "JWT")) for key in env)
        mounts = [str(v.get("source") if isinstance(v, dict) else v) for v in spec[name]["volumes"]]
        assert any(f"{name}-login" in m for m in mounts) and not any(f"{other}-login" in m for m in mounts)
        assert "tasks.peer" in " ".join(spec[name]["command"]) and "--without-gossip" in " ".join(spec[name]["command"])
    for name in ("api", "coordinator", "monitor", "register-peers"):
        env = spec[name]["environment"]
        assert env["MONGODB_URI"].startswith("mongodb://") and "@mongo:" in env["MONGODB_URI"]
    assert spec["api"]["environment"]["JWT_SECRET_KEY"]
    # The database and Redis ask for passwords.
    assert spec["mongo"]["environment"]["MONGO_INITDB_ROOT_PASSWORD"]
    assert "--requirepass" in spec["redis"]["command"]


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
    assert env["RATE_LIMIT_STORAGE_URL"].startswith("redis://") and "@redis:6379/" in env["RATE_LIMIT_STORAGE_URL"]
