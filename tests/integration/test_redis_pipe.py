"""The gateway's pipelined Redis connection against a real redis-server."""

from __future__ import annotations

import asyncio
import datetime
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from llmops_gateway.redis_pipe import (
    LATER_S,
    Address,
    PipelinedRedis,
    RedisReplyError,
    RedisUnavailableError,
    Script,
    TlsOptions,
    encode,
)
from tests.conftest import free_port


def test_commands_are_encoded_as_bulk_string_arrays() -> None:
    assert encode(("SET", "k", 12, b"\x00v")) == (
        b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n$2\r\n\x00v\r\n"
    )


def test_urls_give_host_port_tls_credentials_and_database() -> None:
    assert Address.from_url("rediss://app:p%40ss@redis.example:6380/3") == Address(
        "redis.example", 6380, True, "app", "p@ss", 3
    )
    assert Address.from_url("redis://:secret@10.0.0.1") == Address(
        "10.0.0.1", 6379, False, None, "secret", 0
    )
    with pytest.raises(ValueError, match="not a redis"):
        Address.from_url("http://redis:6379")
    with pytest.raises(ValueError, match="is a number"):
        Address.from_url("redis://redis:6379/cache")


async def test_concurrent_calls_each_get_their_own_reply(redis_url: str) -> None:
    redis = PipelinedRedis(redis_url)
    prefix = uuid.uuid4().hex
    try:
        await asyncio.gather(*(redis.call("SET", f"{prefix}:{i}", i) for i in range(500)))
        replies = await asyncio.gather(*(redis.call("GET", f"{prefix}:{i}") for i in range(500)))
        assert replies == [str(i).encode() for i in range(500)]
        await redis.call("SET", f"{prefix}:text", "abc")
        with pytest.raises(RedisReplyError, match="not an integer"):
            await redis.call("INCR", f"{prefix}:text")
        # An error reply fails only its own call; the connection goes on.
        assert await redis.call("GET", f"{prefix}:7") == b"7"
    finally:
        await redis.close()


async def test_calls_sent_later_ride_along_or_leave_on_their_own(redis_url: str) -> None:
    """A call sent later goes with the next call sent sooner (one write for both, replies in
    order); with none, it leaves within `LATER_S`; a close sends what is still queued."""
    redis = PipelinedRedis(redis_url)
    key = uuid.uuid4().hex
    try:
        await redis.call("PING")
        writes = redis.counts.writes
        later = asyncio.ensure_future(redis.call("INCR", key, later=True))
        await asyncio.sleep(0)  # queued, not sent
        assert redis.counts.writes == writes
        assert await redis.call("GET", key) == b"1"  # ran first: sent first, in one write
        assert await later == 1
        assert redis.counts.writes == writes + 1

        started = time.monotonic()
        assert await redis.call("INCR", key, later=True) == 2
        assert time.monotonic() - started >= LATER_S * 0.9
        assert redis.counts.writes == writes + 2

        queued = asyncio.ensure_future(redis.call("INCR", key, later=True))
        await asyncio.sleep(0)
        await redis.close()
        with pytest.raises(RedisUnavailableError):
            await queued  # its reply never read, but the command went out
        observer = PipelinedRedis(redis_url)
        assert await observer.call("GET", key) == b"3"
        await observer.close()
    finally:
        await redis.close()


async def test_a_call_sent_now_leaves_at_once_unless_others_are_on_their_way(
    redis_url: str,
) -> None:
    """`evalsha_now` writes before it returns on an idle connection; while another call awaits
    its reply (a burst), it joins the loop turn's write instead."""
    redis = PipelinedRedis(redis_url)
    script = Script("return redis.call('INCR', KEYS[1])")
    key = uuid.uuid4().hex
    try:
        assert redis.evalsha_now(script, [key], []) is None  # not connected yet
        await redis.evalsha(script, [key], [])  # connects, loads the script
        writes = redis.counts.writes
        first = redis.evalsha_now(script, [key], [])
        assert first is not None
        assert redis.counts.writes == writes + 1
        second = redis.evalsha_now(script, [key], [])  # the first is on its way
        assert second is not None
        assert redis.counts.writes == writes + 1
        assert await first == 2
        assert await second == 3
        assert redis.counts.writes == writes + 2
    finally:
        await redis.close()


async def test_scripts_are_reloaded_when_redis_forgot_them(redis_url: str) -> None:
    redis = PipelinedRedis(redis_url)
    script = Script(f"return {{KEYS[1], ARGV[1], '{uuid.uuid4().hex}'}}")
    try:
        first = await redis.evalsha(script, ["k"], [5])
        assert first[:2] == [b"k", b"5"]
        await redis.call("SCRIPT", "FLUSH")  # what a Redis restart does
        assert await redis.evalsha(script, ["k"], [6]) == [b"k", b"6", first[2]]
    finally:
        await redis.close()


async def test_a_silent_server_times_out_and_the_next_call_reconnects(redis_url: str) -> None:
    # A listener that accepts and never answers, in place of a stuck Redis.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        redis = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
        with pytest.raises(RedisUnavailableError, match=r"did not answer in 0\.2 s"):
            await redis.call("PING")
        await redis.close()
    healthy = PipelinedRedis(redis_url, timeout_s=0.5)
    try:
        assert await healthy.call("PING") == b"PONG"
        # Drop the connection under it: waiting calls fail, the next one reconnects.
        protocol = await healthy._connection()
        assert protocol.transport is not None
        protocol.transport.abort()
        await asyncio.sleep(0.05)
        assert await healthy.call("PING") == b"PONG"
    finally:
        await healthy.close()


async def test_credentials_in_the_url_are_used_and_a_wrong_password_is_named_not_shown(
    redis_url: str,
) -> None:
    admin = PipelinedRedis(redis_url)
    user = f"u{uuid.uuid4().hex[:8]}"
    await admin.call("ACL", "SETUSER", user, "on", ">right-pass", "~*", "+@all")
    await admin.close()
    host = redis_url.removeprefix("redis://")
    good = PipelinedRedis(f"redis://{user}:right-pass@{host}")
    assert await good.call("ACL", "WHOAMI") == user.encode()
    await good.close()
    bad = PipelinedRedis(f"redis://{user}:not-the-password@{host}")
    with pytest.raises(RedisUnavailableError, match="WRONGPASS") as caught:
        await bad.call("PING")
    assert "not-the-password" not in str(caught.value)


@asynccontextmanager
async def blackhole() -> AsyncIterator[tuple[int, list[int]]]:
    """A listener that accepts connections and never answers (a lost Redis node).

    Yields:
        Its port, and a list that grows by one per accepted connection.
    """
    accepted: list[int] = []
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        for writer in held:
            writer.close()
        server.close()


@pytest.mark.parametrize("credentials", ["", "user:secret@"])
async def test_waiters_on_a_silent_redis_share_one_attempt_then_fail_fast(
    credentials: str,
) -> None:
    """With a password, the connect itself hangs (AUTH never answered); without, the first
    command does. Either way each of 20 concurrent calls fails within one timeout, not the
    k-th after k timeouts as when each waiter reconnected in turn under a lock."""
    timeout_s = 0.3
    async with blackhole() as (port, accepted):
        redis = PipelinedRedis(
            f"redis://{credentials}127.0.0.1:{port}/0", timeout_s=timeout_s, retry_interval_s=1.0
        )

        async def timed_call() -> float:
            started = time.monotonic()
            with pytest.raises(RedisUnavailableError):
                await redis.call("PING")
            return time.monotonic() - started

        waits = await asyncio.gather(*(timed_call() for _ in range(20)))
        assert max(waits) < timeout_s + 0.2, waits
        assert len(accepted) == 1
        # Within the retry interval, calls fail at once and nothing connects.
        started = time.monotonic()
        with pytest.raises(RedisUnavailableError, match="next attempt in"):
            await redis.call("PING")
        assert time.monotonic() - started < 0.05
        assert len(accepted) == 1
        await asyncio.sleep(1.0)
        # Then one shared attempt again.
        again = await asyncio.gather(*(timed_call() for _ in range(5)))
        assert max(again) < timeout_s + 0.2, again
        assert len(accepted) == 2
        await redis.close()


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if usage is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), False)
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]), False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(
    folder: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> None:
    (folder / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """redis-server with TLS only, a private CA, a certificate for ``redis.test`` (not for
    127.0.0.1) and client certificates required (``tls-auth-clients yes``)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: run .ci/setup (it installs it)")
    folder = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("llmops test CA", ca_key, None, None)
    _write(folder, "ca", ca, ca_key)
    for name, usage in (
        ("redis.test", ExtendedKeyUsageOID.SERVER_AUTH),
        ("gateway", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(folder, name, _certificate(name, key, ("llmops test CA", ca_key), usage), key)
    port = free_port()
    process = subprocess.Popen(
        [
            *(server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
            *("--tls-cert-file", str(folder / "redis.test.crt")),
            *("--tls-key-file", str(folder / "redis.test.key")),
            *("--tls-ca-cert-file", str(folder / "ca.crt")),
            *("--tls-auth-clients", "yes", "--save", "", "--dir", str(folder)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("redis-server with TLS did not start")
            time.sleep(0.05)
    try:
        yield port, folder
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_tls_with_a_private_ca_client_certificate_and_server_name(
    tls_redis: tuple[int, Path],
) -> None:
    port, folder = tls_redis
    url = f"rediss://127.0.0.1:{port}/0"
    full = TlsOptions(
        ca_file=folder / "ca.crt",
        cert_file=folder / "gateway.crt",
        key_file=folder / "gateway.key",
        server_name="redis.test",
    )
    redis = PipelinedRedis(url, tls=full)
    try:
        assert await redis.call("PING") == b"PONG"
    finally:
        await redis.close()
    # Each part is needed: the CA, the name on the certificate, the client certificate.
    for lacking, reason in (
        (
            TlsOptions(cert_file=full.cert_file, key_file=full.key_file, server_name="redis.test"),
            "CERTIFICATE_VERIFY_FAILED",
        ),
        (
            TlsOptions(ca_file=full.ca_file, cert_file=full.cert_file, key_file=full.key_file),
            "CERTIFICATE_VERIFY_FAILED",
        ),
        (TlsOptions(ca_file=full.ca_file, server_name="redis.test"), "cannot use|lost"),
    ):
        refused = PipelinedRedis(url, timeout_s=1.0, tls=lacking)
        with pytest.raises(RedisUnavailableError, match=reason):
            await refused.call("PING")
        await refused.close()


def test_tls_options_need_a_rediss_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rediss://"):
        PipelinedRedis("redis://127.0.0.1:6379/0", tls=TlsOptions(server_name="redis.test"))
