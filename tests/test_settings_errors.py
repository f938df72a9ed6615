"""Every setting, given a bad value, stops the service with one clear line.

The table below must name every field of the settings model: a new setting
without a row fails ``test_every_setting_has_a_row``. A value the model
itself refuses is checked where the CLI reads settings, in-process; one the
model accepts and the service refuses later (an address that cannot be
bound, a source that does not exist) is checked by running `caspian serve`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from caspian import cli
from caspian.settings import Settings
from tests.support.cli import fails

NOT_A_FILE = "/nonexistent/caspian/file.pem"

#: field -> (a bad value, what the error line must say)
BAD: dict[str, tuple[str, str]] = {
    "host": ("256.1.2.3", "256.1.2.3"),
    "port": ("notaport", "port"),
    "reuse_port": ("maybe", "reuse_port"),
    "event_loop": ("fastest", "event_loop"),
    "data_dir": ("/proc/caspian-cannot-be-here", "caspian-cannot-be-here"),
    "tls_cert": (NOT_A_FILE, "tls_cert and tls_key go together"),
    "tls_key": (NOT_A_FILE, "tls_cert and tls_key go together"),
    "database_url": ("mysql://nobody@127.0.0.1/db", "database URL"),
    "source": ("carrier-pigeon", "unsupported source"),
    "replay_speed": ("-1", "replay_speed"),
    "replay_loop": ("perhaps", "replay_loop"),
    "replay_recorded_times": ("perhaps", "replay_recorded_times"),
    "bus": ("redis://127.0.0.1:6379", "nats"),
    "bus_prefix": ("a..b", "bus_prefix"),
    "nats_creds": (NOT_A_FILE, "nats_creds"),
    "nats_tls_ca": (NOT_A_FILE, "CASPIAN_NATS_TLS_CA"),
    "nats_tls_cert": (NOT_A_FILE, "CASPIAN_NATS_TLS_CERT"),
    "nats_tls_key": (NOT_A_FILE, "CASPIAN_NATS_TLS_CERT"),
    "token_ttl_s": ("0", "token_ttl_s"),
    "jwt_secret": ("short", "at least 32 characters"),
    "heartbeat_s": ("0", "heartbeat_s"),
    "recheck_s": ("-3", "recheck_s"),
    "max_queue": ("0", "max_queue"),
    "max_queue_bytes": ("lots", "max_queue_bytes"),
    "max_subscriptions": ("0", "max_subscriptions"),
    "max_message_bytes": ("0", "max_message_bytes"),
    "max_body_bytes": ("-1", "max_body_bytes"),
    "max_rest_in_flight": ("0", "max_rest_in_flight"),
    "symbol_types": ("Caspian", "symbol_types"),
    "maintenance": ("sometimes", "maintenance"),
    "auth_max_failures": ("0", "auth_max_failures"),
    "auth_window_s": ("0", "auth_window_s"),
    "trusted_proxies": ("10.0.0.0/33", "trusted proxy"),
    "max_connections": ("-1", "max_connections"),
    "max_connections_per_address": ("0", "max_connections_per_address"),
    "max_streams_per_principal": ("0", "max_streams_per_principal"),
    "handshake_timeout_s": ("0", "handshake_timeout_s"),
    "max_header_bytes": ("0", "max_header_bytes"),
    "max_headers": ("0", "max_headers"),
    "max_messages_per_s": ("0", "max_messages_per_s"),
    "max_message_burst": ("0", "max_message_burst"),
    "max_messages_per_s_per_principal": ("-1", "max_messages_per_s_per_principal"),
    "max_message_burst_per_principal": ("0", "max_message_burst_per_principal"),
    "max_token_refreshes_per_s": ("0", "max_token_refreshes_per_s"),
    "metrics_token": ("", "metrics_token"),
    "simulator_seed": ("one", "simulator_seed"),
    "simulator_rate": ("0", "simulator_rate"),
    "simulator_outages": ("often", "simulator_outages"),
    "live_stall_s": ("0", "live_stall_s"),
    "live_max_lag_s": ("0", "live_max_lag_s"),
    "catalog_refresh_s": ("-1", "catalog_refresh_s"),
    "source_timeout_s": ("0", "source_timeout_s"),
    "unwatch_grace_s": ("-1", "unwatch_grace_s"),
    "log_level": ("verbose", "log_level"),
}


def test_every_setting_has_a_row() -> None:
    assert set(BAD) == set(Settings.model_fields)


@pytest.mark.parametrize("field", sorted(BAD))
def test_a_bad_value_is_one_clear_line(
    field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    value, expected = BAD[field]
    variable = f"CASPIAN_{field.upper()}"
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("CASPIAN_DATA_DIR", str(tmp_path / "data"))
    try:
        cli._settings()
    except typer.Exit as exit_:
        assert exit_.exit_code != 0
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert expected in lines[0], lines[0]
        return
    # Accepted by the model: the service must refuse it when it starts.
    monkeypatch.delenv(variable)
    env = {variable: value}
    if field != "port":
        env["CASPIAN_PORT"] = "0"
    line = fails(tmp_path / "data", "serve", timeout=60, **env)
    assert expected in line, line


def test_tls_files_that_cannot_be_loaded_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CASPIAN_TLS_CERT", NOT_A_FILE)
    monkeypatch.setenv("CASPIAN_TLS_KEY", NOT_A_FILE)
    with pytest.raises(typer.Exit):
        cli._settings()
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cannot load tls_cert/tls_key" in line
