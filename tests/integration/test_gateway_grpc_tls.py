"""The gateway's gRPC port over TLS, and with client certificates (mutual TLS).

Certificates are made for the test with the openssl command line: a CA, a server certificate
for localhost / 127.0.0.1 and a client certificate, each signed by the CA.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from llmops_gateway.grpc_api import gateway_pb2 as pb
from llmops_gateway.grpc_api import gateway_pb2_grpc as pb_grpc
from llmops_gateway.grpc_server import server_credentials
from llmops_gateway.keys import FileKeyStore, Tenant
from llmops_gateway.settings import GatewaySettings
from tests.integration.gateway_fixtures import gateway, stub_upstream

RPC_TIMEOUT_S = 10


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _signed(folder: Path, name: str, subject: str, ca: Path, ca_key: Path, ext: str) -> Path:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
    extfile = folder / f"{name}.ext"
    extfile.write_text(ext)
    _openssl("genrsa", "-out", str(key), "2048")
    _openssl(
        *("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr)),
    )
    _openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)),
        *("-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(extfile)),
    )
    return cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    _openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
        *("-subj", "/CN=llmops test CA", "-keyout", str(ca_key), "-out", str(ca)),
    )
    server = _signed(
        folder,
        "server",
        "/CN=localhost",
        ca,
        ca_key,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    client = _signed(
        folder, "client", "/CN=acme-batch", ca, ca_key, "extendedKeyUsage=clientAuth\n"
    )
    return Pki(ca, server, folder / "server.key", client, folder / "client.key")


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    store = FileKeyStore(tmp_path_factory.mktemp("tls-keys") / "keys.json")
    return store.path, store.create(Tenant(name="tls"))[1]


def _chat(target: str, credentials: grpc.ChannelCredentials | None, key: str) -> str:
    request = pb.ChatCompletionRequest(
        model="stub-chat",
        messages=[pb.Message(role="user", content="hi")],
        params=pb.SamplingParams(max_tokens=3),
    )
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials)
    with channel:
        stub = pb_grpc.GatewayStub(channel)  # type: ignore[no-untyped-call]
        reply = stub.CreateChatCompletion(
            request, metadata=[("authorization", f"Bearer {key}")], timeout=RPC_TIMEOUT_S
        )
    text: str = reply.choices[0].message.content
    return text


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with stub_upstream() as url:
        yield url


def test_tls_port_serves_tls_only(
    pki: Pki, key: tuple[Path, str], upstream: str, tmp_path: Path
) -> None:
    keys_file, secret = key
    settings = {"grpc_tls_cert_file": pki.server_cert, "grpc_tls_key_file": pki.server_key}
    with gateway(tmp_path, default_backend=upstream, keys_file=keys_file, **settings) as gw:
        target = gw.grpc_target.replace("127.0.0.1", "localhost")
        trusted = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        assert _chat(target, trusted, secret)

        with pytest.raises(grpc.RpcError) as plaintext:
            _chat(gw.grpc_target, None, secret)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE

        untrusted = grpc.ssl_channel_credentials()  # the system roots do not know our CA
        with pytest.raises(grpc.RpcError) as unknown_ca:
            _chat(target, untrusted, secret)
        assert unknown_ca.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_ca_requires_a_client_certificate(
    pki: Pki, key: tuple[Path, str], upstream: str, tmp_path: Path
) -> None:
    keys_file, secret = key
    settings = {
        "grpc_tls_cert_file": pki.server_cert,
        "grpc_tls_key_file": pki.server_key,
        "grpc_tls_client_ca_file": pki.ca,
    }
    with gateway(tmp_path, default_backend=upstream, keys_file=keys_file, **settings) as gw:
        target = gw.grpc_target.replace("127.0.0.1", "localhost")
        mutual = grpc.ssl_channel_credentials(
            root_certificates=pki.ca.read_bytes(),
            private_key=pki.client_key.read_bytes(),
            certificate_chain=pki.client_cert.read_bytes(),
        )
        assert _chat(target, mutual, secret)

        anonymous = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        with pytest.raises(grpc.RpcError) as refused:
            _chat(target, anonymous, secret)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"grpc_tls_cert_file": "server.pem"}, "both grpc_tls_cert_file and grpc_tls_key_file"),
        ({"grpc_tls_client_ca_file": "ca.pem"}, "client certificates are asked for only over"),
        (
            {"grpc_tls_cert_file": "missing.pem", "grpc_tls_key_file": "server.key"},
            "cannot read a gRPC TLS file",
        ),
    ],
)
def test_half_configured_tls_is_refused_with_what_to_fix(
    pki: Pki, files: dict[str, str], message: str
) -> None:
    folder = pki.ca.parent
    settings = GatewaySettings(**{k: folder / v for k, v in files.items()})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        server_credentials(settings)
