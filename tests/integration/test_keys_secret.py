"""`llmops keys --secret`: the key file in a Kubernetes Secret, edited through the
`kubernetes` client (read, then replace at the resourceVersion read; create when missing)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path

import attrs
import pytest
from kmock._internal import k8s

from llmops_cli.secret_store import SecretKeyStore
from llmops_gateway.keys import KeyFile, KeyIndex, Tenant, hash_key
from tests.fakes.kube_api import KubeAPI
from tests.integration.operator_fixtures import live

pytestmark = [pytest.mark.kmock(cls=KubeAPI), pytest.mark.timeout(120)]

NAMESPACE, SECRET = "llmops", "llmops-gateway-keys"
UNREACHABLE = "http://127.0.0.1:9"


@attrs.frozen
class ForbiddenError(k8s.KubernetesError):
    """HTTP 403 as RBAC answers it (k8s.io/apiserver/pkg/endpoints/handlers/responsewriters,
    forbiddenMessage)."""

    status: int = 403
    reason: str = "Forbidden"
    message: str = (
        f'secrets "{SECRET}" is forbidden: User "me" cannot get resource "secrets" in API '
        f'group "" in the namespace "{NAMESPACE}"'
    )


def kubeconfig(api: KubeAPI, folder: Path, current: str = "fake") -> Path:
    """Contexts ``fake`` (the fake API server) and ``down`` (nothing listens there)."""
    path = folder / "kubeconfig"
    servers = {"fake": str(api.url), "down": UNREACHABLE}
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": n, "cluster": {"server": s}} for n, s in servers.items()],
                "users": [{"name": "me", "user": {}}],
                "contexts": [{"name": n, "context": {"cluster": n, "user": "me"}} for n in servers],
                "current-context": current,
            }
        )
    )
    return path


async def llmops(config: Path, *args: str) -> tuple[int, str, str]:
    """Runs the `llmops` command; the fake API server keeps serving meanwhile."""
    env = {**os.environ, "KUBECONFIG": str(config)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "llmops_cli", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def stored(api: KubeAPI) -> KeyFile:
    secret = live(api, "v1/secrets", NAMESPACE)[SECRET]
    return KeyFile.model_validate_json(base64.b64decode(secret["data"]["keys.json"]))


async def test_create_list_revoke_in_a_secret(kmock: KubeAPI, tmp_path: Path) -> None:
    config = kubeconfig(kmock, tmp_path)
    where = ("--secret", f"{NAMESPACE}/{SECRET}")
    code, out, err = await llmops(config, "keys", "create", "--tenant", "team-a", *where)
    assert code == 0, err
    key = out.strip()
    assert f"in Secret {NAMESPACE}/{SECRET} (key keys.json)" in err
    document = stored(kmock)
    (record,) = document.keys
    assert record.sha256 == hash_key(key)
    assert key not in json.dumps(document.model_dump(mode="json"))  # only the hash is kept
    assert KeyIndex(document).authenticate(key)[1].name == "team-a"

    code, out, _ = await llmops(config, "keys", "list", *where)
    assert code == 0
    assert record.id in out
    assert "team-a" in out
    assert key not in out

    code, out, _ = await llmops(config, "keys", "revoke", record.id, *where)
    assert code == 0, out
    assert stored(kmock).keys[0].revoked_at is not None


async def test_concurrent_creates_lose_nothing(kmock: KubeAPI, tmp_path: Path) -> None:
    config = kubeconfig(kmock, tmp_path)
    where = ("--secret", f"{NAMESPACE}/{SECRET}")
    assert (await llmops(config, "keys", "create", "--tenant", "first", *where))[0] == 0
    results = await asyncio.gather(
        *(llmops(config, "keys", "create", "--tenant", f"t{i}", *where) for i in range(6))
    )
    assert all(code == 0 for code, _, _ in results), [err for _, _, err in results]
    document = stored(kmock)
    assert sorted(document.tenants) == ["first", "t0", "t1", "t2", "t3", "t4", "t5"]
    assert len(document.keys) == 7
    replaces = [
        r
        for r in kmock._requests
        if str(r.method).upper().endswith("PUT") and r.resource and r.resource.plural == "secrets"
    ]
    assert len(replaces) >= 6  # every create after the first replaces the Secret


@pytest.mark.parametrize("collisions", [1, 8])
async def test_a_change_made_meanwhile_is_kept_and_ours_is_redone(
    kmock: KubeAPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, collisions: int
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(kmock, tmp_path)))
    ours, theirs = SecretKeyStore(NAMESPACE, SECRET), SecretKeyStore(NAMESPACE, SECRET)
    await asyncio.to_thread(ours.create, Tenant(name="first"))
    calls = 0

    def change(document: KeyFile) -> None:
        nonlocal calls
        calls += 1
        if calls <= collisions:  # someone else writes between our read and our write
            theirs.create(Tenant(name=f"theirs{calls}"))
        document.tenants["ours"] = Tenant(name="ours")

    await asyncio.to_thread(ours.update, change)
    assert calls == collisions + 1  # each write over a stale version was refused (409), redone
    theirs_names = [f"theirs{i}" for i in range(1, collisions + 1)]
    assert sorted(stored(kmock).tenants) == sorted(["first", "ours", *theirs_names])


async def test_the_context_option_picks_the_cluster(kmock: KubeAPI, tmp_path: Path) -> None:
    """--context goes to the kubernetes package's load_kube_config(context=...)."""
    config = kubeconfig(kmock, tmp_path, current="down")
    where = ("--secret", f"{NAMESPACE}/{SECRET}")
    code, _, err = await llmops(config, "keys", "create", "--tenant", "a", *where)
    assert code == 1
    assert f"cannot reach the Kubernetes API at {UNREACHABLE}" in err
    code, _, err = await llmops(
        config, "keys", "create", "--tenant", "a", *where, "--context", "fake"
    )
    assert code == 0, err
    assert sorted(stored(kmock).tenants) == ["a"]
    code, _, err = await llmops(config, "keys", "list", *where, "--context", "nowhere")
    assert code == 1
    assert "cannot use the kubeconfig" in err
    assert "nowhere" in err


async def test_failures_are_explained_without_tracebacks(kmock: KubeAPI, tmp_path: Path) -> None:
    where = ("--secret", f"{NAMESPACE}/{SECRET}")
    config = kubeconfig(kmock, tmp_path)
    # A Secret that is not there: listing or revoking says so (a misspelt name is no store).
    for command in (("list",), ("revoke", "abc")):
        code, _, err = await llmops(config, "keys", *command, *where)
        assert code == 1, err
        assert f"Secret {NAMESPACE}/{SECRET} (key keys.json) does not exist" in err
        assert "Traceback" not in err
    # RBAC refuses: the verb and the resource are named.
    kmock["fetch v1/secrets"] << ForbiddenError
    code, _, err = await llmops(config, "keys", "create", "--tenant", "a", *where)
    assert code == 1
    assert f"refused to get secrets in namespace {NAMESPACE} (HTTP 403 Forbidden)" in err
    assert 'cannot get resource "secrets"' in err
    assert "Traceback" not in err
    # No kubeconfig and no pod.
    code, _, err = await llmops(tmp_path / "absent", "keys", "list", *where)
    assert code == 1
    assert "no kubeconfig ($KUBECONFIG or ~/.kube/config) and not running in a pod" in err
    assert "Traceback" not in err
    code, _, err = await llmops(config, "keys", "list", "--secret", "just-a-name")
    assert code == 2
    assert "NAMESPACE/NAME" in err
    code, _, err = await llmops(
        config, "keys", "list", "--secret", f"{NAMESPACE}/{SECRET}", "--store", "keys.json"
    )
    assert code == 2
    assert "not both" in err
