"""One settings object for the whole service: flags override ``CASPIAN_*`` variables."""

from __future__ import annotations

import importlib.util
import json
import ssl
from pathlib import Path
from typing import Annotated

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from caspian.auth.proxies import TrustedProxies
from caspian.bus.nats_options import check_creds, check_prefix, parse_servers, tls_context
from caspian.codes import SymbolType

#: The log levels a setting may name.
LOG_LEVELS = ("debug", "info", "warning", "error")
#: The event loops a setting may name.
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
#: The least ``session_stale_s``, whatever ``recheck_s``.
SESSION_STALE_MIN_S = 60.0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CASPIAN_", extra="ignore")

    host: str = Field("127.0.0.1", description="Listening address.")
    port: int = Field(8080, ge=0, le=65535, description="Listening port (0 picks a free one).")
    reuse_port: bool = Field(
        False,
        description="Let several instances on this host listen on the same port "
        "(SO_REUSEPORT): the kernel spreads new connections over them, one core each.",
    )
    data_dir: Path = Field(
        # The user's data directory, not the current one: the server and every CLI
        # command find the same store wherever they are started.
        default_factory=lambda: Path(platformdirs.user_data_dir("caspian", appauthor=False)),
        description="Where the SQLite file and a generated signing key live (created mode "
        "700); recordings go where 'caspian record --out' says.",
    )
    tls_cert: Path | None = Field(
        None, description="TLS certificate (PEM); with tls_key, serves https:// and wss://."
    )
    tls_key: Path | None = Field(None, description="TLS private key (PEM).")
    database_url: str | None = Field(
        None, description="Store as a SQLAlchemy URL; default a SQLite file in the data directory."
    )
    source: str = Field(
        "simulator",
        description="Market data source: simulator, replay:PATH, live:EXCHANGE,... or none "
        "(a gateway fed over NATS by another instance).",
    )
    replay_speed: float = Field(
        1.0, ge=0, description="Replay pace: 1 = recorded pace, N = N times faster, 0 = at once."
    )
    replay_loop: bool = Field(False, description="Start the replay file again at its end.")
    replay_recorded_times: bool = Field(
        False,
        description="Replay: keep each event's recorded Caspian time stamp, instead of the "
        "time it is delivered (never earlier than the one before, across loops too).",
    )
    bus: str = Field(
        "memory",
        description="Event bus: memory, or the NATS servers of one cluster as nats:// or "
        "tls:// URLs, comma-separated, with user:password@ or token@ in the URL if the "
        "servers want them.",
    )
    bus_prefix: str = Field(
        "caspian",
        description="NATS subjects' prefix: deployments sharing one NATS each need their own.",
    )
    nats_creds: Path | None = Field(
        None, description="NATS credentials file (user JWT and nkey seed) to connect with."
    )
    nats_tls_ca: Path | None = Field(
        None, description="Authorities (PEM) NATS servers' TLS certificates are checked against."
    )
    nats_tls_cert: Path | None = Field(
        None, description="Client certificate (PEM) for NATS servers that verify clients."
    )
    nats_tls_key: Path | None = Field(None, description="Private key (PEM) of nats_tls_cert.")
    token_ttl_s: int = Field(86_400, gt=0, description="Access token lifetime in seconds.")
    jwt_secret: str | None = Field(
        None,
        description="Token signing key; default one generated once and kept in the data directory.",
    )
    heartbeat_s: float = Field(
        15.0, gt=0, description="Ping interval; a ping unanswered by the next ping closes 3006."
    )
    recheck_s: float = Field(
        30.0,
        gt=0,
        description="How often open streams are checked again: a revoked key's streams "
        "close with 3001, changed entitlements apply to new Subscribes, and the cluster's "
        "session registry is synced (sessions ended with 'caspian sessions end' close "
        "with 3003).",
    )
    max_queue: int = Field(
        50_000, gt=0, description="Undelivered messages per connection before close 3007."
    )
    max_queue_bytes: int = Field(
        16 * 1024 * 1024,
        gt=0,
        description="Undelivered bytes per connection before close 3007, whatever the count.",
    )
    max_subscriptions: int = Field(
        100, gt=0, description="Subscriptions per connection before SubscribeResponse 206."
    )
    max_message_bytes: int = Field(
        65_536, gt=0, description="Largest inbound WebSocket message; larger closes with 1009."
    )
    max_body_bytes: int = Field(65_536, gt=0, description="Largest REST request body (413).")
    max_rest_in_flight: int = Field(
        256,
        gt=0,
        description="REST requests served at once; more are answered 503 at once, so that "
        "requests whose clients hung up cannot pile up.",
    )
    symbol_types: list[SymbolType] = Field(
        default_factory=lambda: list(SymbolType),
        description="Symbol types a Subscribe may use; the others answer 209.",
    )
    maintenance: str | None = Field(
        "SUN 00:15-00:16",
        description="Weekly maintenance window in GMT, as 'DAY HH:MM-HH:MM'; 'off' disables it.",
    )
    auth_max_failures: int = Field(
        5,
        gt=0,
        description="Failed logins per key or user from one address before 429; an "
        "address gets 4 times as many over all keys and users, a user 20 times as many "
        "over all addresses except those it logged in from in the last 30 days.",
    )
    auth_window_s: float = Field(
        60.0,
        gt=0,
        description="Window in which failed logins count; a locked subject may try again "
        "once the oldest of its counted failures is this old.",
    )
    # NoDecode: the variable is read by the validator below, a JSON list or a plain
    # comma-separated one.
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For "
        "names the client (and X-Forwarded-Proto the scheme), comma-separated; from any "
        "other peer these headers are ignored.",
    )
    max_connections: int = Field(
        0,
        ge=0,
        description="Open client connections (REST and stream) before new ones are refused "
        "with 503; 0 = derived from the open-file limit, leaving headroom for the store "
        "and upstreams.",
    )
    max_connections_per_address: int = Field(
        256,
        gt=0,
        description="Open client connections from one address before new ones are "
        "refused with 429.",
    )
    max_streams_per_principal: int = Field(
        64,
        gt=0,
        description="Open stream connections of one key or user; one more is closed "
        "with 3008 once its token is checked.",
    )
    handshake_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Time a new connection has to send a whole request head (and an idle "
        "HTTP connection to send its next one) before it is closed: slowloris defence.",
    )
    max_header_bytes: int = Field(
        16_384, gt=0, description="Largest request head (request line and headers); 431 beyond."
    )
    max_headers: int = Field(100, gt=0, description="Most headers in one request; 431 beyond.")
    max_messages_per_s: float = Field(
        200.0,
        gt=0,
        description="Inbound stream messages per second per connection, with a burst of "
        "max_message_burst: past it the server reads no further from that connection "
        "until the rate allows (TCP backpressure), so a flood is answered slowly, "
        "never at others' expense.",
    )
    max_message_burst: int = Field(
        500, gt=0, description="Inbound stream messages a connection may send at once."
    )
    max_messages_per_s_per_principal: float = Field(
        400.0,
        gt=0,
        description="Inbound stream messages per second of all the streams of one key or "
        "user together, with a burst of max_message_burst_per_principal: past it they wait "
        "like a single connection's, so many connections cannot multiply the rate.",
    )
    max_message_burst_per_principal: int = Field(
        1_000,
        gt=0,
        description="Inbound stream messages the streams of one key or user may send at once.",
    )
    max_token_refreshes_per_s: float = Field(
        1.0,
        gt=0,
        description="TokenRefreshes per second per connection (bursts of 5); past them "
        "they wait, never dropped. A client needs one per token lifetime.",
    )
    metrics_token: str | None = Field(
        None,
        min_length=1,
        description="If set, GET /metrics requires 'Authorization: Bearer <token>' (401 "
        "otherwise).",
    )
    simulator_seed: int = Field(1, description="Seed of the built-in market simulator.")
    simulator_rate: float = Field(
        20.0, gt=0, description="Simulator book updates per second per watched symbol."
    )
    simulator_outages: bool = Field(
        False, description="Let the simulator cut its upstream streams now and then."
    )
    live_stall_s: float = Field(
        30.0,
        gt=0,
        description="Live source watchdog: a stream silent this long is marked "
        "disconnected and subscribed again.",
    )
    live_max_lag_s: float = Field(
        2.0,
        gt=0,
        description="Live source: a symbol running this far behind the exchange's time "
        "stamps is marked disconnected until it catches up, then sent whole again.",
    )
    catalog_refresh_s: float = Field(
        0.0,
        ge=0,
        description="How often a running service refreshes its catalog from the "
        "exchanges' market lists through ccxt (new listings added, delisted products "
        "retired); 0: never.",
    )
    source_timeout_s: float = Field(
        3.0,
        gt=0,
        description="NATS bus: a gateway that hears no heartbeat from the source of a "
        "watched symbol for this long marks its streams disconnected and joins again "
        "from a source that answers.",
    )
    unwatch_grace_s: float = Field(
        30.0, ge=0, description="How long a symbol nobody watches any more stays upstream."
    )
    log_level: str = Field("info", description="Log level: debug, info, warning or error.")
    event_loop: str = Field(
        "auto",
        description="The event loop serve, ingest and gateway run on: uvloop (its I/O is "
        "compiled, a tenth or more off the live path's CPU), asyncio (the standard one), or "
        "auto (uvloop where it is installed).",
    )

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
        return level

    @field_validator("event_loop")
    @classmethod
    def _event_loop(cls, value: str) -> str:
        choice = value.strip().lower()
        if choice not in EVENT_LOOPS:
            raise ValueError(f"{value!r} is not one of {', '.join(EVENT_LOOPS)}")
        if choice == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("uvloop is not installed here: pip install uvloop, or use auto")
        return choice

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _trusted_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except json.JSONDecodeError:
                    raise ValueError(
                        f"{text!r} is neither a JSON list nor comma-separated addresses"
                    ) from None
            return text.replace(",", " ").split()
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_proxies(cls, value: list[str]) -> list[str]:
        TrustedProxies(value)
        return value

    @field_validator("bus")
    @classmethod
    def _bus(cls, value: str) -> str:
        if value == "memory":
            return value
        return ",".join(parse_servers(value))

    @field_validator("bus_prefix")
    @classmethod
    def _bus_prefix(cls, value: str) -> str:
        return check_prefix(value)

    @field_validator("nats_creds")
    @classmethod
    def _nats_creds(cls, value: Path | None) -> Path | None:
        return None if value is None else check_creds(value)

    @model_validator(mode="after")
    def _serving_tls(self) -> Settings:
        """Both files or neither, and loadable: checked here, for one line at startup."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_cert is not None and self.tls_key is not None:
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                    self.tls_cert, self.tls_key
                )
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load tls_cert/tls_key: {exc}") from None
        return self

    @model_validator(mode="after")
    def _nats_tls(self) -> Settings:
        # Loaded once here for the one-line error at startup; the bus loads its own.
        tls_context(self.nats_tls_ca, self.nats_tls_cert, self.nats_tls_key)
        return self

    @field_validator("maintenance")
    @classmethod
    def _maintenance(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "off", "none"):
            return None
        from caspian.maintenance import MaintenanceWindow

        MaintenanceWindow.parse(value)
        return value

    @property
    def session_stale_s(self) -> float:
        """How long a gateway may go without syncing the session registry before the others
        purge it, with its sessions, and ``caspian sessions list`` stops showing them.

        A live gateway syncs every ``recheck_s``: three missed rounds is a gateway that died
        without saying so (killed, or cut off from the store). The floor keeps a short
        ``recheck_s`` from purging gateways over a store hiccup; a purged gateway that is
        alive registers itself and its sessions again at its next sync.
        """
        return max(3 * self.recheck_s, SESSION_STALE_MIN_S)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'caspian.db').resolve()}"
