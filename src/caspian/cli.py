"""The ``caspian`` command: run the service and manage its store."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from enum import StrEnum
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError
from rich.console import Console
from rich.table import Table

from caspian.settings import Settings

T = TypeVar("T")

log = logging.getLogger(__name__)

app = typer.Typer(
    name="caspian",
    help="Caspian: a self-hostable Caspian API v1 market-data service.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain help: Rich markup would take "[env var: …; default: …]" and
    # "caspian[cluster]" in help texts for tags and drop them.
    rich_markup_mode=None,
)
users_app = typer.Typer(help="Credential logins and their entitlements.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys (Key logins).", no_args_is_help=True)
products_app = typer.Typer(help="The product catalog.", no_args_is_help=True)
sessions_app = typer.Typer(
    help="Open stream sessions, on every gateway sharing the store.", no_args_is_help=True
)
db_app = typer.Typer(help="The store's schema.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.add_typer(sessions_app, name="sessions")
app.add_typer(products_app, name="products")
app.add_typer(db_app, name="db")

_console = Console()


class CliError(Exception):
    """A failure to report as one line."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _settings(**overrides: Any) -> Settings:
    try:
        settings = Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        raise _fail(f"invalid settings: {problems}") from None
    except SettingsError as exc:
        # A list setting that is not JSON: pydantic-settings names the field in
        # its message, its cause says what is wrong with the text.
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        hint = '(give a list as JSON, e.g. ["a", "b"])'
        raise _fail(f"invalid settings: {exc}{cause} {hint}") from None
    return settings


_STORE_OPTIONS: dict[str, Any] = {}


def _stop_on_sigterm() -> None:
    """Make SIGTERM stop a long-running command the way Ctrl-C does.

    uvicorn re-raises the signal that stopped it once its own shutdown is done; under
    SIGTERM's default action the process would die right there, before the service
    closes its store and bus (or ``record`` its file).
    """
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def _shown_default(field: FieldInfo) -> str | None:
    """A setting's default as its variable would spell it; None if it has none."""
    default = field.get_default(call_default_factory=True)
    if default is None:
        return None
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, list):
        return json.dumps([str(item) for item in default])
    return str(default)


def _setting(name: str) -> Any:
    """The flag of setting ``name``, its help made from the settings model: the model's
    description, variable and default are the one source of truth for both."""
    field = Settings.model_fields[name]
    default = _shown_default(field)
    shown = f"; default: {default}" if default is not None else ""
    return typer.Option(
        help=f"{field.description} [env var: CASPIAN_{name.upper()}{shown}]", show_default=False
    )


def _print_version(wanted: bool) -> None:
    if wanted:
        typer.echo(f"caspian {version('caspian')}")
        raise typer.Exit()


@app.callback()
def _root(
    data_dir: Annotated[Path | None, _setting("data_dir")] = None,
    database_url: Annotated[str | None, _setting("database_url")] = None,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    _STORE_OPTIONS.update(data_dir=data_dir, database_url=database_url)


def _new_store(settings: Settings) -> str:
    """What to tell a user whose command created the store: maybe not the one they meant."""
    data_dir = settings.data_dir.resolve()
    if settings.database_url is None:
        return (
            f"a new, empty store (no users, no keys) was created in the data directory "
            f"{data_dir}; if you meant another, give CASPIAN_DATA_DIR or --data-dir"
        )
    return (
        f"a new, empty store (no users, no keys) was created at {_shown_store(settings)} "
        f"(data directory {data_dir}); if you meant another, give CASPIAN_DATABASE_URL "
        "or --database-url"
    )


def _shown_store(settings: Settings) -> str:
    """The store's URL, its password hidden."""
    from sqlalchemy.engine import make_url

    return make_url(settings.resolved_database_url).render_as_string(hide_password=True)


def _with_store(action: Callable[[Any], Awaitable[T]], settings: Settings | None = None) -> T:
    """Open the store the server uses, run ``action`` on it, report failures in one line."""
    from caspian.store import Store, StoreError

    settings = settings or _settings(**_STORE_OPTIONS)
    try:
        store = Store(settings.resolved_database_url)
    except ValueError as exc:
        raise _fail(str(exc)) from None

    async def run() -> T:
        try:
            await store.upgrade()
            return await action(store)
        finally:
            await store.close()

    try:
        result = asyncio.run(run())
    except (StoreError, CliError, ValueError, OSError) as exc:
        # Still one line: a failure on a store just created empty is most likely the
        # wrong store (no such user or key there).
        message = str(exc) or type(exc).__name__
        raise _fail(f"{message} ({_new_store(settings)})" if store.created else message) from None
    if store.created:
        typer.echo(f"note: {_new_store(settings)}", err=True)
    return result


# -- serve -----------------------------------------------------------------


def _settings_help() -> str:
    """Every CASPIAN_* variable with its meaning and default, for ``serve --help``."""
    lines = ["Environment variables (a flag, where there is one, wins):", ""]
    for name, field in Settings.model_fields.items():
        default = _shown_default(field)
        shown = f" [default: {default}]" if default is not None else ""
        lines += [f"CASPIAN_{name.upper()}: {field.description}{shown}", ""]
    # Read by the live source itself, not a setting of the model.
    lines.append(
        "CASPIAN_LIVE_URLS: Live source: JSON of per-exchange ccxt URL overrides, e.g. "
        '{"GDAX": {"api": {"ws": "ws://..."}}} (a mirror, or the test mocks).'
    )
    return "\n".join(lines)


class Role(StrEnum):
    """What one process does: ``serve`` everything, or one side of a cluster."""

    ALL = "serve"
    INGEST = "ingest"
    GATEWAY = "gateway"


def _service_options(
    host: Annotated[str | None, _setting("host")] = None,
    port: Annotated[int | None, _setting("port")] = None,
    data_dir: Annotated[Path | None, _setting("data_dir")] = None,
    database_url: Annotated[str | None, _setting("database_url")] = None,
    source: Annotated[str | None, _setting("source")] = None,
    replay_speed: Annotated[float | None, _setting("replay_speed")] = None,
    bus: Annotated[str | None, _setting("bus")] = None,
    token_ttl_s: Annotated[int | None, _setting("token_ttl_s")] = None,
    heartbeat_s: Annotated[float | None, _setting("heartbeat_s")] = None,
    max_queue: Annotated[int | None, _setting("max_queue")] = None,
    max_subscriptions: Annotated[int | None, _setting("max_subscriptions")] = None,
    maintenance: Annotated[str | None, _setting("maintenance")] = None,
    tls_cert: Annotated[Path | None, _setting("tls_cert")] = None,
    tls_key: Annotated[Path | None, _setting("tls_key")] = None,
    log_level: Annotated[str | None, _setting("log_level")] = None,
) -> None:
    """The flags of ``serve``, ``ingest`` and ``gateway``, declared once: each command
    takes these parameters (less those ``_service_command`` leaves out)."""


_WORKERS = inspect.Parameter(
    "workers",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    default=1,
    annotation=Annotated[
        int,
        typer.Option(
            min=1,
            envvar="CASPIAN_WORKERS",
            show_envvar=True,
            help="Processes serving clients on the one port: 1, one process with an "
            "in-process bus; above 1, a NATS server, one ingest and N gateway processes "
            "sharing the port (SO_REUSEPORT), supervised and restarted if they die (needs "
            "pip install 'caspian[cluster]').",
        ),
    ],
)
_READY_FD = inspect.Parameter(
    "ready_fd",
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    default=None,
    annotation=Annotated[
        int | None,
        # Given by the supervisor of ``serve --workers``: the worker writes a line there
        # once it serves.
        typer.Option(hidden=True),
    ],
)


def _service_command(
    role: Role, extra: tuple[inspect.Parameter, ...] = (), without: frozenset[str] = frozenset()
) -> Callable[..., None]:
    """A command running the service in ``role``, with the flags of ``_service_options``."""
    template = inspect.signature(_service_options, eval_str=True)
    parameters = [p for name, p in template.parameters.items() if name not in without]

    def command(**options: Any) -> None:
        _run_service(role, **options)

    command.__signature__ = template.replace(  # type: ignore[attr-defined]
        parameters=[*parameters, *extra]
    )
    return command


def _run_service(role: Role, workers: int = 1, ready_fd: int | None = None, **options: Any) -> None:
    flags = {name: value for name, value in options.items() if value is not None}
    for name in ("data_dir", "database_url"):
        if name not in flags and _STORE_OPTIONS.get(name) is not None:
            flags[name] = _STORE_OPTIONS[name]
    # A gateway's events come over the bus, whatever CASPIAN_SOURCE says.
    settings = _settings(**flags, **({"source": "none"} if role is Role.GATEWAY else {}))
    from caspian.logs import install_redaction

    install_redaction()
    # Processes of one host (serve --workers) write to one log: each line says whose.
    who = "" if role is Role.ALL and workers == 1 else f"{role if workers == 1 else 'supervisor'}"
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {who + '[%(process)d] ' if who else ''}"
        "%(name)s: %(message)s",
    )
    # Migrations run at every start; their step-by-step notes are noise there.
    logging.getLogger("alembic").setLevel(max(logging.WARNING, logging.root.level))
    from caspian.server import Listening, addresses
    from caspian.server import serve as run_server
    from caspian.store import StoreError
    from caspian.supervisor import READY_LINE, SupervisorError, Workers, run_workers

    def ready(listening: Listening) -> None:
        if ready_fd is not None:
            # A worker of serve --workers: its supervisor prints the addresses, once.
            os.write(ready_fd, READY_LINE)
            os.close(ready_fd)
            return
        # Before the banner: whoever has read the banner finds the note there already.
        if listening.service.store.created:
            typer.echo(f"note: {_new_store(settings)}", err=True)
        if role is Role.INGEST:
            base = listening.rest_url.removesuffix("/v1")
            typer.echo(f"Caspian ingest:   {base} (/healthz, /readyz, /metrics only)")
        else:
            typer.echo(f"Caspian REST API: {listening.rest_url}")
            typer.echo(f"Caspian stream:   {listening.stream_url}")
        _print_setup(settings)
        sys.stdout.flush()

    def workers_ready(running: Workers) -> None:
        rest, stream = addresses(running.host, running.port, settings.tls_cert is not None)
        if running.store_created:
            typer.echo(f"note: {_new_store(settings)}", err=True)
        typer.echo(f"Caspian REST API: {rest}")
        typer.echo(f"Caspian stream:   {stream}")
        if running.ingest_port is not None:
            scheme = "https" if settings.tls_cert is not None else "http"
            typer.echo(
                f"Caspian ingest:   {scheme}://127.0.0.1:{running.ingest_port} "
                "(/healthz, /readyz, /metrics only)"
            )
        pids = ", ".join(str(child.pid) for child in running.children)
        typer.echo(f"Caspian workers:  {len(running.children)} processes (pids {pids})")
        _print_setup(settings)
        sys.stdout.flush()

    _stop_on_sigterm()
    try:
        if workers > 1:
            run_loop(settings.event_loop, run_workers(settings, flags, workers, workers_ready))
        else:
            run_loop(settings.event_loop, run_server(settings, ready, ingest=role is Role.INGEST))
    except KeyboardInterrupt:
        pass
    except (StoreError, SupervisorError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None


def run_loop(choice: str, main: Coroutine[Any, Any, None]) -> None:
    """Runs ``main`` to its end on the event loop ``choice`` names (CASPIAN_EVENT_LOOP)."""
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            # Settings refuse "uvloop" where it is missing: this is "auto".
            pass
        else:
            log.debug("event loop: uvloop")
            uvloop.run(main)
            return
    log.debug("event loop: asyncio")
    asyncio.run(main)


def _print_setup(settings: Settings) -> None:
    """The banner's lines after the addresses (which scripts read first): what this
    process runs with, passwords hidden."""
    from caspian.bus.nats_options import redact

    bus = ",".join(redact(server) for server in settings.bus.split(","))
    typer.echo(f"Caspian version:  {version('caspian')}")
    typer.echo(f"Caspian store:    {_shown_store(settings)}")
    typer.echo(f"Caspian data dir: {settings.data_dir.resolve()}")
    typer.echo(f"Caspian source:   {settings.source}")
    typer.echo(f"Caspian bus:      {bus}")


app.command(
    "serve",
    epilog=_settings_help(),
    help="Start the service: REST and the WebSocket stream on one address, and the market "
    "data source. With --workers N, one ingest and N gateway processes on this host "
    "instead. Every setting also comes from its CASPIAN_* environment variable; a flag wins.",
)(_service_command(Role.ALL, extra=(_WORKERS,)))

app.command(
    "ingest",
    epilog=_settings_help(),
    help="Run the market data source alone, publishing to the NATS bus (CASPIAN_BUS=nats://"
    "…) for gateways; its address answers only /healthz, /readyz and /metrics. Same "
    "settings as serve.",
)(_service_command(Role.INGEST, extra=(_READY_FD,)))

app.command(
    "gateway",
    epilog=_settings_help(),
    help="Serve clients (REST and the stream) fed by the NATS bus (CASPIAN_BUS=nats://…), "
    "with no source of its own. Same settings as serve, less the source's.",
)(_service_command(Role.GATEWAY, extra=(_READY_FD,), without=frozenset({"source", "replay_speed"})))


@app.command()
def record(
    out: Annotated[Path, typer.Option("--out", help="The file to write, e.g. market.jsonl.gz.")],
    symbols: Annotated[
        str | None,
        typer.Option(help="Comma-separated Caspian codes; default every product of the catalog."),
    ] = None,
    source: Annotated[str | None, _setting("source")] = None,
    seconds: Annotated[
        float | None,
        typer.Option(min=0.0, help="Stop after this long; default until interrupted."),
    ] = None,
    rotate_mb: Annotated[
        float | None,
        typer.Option(min=0.001, help="Start a new numbered file after this many MB of events."),
    ] = None,
) -> None:
    """Record what the source produces, in the replay format (gzip if the name ends in .gz)."""
    settings = _settings(
        source=source,
        data_dir=_STORE_OPTIONS.get("data_dir"),
        database_url=_STORE_OPTIONS.get("database_url"),
    )
    wanted = [code.strip() for code in symbols.split(",") if code.strip()] if symbols else None
    from caspian.catalog.index import Catalog
    from caspian.service import make_source, seed_reference_data
    from caspian.sources.recorder import Recorder

    async def load_catalog(store: Any) -> Catalog:
        await seed_reference_data(store)
        return Catalog(record.spec for record in await store.products())

    catalog = _with_store(load_catalog, settings)

    async def run() -> Recorder:
        chosen = wanted or [product.caspian_code for product in catalog]
        unknown = [code for code in chosen if catalog.get(code) is None]
        if unknown:
            raise CliError(f"unknown symbol: {', '.join(unknown[:5])}")
        feed = make_source(settings, catalog.get)
        if feed is None:
            raise CliError("record needs a source: simulator, replay:PATH or live:EXCHANGE,...")
        recorder = Recorder(out, set(chosen), int(rotate_mb * 1_000_000) if rotate_mb else None)
        tasks = [asyncio.create_task(feed.run(recorder.write)), asyncio.create_task(recorder.run())]
        for code in chosen:
            feed.watch(code)
        try:
            if seconds is None:
                await asyncio.gather(*tasks)
            else:
                await asyncio.sleep(seconds)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            recorder.close()
        return recorder

    _stop_on_sigterm()
    try:
        recorder = asyncio.run(run())
    except KeyboardInterrupt:
        return
    except (CliError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    files = ", ".join(str(path) for path in recorder.files) or "nothing"
    typer.echo(f"recorded {recorder.events} events to {files}")


# -- users -----------------------------------------------------------------


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(help="The login name.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
) -> None:
    """Create a Credential login (user and password)."""
    password = _read_password(password_stdin)

    async def action(store: Any) -> None:
        await store.create_user(name, password)

    _with_store(action)
    typer.echo(f"created user {name}")


@users_app.command("list")
def users_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the users."""

    async def action(store: Any) -> list[Any]:
        return list(await store.list_users())

    users = _with_store(action)
    rows = [
        {
            "name": user.name,
            "credential": user.has_password,
            "exchanges": "ALL" if user.all_exchanges else ",".join(user.exchanges),
            "created": user.created_time.isoformat(sep=" ", timespec="seconds"),
            "disabled": user.disabled,
        }
        for user in users
    ]
    _print_rows(rows, as_json, "users")


_UserArgument = Annotated[str, typer.Argument(help="The user.")]


def _read_password(password_stdin: bool) -> str:
    if not password_stdin:
        raise _fail("give the password on standard input with --password-stdin")
    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise _fail("the password on standard input is empty")
    return password


@users_app.command("passwd")
def users_passwd(
    name: _UserArgument,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the new password from standard input.")
    ] = False,
) -> None:
    """Set a user's password; every token issued to the user so far stops working."""
    password = _read_password(password_stdin)

    async def action(store: Any) -> None:
        await store.set_password(name, password)

    _with_store(action)
    typer.echo(f"changed the password of {name}")


def _set_disabled(name: str, disabled: bool) -> None:
    async def action(store: Any) -> None:
        await store.set_disabled(name, disabled)

    _with_store(action)
    typer.echo(f"{'disabled' if disabled else 'enabled'} {name}")


@users_app.command("disable")
def users_disable(name: _UserArgument) -> None:
    """Disable a user: no login (password or key) and no token of theirs works; open
    streams close with 3001 within CASPIAN_RECHECK_S."""
    _set_disabled(name, True)


@users_app.command("enable")
def users_enable(name: _UserArgument) -> None:
    """Enable a disabled user again; tokens issued before the disabling stay invalid."""
    _set_disabled(name, False)


_ExchangeArgument = Annotated[
    str | None, typer.Argument(help="An exchange code, in any case (GEMINI, gemini).")
]


async def _exchange_code(store: Any, given: str) -> str:
    """The store's exchange code ``given`` names, whatever its case."""
    codes = sorted(code for _, code in await store.list_exchanges())
    code = given.strip().upper()
    if code not in codes:
        raise CliError(f"unknown exchange {given} (the codes are {', '.join(codes)})")
    return code


_AllOption = Annotated[bool, typer.Option("--all", help="Every exchange.")]


def _change_entitlement(name: str, exchange: str | None, all_exchanges: bool, grant: bool) -> None:
    """Grant or revoke one exchange (or, with --all, every one) and show what the user has now.

    The exchanges are seeded first: the CLI may act on a store no server has started on
    yet, where revoking one exchange from a user allowed all would otherwise leave them
    none, since the others are looked up in the store.
    """
    if all_exchanges == (exchange is not None):
        raise _fail("name one EXCHANGE code, or give --all")

    async def action(store: Any) -> Any:
        from caspian.catalog.exchanges import EXCHANGES

        await store.seed_exchanges(EXCHANGES)
        code = None if exchange is None else await _exchange_code(store, exchange)
        return await (store.grant if grant else store.revoke)(name, code)

    user = _with_store(action)
    shown = "ALL" if user.all_exchanges else (",".join(user.exchanges) or "none")
    typer.echo(f"{user.name}: {shown}")


@users_app.command("grant")
def users_grant(
    name: _UserArgument, exchange: _ExchangeArgument = None, all_exchanges: _AllOption = False
) -> None:
    """Let a user stream an exchange's products (every user may stream all by default)."""
    _change_entitlement(name, exchange, all_exchanges, grant=True)


@users_app.command("revoke")
def users_revoke(
    name: _UserArgument, exchange: _ExchangeArgument = None, all_exchanges: _AllOption = False
) -> None:
    """Stop a user streaming an exchange's products: 205 on Subscribe, and their open
    subscriptions to it end with 205 within CASPIAN_RECHECK_S."""
    _change_entitlement(name, exchange, all_exchanges, grant=False)


# -- keys ------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Option("--user", help="The key's owner (made if missing).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create an API key; its secret is shown this once."""

    async def action(store: Any) -> tuple[Any, str]:
        result: tuple[Any, str] = await store.create_key(user)
        return result

    key, secret = _with_store(action)
    if as_json:
        typer.echo(json.dumps({"accessKeyID": key.key_id, "secretAccessKey": secret}))
    else:
        typer.echo(f"accessKeyID:     {key.key_id}")
        typer.echo(f"secretAccessKey: {secret}")
        typer.echo("The secret is shown only now: keep it safe.", err=True)


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the API keys (never their secrets)."""

    async def action(store: Any) -> list[Any]:
        return list(await store.list_keys())

    rows = [
        {
            "accessKeyID": key.key_id,
            "user": key.user,
            "created": key.created_time.isoformat(sep=" ", timespec="seconds"),
            "revoked": key.revoked,
        }
        for key in _with_store(action)
    ]
    _print_rows(rows, as_json, "keys")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The accessKeyID.")]) -> None:
    """Revoke a key: it can no longer log in, and its tokens stop working."""

    async def action(store: Any) -> bool:
        return bool(await store.revoke_key(key_id))

    if not _with_store(action):
        raise _fail(f"no key {key_id}")
    typer.echo(f"revoked {key_id}")


# -- sessions --------------------------------------------------------------


@sessions_app.command("list")
def sessions_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the open stream sessions; each appears within CASPIAN_RECHECK_S of opening."""
    stale_s = _settings(**_STORE_OPTIONS).session_stale_s

    async def action(store: Any) -> list[Any]:
        return list(await store.list_sessions(stale_s))

    rows = [
        {
            "id": listed.session.id,
            "user": listed.session.user,
            "accessKeyID": listed.session.key_id,
            "peer": listed.session.peer,
            "gatewayHost": listed.gateway.host,
            "gatewayPid": listed.gateway.pid,
            "opened": listed.session.opened_time.isoformat(sep=" ", timespec="seconds"),
        }
        for listed in _with_store(action)
    ]
    _print_rows(rows, as_json, "sessions")


@sessions_app.command("end")
def sessions_end(session_id: Annotated[str, typer.Argument(help="The session's id.")]) -> None:
    """End a stream session: its gateway closes it with 3003 within CASPIAN_RECHECK_S, and
    its token no longer opens a stream (3001) nor answers on REST (401)."""

    async def action(store: Any) -> bool:
        return bool(await store.end_session(session_id))

    if not _with_store(action):
        raise _fail(f"no session {session_id}")
    typer.echo(f"ended {session_id}")


# -- products --------------------------------------------------------------


@products_app.command("import")
def products_import(
    file: Annotated[Path | None, typer.Option("--file", help="A ccxt markets JSON file.")] = None,
    exchange: Annotated[
        str | None,
        typer.Option("--exchange", help="The Caspian exchange code the file is for, in any case."),
    ] = None,
    ccxt_id: Annotated[
        str | None,
        typer.Option(
            "--ccxt",
            help="Refresh from the exchanges' live market lists through ccxt: one code "
            "(--ccxt KRAKEN), several comma-separated, or 'all' (every exchange ccxt "
            "reaches). Delisted products are retired; expired ones are kept.",
        ),
    ] = None,
    ccxt_url: Annotated[
        str | None,
        typer.Option(
            "--ccxt-url",
            help="With --ccxt: send every ccxt API request to this base URL instead of the "
            "exchange's (a mirror, or a recorded exchange served locally).",
        ),
    ] = None,
) -> None:
    """Load products from ccxt market definitions; re-importing keeps createdTime."""
    from caspian.catalog.ccxt_markets import products_from_ccxt
    from caspian.catalog.importer import markets_from_file, resolve_exchange

    if (file is None) == (ccxt_id is None):
        raise _fail("give either --file PATH (with --exchange) or --ccxt EXCHANGE")
    if ccxt_url is not None and ccxt_id is None:
        raise _fail("--ccxt-url goes with --ccxt EXCHANGE")
    if ccxt_id is not None:
        _refresh_through_ccxt(ccxt_id, ccxt_url)
        return
    assert file is not None
    try:
        code = resolve_exchange(exchange, file.stem)
        products = products_from_ccxt(code, markets_from_file(file))
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from None
    if not products:
        raise _fail(f"no product could be read for {code}")

    async def action(store: Any) -> tuple[int, int]:
        from caspian.catalog.exchanges import EXCHANGES

        await store.seed_exchanges(EXCHANGES)
        result: tuple[int, int] = await store.upsert_products(products)
        return result

    created, updated = _with_store(action)
    typer.echo(f"{code}: {created} products created, {updated} updated")


def _refresh_through_ccxt(given: str, api_url: str | None) -> None:
    """``products import --ccxt``: each exchange named refreshed on its own, one line each;
    exit status 1 when any could not be."""
    from caspian.catalog.exchanges import CCXT_IDS, EXCHANGES
    from caspian.catalog.importer import resolve_exchange
    from caspian.catalog.refresh import REFRESHABLE, Refreshed, ccxt_fetcher, refresh_exchanges
    from caspian.sources.live.source import urls_from_env
    from caspian.timefmt import now_us

    names = [name.strip() for name in given.split(",") if name.strip()]
    try:
        if [name.lower() for name in names] == ["all"]:
            codes = list(REFRESHABLE)
        else:
            codes = [resolve_exchange(name, None) for name in names]
        if not codes:
            raise ValueError("name the exchange with --ccxt CODE, or --ccxt all")
        for code in codes:
            if code not in CCXT_IDS:
                raise ValueError(f"ccxt does not support {code}")
        fetch = ccxt_fetcher(urls_from_env(), api_url=api_url)
    except ValueError as exc:
        raise _fail(str(exc)) from None

    async def action(store: Any) -> dict[str, Refreshed | str]:
        await store.seed_exchanges(EXCHANGES)
        return await refresh_exchanges(store, codes, fetch, now_us())

    failed = 0
    for code, result in _with_store(action).items():
        if isinstance(result, Refreshed):
            typer.echo(result.summary())
        else:
            failed += 1
            typer.echo(f"error: {code}: {result}", err=True)
    if failed:
        raise typer.Exit(1)


@products_app.command("list")
def products_list(
    exchange: Annotated[
        str | None, typer.Option("--exchange", help="An exchange code, in any case.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the products, of one exchange or all."""

    async def action(store: Any) -> list[Any]:
        from caspian.service import seed_reference_data

        # The products the server would serve, also on a store no server has started on.
        await seed_reference_data(store)
        code = None if exchange is None else await _exchange_code(store, exchange)
        return list(await store.products(None if code is None else [code]))

    records = _with_store(action)
    if as_json:
        typer.echo(json.dumps([record.api_dict() for record in records], indent=2))
        return
    rows = [
        {
            "caspianCode": record.spec.caspian_code,
            "pseudoCode": record.spec.pseudo_code,
            "nativeCode": record.spec.native_code,
            "tickRule": record.spec.tick_rule,
            "lotSize": record.spec.lot_size,
        }
        for record in records
    ]
    _print_rows(rows, False, "products")


# -- db --------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the store's migrations and load the built-in reference data."""
    from caspian.service import seed_reference_data

    _with_store(seed_reference_data)
    typer.echo("the store is up to date")


#: Words up to this long (a date) are never broken in a table; longer ones may fold.
_UNBROKEN = len("2026-01-01")


def _print_rows(rows: list[dict[str, Any]], as_json: bool, what: str) -> None:
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no {what}")
        return
    cells = [
        {name: "-" if value is None else str(value) for name, value in row.items()} for row in rows
    ]
    # Each column at least as wide as its header and its longest word up to a date's
    # length: values wrap between words, a longer word folds, none is cut ("2026-1…").
    # The first column names the row for the other commands (revoke, end): never wrapped.
    names = list(cells[0])
    widths = [
        max(len(name), *(min(len(word), _UNBROKEN) for row in cells for word in row[name].split()))
        for name in names
    ]
    widths[0] = max(len(names[0]), *(len(row[names[0]]) for row in cells))
    # Rich's default table: a border before each column and after the last, one space
    # of padding either side of each.
    if sum(widths) + 3 * len(widths) + 1 > _console.width:
        # Too narrow for a table: one "name: value" line per cell, a blank line per row.
        label = max(len(name) for name in names) + 2
        typer.echo(
            "\n\n".join(
                "\n".join(f"{name + ':':<{label}}{value}" for name, value in row.items())
                for row in cells
            )
        )
        return
    table = Table(*names)
    for column, width in zip(table.columns, widths, strict=True):
        column.min_width = width
        column.overflow = "fold"
    table.columns[0].no_wrap = True
    for row in cells:
        table.add_row(*row.values())
    _console.print(table)


def main() -> None:
    app()
