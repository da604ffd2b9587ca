"""Fixtures for the backend's tests: moto's SSM server on loopback, the real
ssmfs binary mounted in a temporary directory, and Apache Airflow from PyPI
configured only through environment variables. Nothing reaches real AWS.

Under CI (CI=true) a missing component fails the run with a clear message;
elsewhere the tests that need it are skipped with the same message.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
# Airflow reads its home at import time: point it at a scratch directory first.
_HOME = tempfile.mkdtemp(prefix="ssmfs-airflow-home-")
os.environ.update(
    {
        "AIRFLOW_HOME": _HOME,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": os.path.join(_HOME, "dags"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }
)


def require(ok: bool, what: str) -> None:
    """Fails under CI, skips elsewhere, when a real component is missing."""
    if ok:
        return
    message = f"{what} is required; run scripts/setup.sh (as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def ssmfs_binary() -> Path:
    return Path(os.environ.get("SSMFS_BIN", REPO / "target" / "debug" / "ssmfs"))


def is_mount_point(path: Path) -> bool:
    wanted = str(path)
    with open("/proc/self/mountinfo") as info:
        return any(line.split(" ")[4] == wanted for line in info)


class Moto:
    """moto's server, with its API requests counted from its access log."""

    def __init__(self) -> None:
        binary = REPO / ".venv" / "bin" / "moto_server"
        require(binary.exists(), f"moto ({binary})")
        self.port = 0  # moto picks a free port; a port picked here could be taken first
        self.log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])
        self.process = None
        self.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Starts moto on self.port (0: any) and waits for its "Running on" line."""
        ready = "Running on http://127.0.0.1:"
        before = self.log.read_text().count(ready)
        binary = REPO / ".venv" / "bin" / "moto_server"
        self.process = subprocess.Popen(
            [str(binary), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "a"),
        )
        deadline = time.monotonic() + 20
        while True:
            text = self.log.read_text()
            match = re.match(r"\d+", "".join(text.split(ready)[before + 1 :][:1]))
            if match:
                try:
                    socket.create_connection(("127.0.0.1", int(match[0])), timeout=0.2).close()
                    self.port = int(match[0])
                    return
                except OSError:
                    pass
            assert self.process.poll() is None, f"moto exited before it listened:\n{text}"
            assert time.monotonic() < deadline, f"moto did not start:\n{text}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()

    def requests(self) -> int:
        """API requests answered so far (one access-log line each)."""
        time.sleep(0.1)  # let the last line land
        return sum('"POST /' in line for line in self.log.read_text().splitlines())

    def client(self):
        import boto3

        return boto3.client("ssm", endpoint_url=self.endpoint, region_name="us-east-1")


class Mount:
    """`ssmfs --foreground --airflow-kwargs KWARGS <dir>`, unmounted at the end."""

    def __init__(self, moto: Moto, kwargs: dict, extra: list[str] | None = None) -> None:
        binary = ssmfs_binary()
        require(binary.exists(), f"the ssmfs binary ({binary}; build it with cargo build)")
        require(os.path.exists("/dev/fuse") and os.geteuid() == 0, "/dev/fuse with root")
        self.dir = Path(tempfile.mkdtemp(prefix="ssmfs-airflow-"))
        self.path = self.dir / "mnt"
        self.path.mkdir()
        self.log = self.dir / "ssmfs.log"
        self.kwargs = kwargs
        self.process = subprocess.Popen(
            [
                str(binary),
                "--foreground",
                "--endpoint-url",
                moto.endpoint,
                *(extra or []),
                "--airflow-kwargs",
                json.dumps(kwargs),
                str(self.path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),
        )
        deadline = time.monotonic() + 20
        while not is_mount_point(self.path):
            assert self.process.poll() is None, f"ssmfs exited: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"never mounted: {self.log.read_text()}"
            time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        self.process.send_signal(sig)
        self.process.wait()

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill(signal.SIGTERM)
        if is_mount_point(self.path):
            subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture(scope="session")
def moto():
    server = Moto()
    yield server
    server.stop()


@pytest.fixture
def mount(moto):
    """Factory: mount(kwargs, extra flags, server) -> Mount, all unmounted
    after the test. The server is the session's moto unless one is given."""
    mounts = []

    def make(kwargs: dict, extra: list[str] | None = None, server: Moto | None = None) -> Mount:
        m = Mount(server or moto, kwargs, extra)
        mounts.append(m)
        return m

    yield make
    for m in mounts:
        m.close()


def airflow_env(mountpoint: Path, kwargs: dict | None = None, **extra: str) -> dict:
    """The environment of an Airflow process whose only secrets backend is ssmfs."""
    env = dict(os.environ)
    env["AIRFLOW__SECRETS__BACKEND"] = "ssmfs_airflow.SsmfsSecretsBackend"
    env["AIRFLOW__SECRETS__BACKEND_KWARGS"] = json.dumps({"mountpoint": str(mountpoint), **(kwargs or {})})
    env.update(extra)
    return env


def airflow_bin() -> str:
    return str(Path(sys.executable).parent / "airflow")


@pytest.fixture(scope="session")
def seeded(moto):
    """moto holding tests/data.py's parameters."""
    from data import seed

    seed(moto.client())
    return moto
