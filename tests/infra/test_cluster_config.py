"""Cluster definitions are authenticated and keep the dashboard on loopback: `ray start --head
--dashboard-host=0.0.0.0` without RAY_AUTH_MODE=token would be an open jobs API."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _ray_start_lines(cfg: dict) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[key]
            if "ray start" in c]


def test_launcher_yaml_starts_every_node_with_token_auth_and_a_loopback_dashboard():
    cfg = yaml.safe_load((ROOT / "infra/cluster/clipcap-aws.yaml").read_text())
    starts = _ray_start_lines(cfg)
    assert len(starts) == 2
    for line in starts:
        assert "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN_PATH=" in line
    head = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    # The token comes from the secret store into a private file, never from the YAML itself.
    setup = " ".join(cfg["setup_commands"])
    assert "secretsmanager get-secret-value" in setup and "umask 077" in setup


def _ray_jobs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((ROOT / "infra/kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in ("RayJob", "RayCronJob", "RayCluster"):
                spec = doc["spec"].get("jobTemplate", doc["spec"])
                out.append((path.name, spec))
    return out


def test_kuberay_manifests_use_token_auth_and_a_loopback_dashboard():
    jobs = _ray_jobs()
    assert len(jobs) == 3
    for name, spec in jobs:
        cluster = spec["rayClusterSpec"]
        assert cluster.get("authOptions") == {"mode": "token"}, name
        assert cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host") == "127.0.0.1", name
        # The submitter must reach a loopback dashboard: only the sidecar (same pod) can.
        assert spec.get("submissionMode") == "SidecarMode", name
        assert cluster["headGroupSpec"]["template"]["spec"].get("restartPolicy") == "Never", name


def test_no_token_or_key_is_written_into_the_cluster_definitions():
    text = "\n".join(p.read_text() for p in [*(ROOT / "infra").rglob("*.yaml"), *(ROOT / "infra").rglob("*.cron")])
    assert not re.search(r"(RAY_AUTH_TOKEN|AWS_SECRET_ACCESS_KEY|auth_token)\s*[:=]\s*['\"]?[A-Za-z0-9+/]{16,}", text)
