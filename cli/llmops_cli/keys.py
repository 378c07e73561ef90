"""`llmops keys`: create, list and revoke gateway API keys in a local key file."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import platformdirs
import typer
from pydantic import ValidationError

from llmops_gateway.keys import EditableKeyStore, FileKeyStore, Tenant

KEYS_FILE_ENV = "LLMOPS_KEYS_FILE"
SECRET_DATA_KEY = "keys.json"  # noqa: S105 (the name of a data key, not a credential)


class SecretStoreError(Exception):
    """No way to the API server holding the keys' Secret, or it refused; the message says what
    to do. Raised by secret_store.py, defined here so that a key file needs no Kubernetes
    client."""


app = typer.Typer(
    help="Manage gateway API keys and tenants: in a key file (what `llmops up` reads), or with "
    "--secret in the Kubernetes Secret the chart's gateways read (through the kubeconfig, "
    "$KUBECONFIG or ~/.kube/config, else the pod's service account).",
    no_args_is_help=True,
)


def default_keys_file() -> Path:
    """``$LLMOPS_KEYS_FILE``, or keys.json in the user's config folder."""
    configured = os.environ.get(KEYS_FILE_ENV)
    if configured:
        return Path(configured)
    return Path(platformdirs.user_config_dir("llmops")) / "keys.json"


StoreOption = Annotated[
    Path | None,
    typer.Option(
        "--store", help=f"Key file (default: ${KEYS_FILE_ENV} or the user config folder)."
    ),
]
SecretOption = Annotated[
    str | None,
    typer.Option(
        "--secret",
        metavar="NAMESPACE/NAME",
        help="Keep the keys in this Kubernetes Secret instead of a file, e.g. "
        "llmops/llmops-gateway-keys (the chart's gateway.keys.existingSecret).",
    ),
]
SecretKeyOption = Annotated[
    str, typer.Option(help="With --secret: the data key holding the key file.")
]
ContextOption = Annotated[
    str | None,
    typer.Option(help="With --secret: the kubeconfig context (default: the current one)."),
]


def _store(
    path: Path | None, secret: str | None, secret_key: str, context: str | None
) -> EditableKeyStore:
    if secret is None:
        return FileKeyStore(path or default_keys_file())
    if path is not None:
        raise typer.BadParameter("use --store or --secret, not both", param_hint="--secret")
    # The official sync client, only for --secret: installs without it (the images) still
    # manage key files.
    try:
        from llmops_cli.secret_store import SecretKeyStore, parse_secret_ref
    except ModuleNotFoundError as exc:
        raise typer.BadParameter(
            f"--secret needs the Kubernetes client ({exc.name}): pip install 'llmops[all]'",
            param_hint="--secret",
        ) from exc

    try:
        namespace, name = parse_secret_ref(secret)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--secret") from exc
    return SecretKeyStore(namespace, name, secret_key, context)


@contextmanager
def _store_errors() -> Iterator[None]:
    """An unreachable or refusing API server ends the command with its message, not a
    traceback."""
    try:
        yield
    except SecretStoreError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None


_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _expiry(expires_in: str | None, expires_at: str | None) -> float | None:
    """Unix time of ``--expires-in`` (``30d``, ``12h``, ``90m``, ``2w``) or ``--expires-at``
    (ISO 8601; UTC unless it names a zone), or None for a key that never expires.

    Raises:
        typer.BadParameter: both given, or a value that does not parse or lies in the past.
    """
    if expires_in is not None and expires_at is not None:
        raise typer.BadParameter("give --expires-in or --expires-at, not both")
    if expires_in is not None:
        amount, unit = expires_in[:-1], expires_in[-1:].lower()
        if unit not in _UNITS_S or not amount.isdigit() or int(amount) == 0:
            raise typer.BadParameter(
                f"--expires-in {expires_in!r}: a positive number and a unit (s, m, h, d, w), "
                "e.g. 30d"
            )
        return datetime.datetime.now(tz=datetime.UTC).timestamp() + int(amount) * _UNITS_S[unit]
    if expires_at is not None:
        try:
            moment = datetime.datetime.fromisoformat(expires_at)
        except ValueError:
            raise typer.BadParameter(
                f"--expires-at {expires_at!r}: not an ISO 8601 date or time "
                "(e.g. 2027-01-31 or 2027-01-31T12:00:00Z)"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        when = moment.timestamp()
        if when <= datetime.datetime.now(tz=datetime.UTC).timestamp():
            raise typer.BadParameter(f"--expires-at {expires_at!r} is in the past")
        return when
    return None


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


@app.command()
def create(
    tenant: Annotated[str, typer.Option(help="Tenant the key belongs to (created if new).")],
    models: Annotated[
        list[str] | None,
        typer.Option("--model", help="A model the tenant may use; repeat it. Default: all."),
    ] = None,
    requests_per_minute: Annotated[int, typer.Option(help="Request rate limit.")] = 600,
    tokens_per_minute: Annotated[int, typer.Option(help="Token rate limit.")] = 200_000,
    max_concurrent_streams: Annotated[int, typer.Option(help="Open streams at once.")] = 32,
    tokens_per_day: Annotated[int, typer.Option(help="Daily token budget.")] = 5_000_000,
    description: Annotated[str, typer.Option(help="Free text shown by `list`.")] = "",
    expires_in: Annotated[
        str | None,
        typer.Option(help="Refuse the key after this long: 30d, 12h, 90m, 2w. Default: never."),
    ] = None,
    expires_at: Annotated[
        str | None,
        typer.Option(help="Refuse the key from this ISO 8601 time (UTC unless a zone is given)."),
    ] = None,
    store: StoreOption = None,
    secret: SecretOption = None,
    secret_key: SecretKeyOption = SECRET_DATA_KEY,
    context: ContextOption = None,
) -> None:
    """Create a key and print it once: it is stored only as a hash."""
    expiry = _expiry(expires_in, expires_at)
    try:
        spec = Tenant(
            name=tenant,
            allowed_models=models or ["*"],
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
            max_concurrent_streams=max_concurrent_streams,
            tokens_per_day=tokens_per_day,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(problems) from exc
    key_store = _store(store, secret, secret_key, context)
    with _store_errors():
        record, key = key_store.create(spec, description, expires_at=expiry)
    typer.echo(key)
    expiring = f", expiring {_when(record.expires_at)}" if record.expires_at else ""
    typer.echo(
        f"created key {record.id} for tenant {spec.name} in {key_store}{expiring}; "
        "this is the only time the key is shown",
        err=True,
    )


@app.command("list")
def list_keys(
    store: StoreOption = None,
    secret: SecretOption = None,
    secret_key: SecretKeyOption = SECRET_DATA_KEY,
    context: ContextOption = None,
) -> None:
    """List keys (ids, tenants, state); never the keys themselves."""
    with _store_errors():
        document = _store(store, secret, secret_key, context).load()
    typer.echo(f"{'ID':<14}{'TENANT':<20}{'CREATED':<22}{'EXPIRES':<22}{'REVOKED':<22}DESCRIPTION")
    for record in document.keys:
        typer.echo(
            f"{record.id:<14}{record.tenant:<20}{_when(record.created_at):<22}"
            f"{_when(record.expires_at):<22}{_when(record.revoked_at):<22}{record.description}"
        )


@app.command()
def revoke(
    key_id: Annotated[str, typer.Argument(help="The key id that `list` shows.")],
    store: StoreOption = None,
    secret: SecretOption = None,
    secret_key: SecretKeyOption = SECRET_DATA_KEY,
    context: ContextOption = None,
) -> None:
    """Revoke a key by id; requests with it are refused from then on."""
    try:
        with _store_errors():
            record = _store(store, secret, secret_key, context).revoke(key_id)
    except KeyError:
        typer.echo(f"no key with id {key_id!r}; `llmops keys list` shows the ids", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"revoked key {record.id} of tenant {record.tenant}")
