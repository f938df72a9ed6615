"""The README's quick start and first session, run as a new user would run them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.support.running import Started

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
#: Where the README's commands expect the service: serve's default address.
DEFAULT_ADDRESS = "127.0.0.1:8080"


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    return README[start : README.index("\n## ", start + 1)]


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def test_quick_start_is_two_commands_and_ci_runs_the_readme_s_test_command() -> None:
    serve, test = blocks(section("Quick start"), "sh")[:2]
    venv = "python3 -m venv .venv && . .venv/bin/activate && "
    assert serve.strip() == venv + "pip install . && caspian serve"
    install = 'pip install -e ".[test]" -e ./clients/python'
    assert test.strip() == venv + install + " && pytest"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install in ci
    assert ci[-1] == "pytest"


def test_first_session_as_written(tmp_path: Path) -> None:
    """The session's shell commands and its Python client, against ``caspian serve`` on the
    default data directory, from another directory, with nothing but the README's steps."""
    xdg = tmp_path / "xdg"
    default_data_dir = xdg / "caspian"
    xdg.mkdir()
    served = Started(
        default_data_dir,
        "serve",
        "--port",
        "0",
        labels=("Caspian REST API", "Caspian stream", "Caspian data dir"),
        env={"XDG_DATA_HOME": str(xdg), "CASPIAN_LOG_LEVEL": "warning"},
    )
    try:
        assert served.printed["Caspian data dir"] == str(default_data_dir)
        address = served.url("Caspian REST API").removeprefix("http://").removesuffix("/v1")

        session = section("A first session")
        commands = next(block for block in blocks(session, "sh") if "TOKEN=$(" in block)
        assert DEFAULT_ADDRESS in commands
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        # No CASPIAN_* variable: the commands find the server's store by themselves.
        env = {name: value for name, value in os.environ.items() if not name.startswith("CASPIAN_")}
        env["XDG_DATA_HOME"] = str(xdg)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        script = commands.replace(DEFAULT_ADDRESS, address) + '\nprintf "TOKEN=%s\\n" "$TOKEN"\n'
        ran = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            env=env,
            cwd=elsewhere,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        # Not a new store: the one the server made and uses.
        assert ran.stderr == ""
        assert '{"name":"Gemini","code":"GEMINI"}' in ran.stdout
        assert '"caspianCode":"FX-ETH/USD=GEMINI"' in ran.stdout
        token = re.findall(r"^TOKEN=(\S+)$", ran.stdout, re.MULTILINE)
        assert len(token) == 1 and token[0].count(".") == 2, ran.stdout

        (client_code,) = [code for code in blocks(session, "python") if "websockets" in code]
        assert f"ws://{DEFAULT_ADDRESS}/v1/stream" in client_code
        client = tmp_path / "client.py"
        client.write_text(client_code.replace(DEFAULT_ADDRESS, address))
        run_line = next(block for block in blocks(session, "sh") if "client.py" in block)
        assert run_line.strip() == 'python client.py "$TOKEN"'
        printed = run_client(client, token[0], env)
    finally:
        served.stop()
    assert any(line.startswith("Level1 connected bid ") for line in printed), printed
    level2 = [line for line in printed if line.startswith("Level2 connected bids [")]
    assert level2, printed
    book = re.fullmatch(r"Level2 connected bids \[(.*)\] asks \[(.*)\]", level2[-1])
    assert book is not None
    assert [len(side.split(", ")) for side in book.groups()] == [5, 5], level2[-1]


def run_client(client: Path, token: str, env: dict[str, str]) -> list[str]:
    """Run the README's client until it printed a Level1 and a whole Level2 book, then stop
    it with Ctrl-C, as the README says; its lines."""
    process = subprocess.Popen(
        [sys.executable, str(client), token],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=client.parent,
    )
    lines: list[str] = []
    stdout = process.stdout
    assert stdout is not None

    def pump() -> None:
        for line in stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if any(line.startswith("Level1 ") for line in lines) and any(
                line.startswith("Level2 ") and line.count(",") >= 8 for line in lines
            ):
                break
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(5)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    return lines
