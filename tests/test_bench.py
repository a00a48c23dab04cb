"""`inspector bench` as an operator runs it: the real CLI in a subprocess, against the real RabbitMQ, on small
frames and a small model input so it stays quick on two cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from inspector import config
from inspector.errors import ConfigError
from inspector.tools.bench.run import BenchOptions

ROOT = Path(__file__).resolve().parents[1]


def bench(tmp_path: Path, *args: str, broker_url: str | None = None, timeout: float = 180, maps: bool = False):
    # no localisation maps: the bench's throwaway fit would pay their own backbone pass, and no stage draws them
    # (but --failing's regions do: `maps`)
    lines = ['device = "cpu"', "[plugins.dfkde]", "input_size = 64", f"localisation_maps = {str(maps).lower()}"]
    if broker_url:
        lines += ["[broker]", f'url = "{broker_url}"']
    config = tmp_path / "inspector.toml"
    config.write_text("\n".join(lines) + "\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    return subprocess.run([sys.executable, "-m", "inspector.cli", "bench", "--config", str(config), *args],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout, check=False)


def bench_queues(prefix: str = "bench-") -> set[str]:
    """Names of a bench's queues still on the broker (a bench deletes its own at the end): those of the run whose
    names start `prefix` (its report's settings.queue_prefix), so another bench running beside it is not counted."""
    listing = subprocess.run(["rabbitmqctl", "-q", "list_queues", "name"], capture_output=True, text=True,
                             timeout=60, check=False)
    return {line.strip() for line in listing.stdout.splitlines() if line.strip().startswith(prefix)}


def printed_prefix(table: str) -> str:
    """The broker names a bench's table says it used."""
    found = re.search(r"broker names (bench-[0-9a-f]{8})\.\*, deleted at the end", table)
    assert found, table
    return found.group(1) + "."


def test_bench_through_the_broker_reports_every_stage_and_loses_no_frame(tmp_path: Path) -> None:
    result = bench(tmp_path, "--resolution", "128", "--encoding", "jpeg", "--frames", "30", "--half-load-s", "3",
                   "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert report["schema"] == "inspector.bench/1"
    assert set(report) >= {"machine", "settings", "frames", "raw", "decode", "broker", "targets", "seconds"}
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["torch"] and machine["device"] == "cpu"
    settings = report["settings"]
    assert settings["input_size"] == 64 and settings["backbone"] == "tf_efficientnet_lite0"
    assert settings["batch_size"] == config.WorkerSettings().batch_size and settings["precision"] == "fp32"
    assert report["frames"]["resolution"] == 128 and report["frames"]["encodings"] == ["jpeg"]

    assert report["raw"]["images_per_second"] > 0 and len(report["raw"]["measurements"]) == 2
    assert report["decode"]["jpeg"]["frames_per_second"] > 0
    saturation, half = report["broker"]["jpeg"]["saturation"], report["broker"]["jpeg"]["half_load"]
    for phase in (saturation, half):
        assert (phase["missing"], phase["duplicates"], phase["errors"], phase["unexpected"]) == (0, 0, 0, 0)
        assert phase["frames_per_second"] > 0 and phase["batches"] >= 1
    assert saturation["frames"] == 30
    assert saturation["ratio_to_raw"] > 0
    assert half["frames"] >= 1 and half["rate_hz"] > 0
    latency = half["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert abs(half["p99_over_p50"] - latency["p99"] / latency["p50"]) < 0.01

    targets = {t["target"]: t for t in report["targets"]}
    assert set(targets) == {"throughput", "latency"}
    assert targets["throughput"]["pass"] == (saturation["ratio_to_raw"] >= 0.85)
    assert targets["latency"]["pass"] == (half["p99_over_p50"] <= 3.0)
    assert report["settings"]["queue_prefix"].startswith("bench-")
    assert bench_queues(report["settings"]["queue_prefix"] + ".") == set()  # its quorum queues are deleted


@pytest.mark.slow  # 13 s; stages 1 and 2 run in every bench test, and --skip-broker in the runtimes one
def test_bench_without_the_broker_prints_stages_1_and_2(tmp_path: Path) -> None:
    # a broker URL nobody listens on: --skip-broker must not need one
    result = bench(tmp_path, "--resolution", "96", "--encoding", "jpeg,png", "--skip-broker",
                   broker_url="amqp://guest@127.0.0.1:1/%2F")
    assert result.returncode == 0, result.stderr
    table = result.stdout
    assert "1  raw plugin" in table and "images/s" in table
    assert table.count("2  decode + prepare") == 2
    assert "skipped (--skip-broker)" in table and "targets" not in table
    assert "Traceback" not in result.stderr


def test_bench_runs_each_runtime_and_puts_them_side_by_side(tmp_path: Path) -> None:
    result = bench(tmp_path, "--resolution", "64", "--encoding", "jpeg", "--skip-broker", "--json",
                   "--runtime", "torch,openvino", "--rounds", "2", broker_url="amqp://guest@127.0.0.1:1/%2F")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [row["runtime"] for row in data["runtimes"]] == ["torch", "openvino"]
    assert data["rounds"] == 2 and all([r["settings"]["runtime"] for r in reports] == ["torch", "openvino"]
                                       for reports in data["reports"])
    for row, column in zip(data["runtimes"], range(2)):  # the median of the rounds, in the order they ran
        rates = [reports[column]["raw"]["images_per_second"] for reports in data["reports"]]
        assert row["raw_rounds"] == rates and row["raw_images_per_second"] == round(sum(rates) / 2, 3)
    torch_rate, openvino_rate = (row["raw_images_per_second"] for row in data["runtimes"])
    assert torch_rate > 0 and openvino_rate > 0
    assert data["runtimes"][1]["raw_vs_first"] == round(openvino_rate / torch_rate, 2)


@pytest.mark.parametrize(("runtime", "message"), [
    ("tensorrt", "plugins.dfkde.runtime"), ("torch,torch", "name each runtime once"),
    ("torch --rounds 0", "--rounds 0"),
])
def test_a_bad_runtime_is_a_usage_error_before_anything_runs(tmp_path: Path, runtime: str, message: str) -> None:
    result = bench(tmp_path, "--skip-broker", "--runtime", *runtime.split(), timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert "fitting" not in result.stderr  # refused before the throwaway model is fitted


def test_bench_without_a_broker_says_so_in_one_line(tmp_path: Path) -> None:
    result = bench(tmp_path, "--resolution", "64", broker_url="amqp://guest@127.0.0.1:1/%2F")
    assert result.returncode == 1
    assert "--skip-broker" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("options", "message"), [
    ({"encodings": ["gif"]}, "--encoding 'gif'"),
    ({"encodings": ["jpeg", "jpeg"]}, "named twice"),
    ({"resolution": 16}, "--resolution 16"),
    ({"frames": 0}, "--frames 0"),
    ({"half_load_s": 0}, "--half-load-s 0"),
    ({"batch_size": 0}, "--batch-size 0"),
    ({"failing": [0]}, "--failing 0"),
    ({"failing": [1.5]}, "--failing 1.5"),
    ({"failing": [0.1, 0.1]}, "named twice"),
    ({"failing": [0.1], "skip_broker": True}, "--skip-broker"),
    ({"failing": [0.1], "plugin": "null"}, "null plugin"),
])
def test_bad_options_are_usage_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        BenchOptions(**options).check()
    assert caught.value.exit_code == 2


@pytest.mark.slow  # 40 s; the whole path per stage is also measured by the broker and --failing tests
def test_the_null_plugin_bench_measures_the_path_per_stage_and_rabbitmq_alone(tmp_path: Path) -> None:
    from inspector.tools.bench.cpu_stages import STAGES
    from inspector.worker import hooks

    result = bench(tmp_path, "--plugin", "null", "--resolution", "96", "--encoding", "mono8,jpeg:64", "--frames", "24",
                   "--half-load-s", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["plugin"] == "null" and report["targets"] == []
    assert report["frames"]["resolutions"] == {"mono8": 96, "jpeg:64": 64}
    assert report["frames"]["bytes"]["mono8"] == 96 * 96  # one byte a pixel, as a mono camera sends it
    for kind in ("mono8", "jpeg:64"):
        run = report["broker"][kind]
        saturation, alone = run["saturation"], run["rabbitmq_alone"]
        assert (saturation["missing"], saturation["errors"], saturation["duplicates"]) == (0, 0, 0)
        cpu = saturation["cpu"]
        assert list(cpu["stages_us"]) == [stage for stage, _, _ in STAGES]
        assert all(value >= 0 for value in cpu["stages_us"].values())
        assert cpu["stages_us"]["decode"] > 0 and cpu["stages_us"]["pika I/O"] > 0
        # the stages share out the threads' CPU: wrapped stages plus each thread's remainder
        assert abs(sum(cpu["stages_us"].values()) - cpu["total_us"]) <= 0.1 * len(STAGES) + 0.01 * cpu["total_us"]
        assert abs(sum(cpu["threads_us"].values()) - cpu["total_us"]) <= 0.5
        assert cpu["without_image_decode_us"] == pytest.approx(cpu["total_us"] - cpu["stages_us"]["decode"], abs=0.2)
        # through the worker's stage hooks: consume, hand-off, parse, decode, prepare, result encode and settled once a
        # frame; score, publish, confirm and ack once a batch; each seen
        assert cpu["wrapped_calls_per_frame"] >= 7
        assert all(cpu["stages_us"][stage] > 0 for stage in hooks.STAGES), cpu["stages_us"]
        assert (alone["frames"], alone["received"], alone["failure"]) == (24, 24, None)
        assert alone["frames_per_second"] > 0 and alone["cpu_us"] > 0
    table = bench(tmp_path, "--plugin", "null", "--resolution", "64", "--encoding", "jpeg", "--frames", "8",
                  "--half-load-s", "1")
    assert table.returncode == 0, table.stderr
    assert "null plugin" in table.stdout and "3r RabbitMQ alone" in table.stdout and "pika I/O" in table.stdout
    assert "targets" not in table.stdout.splitlines()  # no model: nothing to hold the path to
    # its queues, the RabbitMQ-alone one included, are deleted, in both runs
    assert bench_queues(report["settings"]["queue_prefix"] + ".") == set()
    assert bench_queues(printed_prefix(table.stdout)) == set()


def test_failing_frames_measure_regions_off_and_on_side_by_side(tmp_path: Path) -> None:
    """A quarter of the frames defective (PNG, so the small throwaway model sees every defect): both sides lose no
    frame, fail about that share, and only the regions-on side's fail results carry regions."""
    from inspector.tools.bench.options import failing_frame

    result = bench(tmp_path, "--resolution", "128", "--encoding", "png,jpeg", "--frames", "40", "--half-load-s", "1",
                   "--failing", "0.25", "--json", maps=True)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["settings"]["failing"] == [0.25] and report["settings"]["region_level"] > 0
    assert set(report["broker"]["png"]) >= {"saturation", "half_load", "failing"}  # the all-good run stays
    # JPEG frames decode unlike the PNG frames the model was fitted on: no verdicts are judged there
    assert "saturation" in report["broker"]["jpeg"] and "failing" not in report["broker"]["jpeg"]
    runs = report["broker"]["png"]["failing"]["0.25"]
    assert set(runs) == {"regions_off", "regions_on"}
    defective_sat = sum(failing_frame(i, 0.25) for i in range(40))
    assert defective_sat == 10
    for side, runs_side in runs.items():
        saturation, half = runs_side["saturation"], runs_side["half_load"]
        for phase in (saturation, half):
            assert (phase["missing"], phase["duplicates"], phase["errors"], phase["unexpected"]) == (0, 0, 0, 0)
            seen = phase["verdicts"]
            assert seen["defective"] == sum(failing_frame(i, 0.25) for i in range(phase["frames"]))
            assert abs(seen["fail_share"] - 0.25) <= 0.1, (side, seen)
            assert seen["fails"] == seen["defective_failed"] + seen["good_failed"]
            assert seen["fails_with_regions"] == (seen["fails"] if side == "regions_on" else 0)
        assert saturation["frames"] == 40 and saturation["frames_per_second"] > 0
        assert saturation["verdicts"]["defective"] == defective_sat
        fail, good = half["latency_ms_fail"], half["latency_ms_pass"]
        assert fail["frames"] == half["verdicts"]["fails"] >= 1 and fail["frames"] + good["frames"] == half["frames"]
        assert 0 < fail["p50"] <= fail["p95"] and 0 < good["p50"] <= good["p95"]
    # both half loads run at the same rate: half the regions-off saturation rate
    assert runs["regions_on"]["half_load"]["rate_hz"] == runs["regions_off"]["half_load"]["rate_hz"]
    assert runs["regions_off"]["half_load"]["rate_hz"] == pytest.approx(
        runs["regions_off"]["saturation"]["frames_per_second"] / 2, rel=0.01)
    assert bench_queues(report["settings"]["queue_prefix"] + ".") == set()


def test_failing_shares_spread_defective_frames_evenly() -> None:
    import itertools

    from inspector.tools.bench.options import failing_frame

    for share, frames in ((0.01, 1000), (0.1, 250), (0.25, 40), (1.0, 7)):
        marked = [i for i in range(frames) if failing_frame(i, share)]
        assert len(marked) == round(share * frames)
        gaps = {b - a for a, b in itertools.pairwise(marked)}
        assert gaps <= {round(1 / share)}, gaps  # evenly: one every 1/share frames


def test_a_failing_share_that_is_not_a_number_is_a_usage_error(tmp_path: Path) -> None:
    result = bench(tmp_path, "--failing", "0.1,lots", timeout=60)
    assert result.returncode == 2 and "--failing 'lots'" in result.stderr and "Traceback" not in result.stderr


def test_an_unknown_plugin_is_a_usage_error_naming_those_installed(tmp_path: Path) -> None:
    result = bench(tmp_path, "--plugin", "nosuch", "--skip-broker")
    assert result.returncode == 2
    assert "nosuch" in result.stderr and "null" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(("encodings", "message"), [
    (["jpeg:abc"], "must be a number of pixels"),
    (["jpeg:16"], "at least"),
    (["raw:64"], "--encoding 'raw'"),
])
def test_bad_frame_kinds_are_usage_errors(encodings: list, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        BenchOptions(encodings=encodings).check()


CASE_MODULE = '''
import time

from hostile import Case


def allocate():
    block = bytearray(300 * 1024 * 1024)
    block[::4096] = b"x" * len(block[::4096])  # touched, so resident
    return f"{len(block) >> 20} MiB"


def forever():
    while True:
        time.sleep(0.05)


def refuse():
    raise ValueError("over | the bound")


CASES = [Case("answered", lambda: "too_large", allocate, unbounded_limit_s=30),
         Case("endless baseline", lambda: None, forever, unbounded_limit_s=1),
         Case("throws", refuse)]
'''


def hostile_inputs(*args: str, package: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/hostile_inputs.py", "--package", str(package), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_the_hostile_inputs_driver_runs_each_case_in_a_process_of_its_own(tmp_path: Path) -> None:
    package = tmp_path / "fakecases"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sample.py").write_text(CASE_MODULE)

    done = hostile_inputs("--only", "n", package=package)  # "answered" and "endless baseline", not "throws"
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in done.stdout.splitlines()
            if line.startswith("| sample: ")}
    assert set(rows) == {"sample: (import only)", "sample: answered", "sample: endless baseline"}
    idle = float(rows["sample: (import only)"][2])
    answered = rows["sample: answered"]
    assert answered[3] == "too_large" and float(answered[2]) < idle + 50  # the bounded run's memory is its own
    assert answered[6] == "300 MiB" and float(answered[5]) >= idle + 290  # and so is the unbounded run's
    assert rows["sample: endless baseline"][4:7] == ["> 1 s", rows["sample: endless baseline"][5], "stopped"]
    assert "--only 'sample: answered'" in answered[7]
    assert "Traceback" not in done.stderr

    skipped = hostile_inputs("--only", "answered", "--skip-unbounded", package=package)
    assert skipped.returncode == 0 and "skipped (--skip-unbounded)" in skipped.stdout

    failing = hostile_inputs("--only", "throws", package=package)
    assert failing.returncode == 1
    assert "raised ValueError: over \\| the bound" in failing.stdout and "no unbounded path" in failing.stdout
    assert "FAILED sample: throws" in failing.stderr

    (package / "broken.py").write_text("import no_such_module\n")
    broken = hostile_inputs("--only", "answered", "--skip-unbounded", package=package)
    assert broken.returncode == 1 and "broken: ModuleNotFoundError" in broken.stderr


@pytest.mark.slow  # 12 s; a benchmark script's own run
def test_the_calibration_twins_benchmark_runs_on_a_tiny_line(tmp_path: Path) -> None:
    """bench/calibration_twins.py end to end on a tiny sample line and a small random-weight model: every archive
    and rule, rates from the fresh good images, exact intervals, and `inspector evaluate` agreeing with it."""
    import math

    import scipy.stats

    from inspector.tools import samples

    samples.write_line(tmp_path / "line", train=24, test=6, defective_per_kind=1, size=64)
    result = subprocess.run(
        [sys.executable, "bench/calibration_twins.py", "--data", str(tmp_path / "line"), "--targets", "0.1,0.2",
         "--refit-target", "0.1", "--json", "--dfkde", "backbone=resnet18", "--dfkde", "weights=none",
         "--dfkde", 'layers=["layer1"]', "--dfkde", "input_size=32", "--dfkde", "n_comps=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fresh_good"] == 6 and set(report["archives"]) == {"plain", "twice"}
    for name, images in (("plain", 24), ("twice", 48)):
        for rule in ("before", "after"):
            measured = report["archives"][name][rule]
            assert measured["images"] == measured["calibration_images"] == images
            for target in ("0.1", "0.2"):
                r = measured["rates"][target]
                assert r["good"] == 6 and 0 <= r["good_failed"] <= 6 and r["rate"] == r["good_failed"] / 6
                exact = scipy.stats.binomtest(r["good_failed"], 6).proportion_ci(0.95, method="exact")
                assert r["interval"] == pytest.approx([exact.low, exact.high], abs=1e-9)
                if rule == "after":
                    k = math.floor(float(target) * (images + 1))
                    assert r["expected"] == pytest.approx(k / (images + 1))
        assert report["archives"][name]["after"]["evaluate_check"]["agrees"]
