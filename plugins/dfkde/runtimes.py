"""Where the backbone runs: torch eager, ONNX Runtime or OpenVINO. Only the feature extractor moves; the
resize, normalisation, pooling, PCA and the KDE stay in torch.

The graph is exported (torch.onnx, the TorchScript exporter: offline and deterministic, the same bytes for the
same module) from the very torch module the version was built with, after its weights passed the version's
digest check, and rebuilt at every load rather than stored with the version: a stored graph would add its
weights again to every version (12 MB for the shipped backbone) and hand the runtimes' protobuf parsers a file
from the store, with nothing tying it to the digest-checked weights. The graph depends only on the backbone, its
weights, layers and input size, never on the fitted PCA or KDE, so the runners are kept per process by those:
a line's versions share one, and a reload or a refit of the same backbone pays the export (seconds) once.
Between processes, graphcache.py keeps the export on disk, checked against the torch module before use.

Threads are the process's: each runtime gets `torch.get_num_threads()` intra-op threads and no inter-op pool,
so torch, the runtime and the decode pool share the cores the process was given (docs/performance.md).
"""

from __future__ import annotations

import importlib.util
import io
import logging
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from inspector.errors import ConfigError
from inspector_dfkde import graphcache

log = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime", "openvino")
# What each runtime needs installed (the module, and the package to name in the error) beyond torch; the graph
# is exported with torch.onnx, which needs `onnx`.
_PACKAGES = {"onnxruntime": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
# The precisions each runtime offers for the backbone; PCA and the KDE always run in float32.
PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "onnxruntime": ("fp32",), "openvino": ("fp32", "bf16")}
_OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}
_OPSET = 17
_KEPT = 4  # runners kept per process (distinct backbones, sizes, runtimes); each holds its weights once

Runner = Callable[[torch.Tensor], list[torch.Tensor]]


def check_runtime(runtime: str, precision: str, device: torch.device) -> None:
    """ConfigError unless `runtime` is installed and can run `precision` on `device`: never a silent fall back."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"plugins.dfkde.runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return
    if device.type != "cpu":
        raise ConfigError(f"plugins.dfkde.runtime = {runtime!r} runs the backbone on the CPU only, but the device "
                          f"is {device}; use runtime = 'torch' on {device.type} or device = 'cpu'")
    missing = missing_packages(runtime)
    if missing:
        raise ConfigError(f"plugins.dfkde.runtime = {runtime!r} needs the Python package(s) {', '.join(missing)}, "
                          f"not installed: pip install {' '.join(missing)} (or `make setup`), or set "
                          f"runtime = 'torch'")
    if precision not in PRECISIONS[runtime]:
        raise ConfigError(f"plugins.dfkde.precision = {precision!r} is not offered by runtime {runtime!r} "
                          f"(it offers {', '.join(PRECISIONS[runtime])}); choose one of those or runtime 'torch'")
    if runtime == "openvino" and precision == "bf16" and "BF16" not in _openvino_capabilities():
        raise ConfigError("plugins.dfkde.precision = 'bf16' with runtime 'openvino': this CPU has no bf16 "
                          f"(OpenVINO finds {', '.join(_openvino_capabilities())}); use precision 'fp32'")


def missing_packages(runtime: str) -> list[str]:
    """The packages `runtime` needs that are not installed (found without importing them)."""
    return [name for name in _PACKAGES.get(runtime, ()) if importlib.util.find_spec(name) is None]


def _openvino_capabilities() -> list[str]:
    import openvino

    return list(openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


_runners: OrderedDict[tuple, Runner] = OrderedDict()
_graphs: dict[tuple, bytes] = {}
_lock = threading.Lock()


def runner_for(extractor: torch.nn.Module, key: tuple, runtime: str, precision: str, input_size: int) -> Runner:
    """The process's runner of `extractor` on `runtime`, built on first use and kept by `key` (what identifies
    the module: architecture, weights digest, layers) with the runtime, precision, input size and threads."""
    full_key = (*key, runtime, precision, input_size, torch.get_num_threads())
    with _lock:
        if full_key in _runners:
            _runners.move_to_end(full_key)
            return _runners[full_key]
        graph_key = (*key, input_size)
        build = _onnxruntime if runtime == "onnxruntime" else _openvino
        graph, runner = _graphs.get(graph_key), None
        if graph is None:
            graph, runner = _kept_or_exported(extractor, key, input_size, build, precision)
        _graphs.clear()  # the last export only, for the other runtime of the same backbone (a comparison)
        _graphs[graph_key] = graph
        runner = runner or build(graph, precision, torch.get_num_threads())
        _runners[full_key] = runner
        while len(_runners) > _KEPT:
            _runners.popitem(last=False)
        return runner


def _kept_or_exported(extractor: torch.nn.Module, key: tuple, input_size: int, build: Callable[..., Runner],
                      precision: str) -> tuple[bytes, Runner | None]:
    """The graph kept on disk, with its runner, when that runner reproduces the torch module; else a fresh export,
    kept for the next process (a key without a weights digest is never kept: it names no module elsewhere)."""
    name = graphcache.entry_name(key, input_size, _OPSET) if _stable(key) else None
    kept = graphcache.read(name) if name else None
    if kept is not None:
        runner = _checked(build, kept, precision, extractor, input_size)
        if runner is not None:
            return kept, runner
        log.warning("the kept graph %s does not give this backbone's features: exported again", name)
    graph = export_onnx(extractor, input_size)
    if name:
        graphcache.write(name, graph)
    return graph, None


def _stable(key: tuple) -> bool:
    """Whether `key` names the module across processes: a weights digest, not an object's id."""
    return len(key) > 1 and isinstance(key[1], str)


def _checked(build: Callable[..., Runner], graph: bytes, precision: str, extractor: torch.nn.Module,
             input_size: int) -> Runner | None:
    """A runner of a graph read back from the cache, or None unless it reproduces the torch module's features
    on the probe batch (a file that is damaged, or not what its name says, is never served)."""
    probe = graphcache.probe_batch(input_size)
    try:
        runner = build(graph, precision, torch.get_num_threads())
        got = runner(probe)
    except Exception as exc:  # noqa: BLE001 - any runtime's parse or run error means: not this graph
        log.warning("a kept graph did not load (%s: %s)", type(exc).__name__, exc)
        return None
    with torch.inference_mode(False), torch.no_grad():
        expected = [m.float() for m in extractor.eval()(probe)]
    return runner if graphcache.reproduces(got, expected, precision) else None


def export_onnx(extractor: torch.nn.Module, input_size: int) -> bytes:
    """The extractor as an ONNX graph: a batch of any size of normalised 3 x S x S float32 images in, its
    feature maps out, in the order of its layers."""
    example = torch.zeros(2, 3, input_size, input_size)  # two: no batch size of one is baked in
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, on every export
        torch.onnx.export(extractor.eval(), (example,), buffer, dynamo=False, input_names=["images"],
                          dynamic_axes={"images": {0: "batch"}}, opset_version=_OPSET, do_constant_folding=True)
    return buffer.getvalue()


def _as_input(batch: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(batch.detach().to("cpu", torch.float32).numpy())


def _onnxruntime(graph: bytes, precision: str, threads: int) -> Runner:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    # no spinning between calls: the decode pool needs those cores while a batch is being gathered
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def run(batch: torch.Tensor) -> list[torch.Tensor]:  # InferenceSession.run is thread safe
        return [torch.from_numpy(out) for out in session.run(None, {"images": _as_input(batch)})]

    return run


def _openvino(graph: bytes, precision: str, threads: int) -> Runner:
    import openvino

    core = openvino.Core()
    compiled = core.compile_model(core.read_model(graph), "CPU", {
        "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision], "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
    })
    local = threading.local()  # an infer request serves one call at a time: one per calling thread

    def run(batch: torch.Tensor) -> list[torch.Tensor]:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        request.infer([_as_input(batch)])
        # the request's output buffers are reused by its next call: copied out
        return [torch.from_numpy(np.array(request.get_output_tensor(i).data)) for i in range(len(compiled.outputs))]

    return run
