"""scripts/gpu-check as an operator runs it, and the batched JPEG decode it measures (bench/jpeg_batch.py).

Without a GPU: CUDA asked for and absent must fail loudly; `--device cpu` runs every step as a labelled dry run
against the real RabbitMQ and writes one JSON file; the table is printed from a recorded file; the budget
stops the run. The decode is checked against Pillow, pixel for pixel, on the CPU, and on CUDA when present.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.jpeg_batch import decode_jpegs
from inspector.errors import FrameError
from inspector.tools import samples
from inspector.worker.decode import DecodeLimits

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-check"
LIMITS = DecodeLimits(max_image_bytes=8 * 2**20, max_image_pixels=4096 * 4096)
EVERY_STEP = ("cuda tests", "bench batch 2 fp32", "bench batch 2 fp16", "precision fp32 vs fp16",
              "jpeg decode cpu vs gpu", "onnx providers", "null-plugin ceiling", "whole path (jpeg)")


def gpu_check(*args: str, timeout: float = 500) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=timeout, check=False)


def strict_json(path: Path) -> dict:
    """The file as JSON, refusing NaN and Infinity (not JSON, though Python writes them)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


# -- the script --------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here: it cannot be absent")
def test_cuda_asked_for_and_absent_fails_loudly_and_is_recorded(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    done = gpu_check("--out", str(out), timeout=120)

    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    first = done.stderr.strip().splitlines()[0]
    assert first.startswith("gpu-check: error: --device cuda asked for") and "no CUDA device" in first
    assert "--device cpu" in first and "does not skip" in first
    document = strict_json(out)
    assert document["ok"] is False and document["dry_run"] is False
    assert [s["name"] for s in document["steps"]] == ["cuda present"]
    assert document["steps"][0]["status"] == "failed" and document["failed"] == ["cuda present"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("gpu-check") / "dry.json"
    return gpu_check("--device", "cpu", "--out", str(out), "--budget-s", "600"), out


@pytest.mark.slow  # the whole script, small, on the CPU: about 3 minutes here
def test_dry_run_on_the_cpu_writes_every_step_and_labels_itself(dry_run) -> None:
    done, out = dry_run
    assert done.returncode == 0, done.stdout + done.stderr
    document = strict_json(out)
    assert document["schema"] == "inspector.gpu-check/1" and document["dry_run"] is True
    assert "DRY RUN" in document["note"] and "DRY RUN" in done.stdout
    steps = {s["name"]: s for s in document["steps"]}
    assert tuple(steps) == EVERY_STEP
    assert all(s["status"] == "ok" for s in steps.values()), {n: s["detail"] for n, s in steps.items()}
    assert document["ok"] is True and document["failed"] == []
    assert document["seconds"] <= document["budget_s"]

    assert steps["cuda tests"]["result"]["collected"] >= 2  # collected, not run, on the CPU
    for precision in ("fp32", "fp16"):
        sweep = steps[f"bench batch 2 {precision}"]["result"]
        assert sweep["precision"] == precision and sweep["batch_size"] == 2
        assert sweep["raw_images_per_second"] > 0 and sweep["decode_frames_per_second"] > 0
        assert math.isclose(sweep["ms_per_batch"], 2000 / sweep["raw_images_per_second"], rel_tol=0.01)
    figures = steps["precision fp32 vs fp16"]["result"]["precisions"]
    assert figures["fp32"]["max_probability_difference"] == 0 and figures["fp32"]["speed_vs_fp32"] == 1
    assert 0.5 <= figures["fp32"]["auroc_fitted_in_precision"] <= 1
    decode = steps["jpeg decode cpu vs gpu"]["result"]
    assert {r["way"] for r in decode["rows"]} == {"pillow reduced", "pillow full", "torchvision"}
    assert decode["max_level_difference"]["decode_on_device_vs_pillow_full"] == 0
    assert [r["way"] for r in steps["onnx providers"]["result"]["rows"]] == ["torch fp32", "onnxruntime CPU fp32"]
    for name in ("null-plugin ceiling", "whole path (jpeg)"):
        assert steps[name]["result"]["saturation_frames_per_second"] > 0
    assert steps["null-plugin ceiling"]["result"]["plugin"] == "null"


def test_the_providers_step_runs_the_exported_backbone_beside_torch_and_never_falls_back() -> None:
    """On the CPU the CPU provider stands in for the GPU ones: the plumbing, the parity and the labels (in this
    process: the script's own function, as its --providers-step runs it)."""
    loader = importlib.machinery.SourceFileLoader("gpu_check_script", str(SCRIPT))
    script = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(script)
    found = json.loads(json.dumps(script.providers_step("cpu", batch=2, rounds=1, size=64)))  # JSON, as printed
    assert found["dry_run"] is True and found["backbone"].endswith("blocks.4+blocks.6")
    rows = {r["way"]: r for r in found["rows"]}
    assert set(rows) == {"torch fp32", "onnxruntime CPU fp32"}
    assert rows["torch fp32"]["max_feature_difference_share"] == 0
    assert 0 < rows["onnxruntime CPU fp32"]["max_feature_difference_share"] <= 1e-4  # float32 noise, not equality
    assert all(r["within_tolerance"] and r["images_per_second"] > 0 for r in rows.values())


@pytest.mark.slow  # the whole script, small, on the CPU: about 3 minutes here
def test_the_table_is_printed_from_a_recorded_run(dry_run, tmp_path: Path) -> None:
    _, out = dry_run
    document = strict_json(out)
    shown = gpu_check("--table", str(out), timeout=60)
    assert shown.returncode == 0, shown.stderr
    for step in document["steps"]:
        line = next(line for line in shown.stdout.splitlines() if line.strip().startswith(step["name"]))
        assert step["status"] in line and f"{step['seconds']:.1f}" in line
    sweep = document["steps"][1]["result"]
    assert f"{sweep['raw_images_per_second']:.1f}" in shown.stdout
    assert shown.stdout.rstrip().endswith("gpu-check: passed")

    document["steps"][2]["status"] = "failed"  # a recorded failure keeps its exit status
    document["failed"], document["ok"] = [document["steps"][2]["name"]], False
    failed = tmp_path / "failed.json"
    failed.write_text(json.dumps(document))
    shown = gpu_check("--table", str(failed), timeout=60)
    assert shown.returncode == 1
    assert shown.stdout.rstrip().endswith(f"gpu-check: FAILED: {document['steps'][2]['name']}")

    (tmp_path / "other.json").write_text('{"schema": "inspector.bench/1"}')
    refused = gpu_check("--table", str(tmp_path / "other.json"), timeout=60)
    assert refused.returncode == 2 and "not a gpu-check record" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow  # 30 s of budget by its nature; the GPU check is run by hand on a device
def test_the_budget_stops_the_run_and_the_steps_left_fail(tmp_path: Path) -> None:
    out = tmp_path / "short.json"
    done = gpu_check("--device", "cpu", "--out", str(out), "--budget-s", "30", timeout=120)
    assert done.returncode == 1
    document = strict_json(out)
    statuses = {s["name"]: s["status"] for s in document["steps"]}
    assert tuple(statuses) == EVERY_STEP  # every step is recorded, run or not
    assert {"timeout", "not_run"} & set(statuses.values()), statuses
    assert document["seconds"] <= 30 + 15  # the budget, plus the quick probes between steps
    assert set(document["failed"]) == {n for n, s in statuses.items() if s in ("failed", "timeout", "not_run")}


def test_a_skipped_cuda_test_fails_the_tests_step() -> None:
    """The tests step as it runs on a GPU machine, here where every cuda test is skipped: a skip is a failure."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(SCRIPT))
    script = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(script)
    run = script.Run(300, {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")})
    script.step_tests(run, dry=False)

    (step,) = run.steps
    if torch.cuda.is_available():
        assert step.status == "ok" and step.result["skipped"] == 0, step.detail
        return
    assert step.status == "failed" and "a skip on a CUDA machine is a failure" in step.detail
    assert step.result["tests"] >= 2 and step.result["skipped"] == step.result["tests"] and step.result["passed"] == 0


# -- the batched JPEG decode ---------------------------------------------------------------------------------


def _jpeg(pixels: np.ndarray, mode: str | None = None, **options) -> bytes:
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _pillow(body: bytes) -> np.ndarray:
    """The reference: Pillow's own full-size decode to RGB."""
    with Image.open(io.BytesIO(body)) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return samples.make_images(3, seed=11, size=160)


def test_jpegs_decode_on_the_cpu_exactly_as_pillow_does(frames) -> None:
    bodies = [_jpeg(frames[0], quality=90), _jpeg(frames[1][:, :, 0]), _jpeg(frames[2], "CMYK"),
              _jpeg(frames[0], progressive=True), _jpeg(frames[1][:100], subsampling=0)]
    decoded = decode_jpegs(bodies, LIMITS)
    assert len(decoded) == len(bodies)
    for body, image in zip(bodies, decoded):
        assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.device.type == "cpu"
        np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), _pillow(body))


def test_a_bad_frame_fails_alone_in_its_place(frames) -> None:
    good = _jpeg(frames[0])
    png = io.BytesIO()
    Image.fromarray(frames[1]).save(png, format="PNG")
    big = _jpeg(np.zeros((300, 300, 3), np.uint8))
    bodies = [good, good[: len(good) // 2], b"", b"not an image", png.getvalue(), big, good]
    limits = DecodeLimits(max_image_bytes=LIMITS.max_image_bytes, max_image_pixels=200 * 200)

    decoded = decode_jpegs(bodies, limits)
    codes = [d.code if isinstance(d, FrameError) else None for d in decoded]
    assert codes == [None, "image_undecodable", "empty_body", "image_undecodable", None, "image_too_many_pixels",
                     None]
    for i in (0, 6):
        np.testing.assert_array_equal(decoded[i].permute(1, 2, 0).numpy(), _pillow(good))
    np.testing.assert_array_equal(decoded[4].permute(1, 2, 0).numpy(), frames[1])  # PNG: Pillow's path
    assert "worker.max_image_pixels" in str(decoded[5])
    too_large = decode_jpegs([good], DecodeLimits(max_image_bytes=len(good) - 1, max_image_pixels=10**6))[0]
    assert isinstance(too_large, FrameError) and too_large.code == "image_too_large"


def test_the_decode_bench_refuses_cuda_without_it_clearly() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present here")
    done = subprocess.run([sys.executable, "bench/jpeg_decode_device.py", "--device", "cuda"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "no CUDA device" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.cuda
def test_jpegs_decode_on_cuda_in_one_batch_close_to_pillow(frames) -> None:
    bodies = [_jpeg(f, quality=90) for f in frames] + [_jpeg(frames[0][:, :, 0])]
    decoded = decode_jpegs(bodies, LIMITS, "cuda")
    for body, image in zip(bodies, decoded):
        assert isinstance(image, torch.Tensor) and image.is_cuda and image.dtype == torch.uint8
        difference = np.abs(image.permute(1, 2, 0).cpu().numpy().astype(int) - _pillow(body).astype(int))
        # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: close, not equal
        assert difference.mean() <= 1.5 and np.percentile(difference, 99.9) <= 16, (difference.mean(),
                                                                                   difference.max())


@pytest.mark.cuda
def test_a_bad_frame_fails_alone_on_cuda_too(frames) -> None:
    good = _jpeg(frames[0])
    decoded = decode_jpegs([good, good[: len(good) // 2], _jpeg(frames[1], "CMYK"), good], LIMITS, "cuda")
    assert isinstance(decoded[1], FrameError) and decoded[1].code == "image_undecodable"
    for i in (0, 2, 3):
        assert isinstance(decoded[i], torch.Tensor) and decoded[i].is_cuda and decoded[i].shape == (3, 160, 160)
