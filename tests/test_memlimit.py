"""The worker's memory limit, read from cgroup v2 files laid out as the kernel lays them out, and exported
as `inspector_memory_limit_bytes` on a real scrape: present where a limit is set, absent where none is."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from inspector.config import MetricsSettings
from inspector.logs import Throttle
from inspector.worker.memlimit import memory_limit_bytes
from inspector.worker.metrics import MemoryLimitCollector, Metrics
from tests.test_metrics import request, scrape, value

GiB = 1024**3


def cgroup_tree(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self/cgroup naming `own`, and a /sys/fs/cgroup with `memory.max` files as given (relative
    folder: its content). The root cgroup has no memory.max, as on a real host."""
    root = tmp_path / "sys" / "fs" / "cgroup"
    (root / own.lstrip("/")).mkdir(parents=True)
    for folder, text in limits.items():
        (root / folder.lstrip("/") / "memory.max").write_text(text + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return proc, root


@pytest.mark.parametrize(("own", "limits", "expected"), [
    # systemd: MemoryMax=10G on the unit, the slice unlimited
    ("/system.slice/inspector.service", {"/system.slice": "max", "/system.slice/inspector.service": "10737418240"},
     10 * GiB),
    # Kubernetes: the pod's limit binds its container's, which is higher (or unset)
    ("/kubepods.slice/pod1/ctr", {"/kubepods.slice": "max", "/kubepods.slice/pod1": str(4 * GiB),
                                  "/kubepods.slice/pod1/ctr": "max"}, 4 * GiB),
    ("/kubepods.slice/pod1/ctr", {"/kubepods.slice/pod1": str(8 * GiB), "/kubepods.slice/pod1/ctr": str(6 * GiB)},
     6 * GiB),
    # a container in its own cgroup namespace sees its cgroup as the root, with a memory.max of its own
    ("/", {"/": str(2 * GiB)}, 2 * GiB),
    # compose without mem_limit, a shell: nothing limits it
    ("/user.slice/session-1.scope", {"/user.slice": "max", "/user.slice/session-1.scope": "max"}, None),
    ("/", {}, None),
])
def test_the_limit_is_the_lowest_memory_max_along_the_cgroup_path(tmp_path, own, limits, expected):
    proc, root = cgroup_tree(tmp_path, own, limits)
    assert memory_limit_bytes(proc, root) == expected


def test_no_limit_on_cgroup_v1_or_without_proc(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/docker/abc\n1:cpu:/\n")
    assert memory_limit_bytes(proc, tmp_path) is None
    assert memory_limit_bytes(tmp_path / "absent", tmp_path) is None


def test_a_scrape_exports_the_limit_when_set_and_no_series_when_not(tmp_path):
    proc, root = cgroup_tree(tmp_path, "/system.slice/inspector.service",
                             {"/system.slice/inspector.service": str(10 * GiB)})
    limit = (root / "system.slice" / "inspector.service" / "memory.max")
    metrics = Metrics(MetricsSettings(host="127.0.0.1", port=0))
    metrics.registry.unregister(metrics.memory_limit)
    throttle = Throttle(logging.getLogger(__name__))
    metrics.registry.register(MemoryLimitCollector(throttle, lambda: memory_limit_bytes(proc, root)))
    base = f"http://127.0.0.1:{metrics.serve()}"
    try:
        assert value(scrape(base), "inspector_memory_limit_bytes") == 10 * GiB
        limit.write_text("max\n")  # systemctl set-property inspector MemoryMax=infinity, on the running worker
        samples = scrape(base)
        assert not [name for name, _ in samples if name == "inspector_memory_limit_bytes"]
        assert "# TYPE inspector_memory_limit_bytes gauge" in request(f"{base}/metrics")[1]
    finally:
        metrics.close()


def test_the_worker_registers_the_reader_of_its_own_cgroup():
    """On this host: the figure a default Metrics exports is the one read from the real /proc and /sys."""
    metrics = Metrics(MetricsSettings(port=0))
    (family,) = [f for f in metrics.registry.collect() if f.name == "inspector_memory_limit_bytes"]
    expected = memory_limit_bytes()
    assert [s.value for s in family.samples] == ([] if expected is None else [float(expected)])
