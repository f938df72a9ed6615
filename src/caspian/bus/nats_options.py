"""How the service reaches NATS: the servers of ``CASPIAN_BUS``, the subject prefix, TLS.

Every error names the offending server with its password or token hidden
(:func:`redact`), since error messages end up in terminals and logs.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from urllib.parse import urlsplit

SCHEMES = ("nats", "tls")
#: One token of a subject prefix: NATS gives '.', '*', '>' and white space meanings.
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
#: What a credentials file (``nsc generate creds``) holds besides comments.
_CREDS_BLOCKS = ("-----BEGIN NATS USER JWT-----", "-----BEGIN USER NKEY SEED-----")


def redact(url: str) -> str:
    """The URL with its password (``user:***@``) or token (``***@``) hidden."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return f"{scheme}{separator}{shown}@{host}{slash}{path}"


def parse_servers(text: str) -> list[str]:
    """The servers of one NATS cluster, from a comma-separated list of URLs."""
    servers = [part.strip() for part in text.split(",")]
    if not any(servers):
        raise ValueError("name a NATS server, e.g. nats://127.0.0.1:4222")
    for server in servers:
        _check_server(server)
    return servers


def _check_server(server: str) -> None:
    if not server:
        raise ValueError("an empty entry in the list of NATS servers")
    shown = redact(server)
    parts = urlsplit(server)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{shown} is neither memory nor a nats:// or tls:// URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{shown}: the port must be a number from 1 to 65535") from None
    if port == 0:
        raise ValueError(f"{shown}: the port must be a number from 1 to 65535")
    if not parts.hostname:
        raise ValueError(f"{shown} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{shown}: a NATS server URL has no path, query or fragment")


def check_prefix(prefix: str) -> str:
    if not all(_TOKEN.fullmatch(token) for token in prefix.split(".")):
        raise ValueError(
            f"{prefix!r} is not a subject prefix: tokens of letters, digits, '-' and '_', "
            "separated by dots"
        )
    return prefix


def check_creds(path: Path) -> Path:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    if not all(block in text for block in _CREDS_BLOCKS):
        raise ValueError(f"{path} is not a NATS credentials file (a user JWT and an nkey seed)")
    return path


def tls_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A client context trusting ``ca`` (else the system's), with a client certificate if given.

    None when nothing is configured: then only ``tls://`` servers, and servers that
    require TLS, are spoken to over TLS, verified against the system's authorities.
    """
    if ca is None and cert is None and key is None:
        return None
    if key is not None and cert is None:
        raise ValueError("CASPIAN_NATS_TLS_KEY needs CASPIAN_NATS_TLS_CERT")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"CASPIAN_NATS_TLS_CA: cannot load {ca}: {_reason(exc)}") from None
    if cert is not None:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(
                f"CASPIAN_NATS_TLS_CERT/KEY: cannot load {cert}"
                f"{f' with {key}' if key is not None else ''}: {_reason(exc)}"
            ) from None
    return context


def _reason(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    return exc.strerror or str(exc)
