"""How discovery finds the API server: kube_api_url, else in-cluster, else the kubeconfig.

The loaders are kubernetes_asyncio's (config/incluster_config.py re-reads the projected token
once TOKEN_REFRESH_PERIOD has passed; config/kube_config.py reads $KUBECONFIG).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from kubernetes_asyncio.config import incluster_config

from llmops_gateway import discovery
from llmops_gateway.discovery import KubeAccess


@pytest.fixture
def pod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A service account mount and the Service env a pod gets; returns the mount."""
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("first-token")
    (account / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setattr(discovery, "SERVICE_ACCOUNT", account)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    return account


def write_kubeconfig(folder: Path, server: str) -> Path:
    path = folder / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "from-kubeconfig"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return path


async def test_in_a_pod_the_service_account_is_used_and_its_token_rotates(
    pod: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path, "http://elsewhere:1")))
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", datetime.timedelta(0))
    access = KubeAccess.configure(None)
    assert access.source == "the pod's service account"
    assert access.kubeconfig is None
    assert access.configuration.host == "https://10.96.0.1:443"
    assert access.configuration.ssl_ca_cert == str(pod / "ca.crt")
    token = access.configuration.get_api_key_with_prefix
    assert await token("BearerToken") == "Bearer first-token"
    (pod / "token").write_text("rotated-token")  # kubelet replaces the projected token
    assert await token("BearerToken") == "Bearer rotated-token"


async def test_outside_a_pod_the_kubeconfig_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    config = write_kubeconfig(tmp_path, "https://api.example:6443")
    monkeypatch.setenv("KUBECONFIG", str(config))
    access = KubeAccess.configure(None)
    assert access.source == f"kubeconfig {config}"
    api = await access.connect()
    try:
        assert api.configuration.host == "https://api.example:6443"
        token = await api.configuration.get_api_key_with_prefix("BearerToken")
        assert token == "Bearer from-kubeconfig"
    finally:
        await api.close()


async def test_kube_api_url_wins_and_sends_no_credentials(pod: Path) -> None:
    access = KubeAccess.configure("http://127.0.0.1:8001/")
    assert access.configuration.host == "http://127.0.0.1:8001"
    assert not access.configuration.api_key


def test_without_any_the_error_names_the_three_ways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(RuntimeError) as raised:
        KubeAccess.configure(None)
    message = str(raised.value)
    assert "service account" in message
    assert str(tmp_path / "absent") in message
    assert "LLMOPS_GATEWAY_KUBE_API_URL" in message
