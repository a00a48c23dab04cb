"""Choosing a model per capture and refusing a model that does not work: no broker."""

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from inspector.config import ModelSettings, RouteSettings
from inspector.errors import FrameError, StateError
from inspector.plugin import Scores
from inspector.worker.serving import ModelSet, Reloader, ServedModel, warm_up


def served(name):
    return ServedModel(name=name, plugin_name="p", version="v1", threshold=0.5, plugin=None)


def capture(key, model=None):
    return SimpleNamespace(routing_key=key, model=model)


def test_header_then_routes_then_default_choose_the_model():
    models = ModelSet({n: ModelSettings() for n in ("default", "housing", "lid")}, "default",
                      [RouteSettings(match="line2.*", model="housing"), RouteSettings(match="line2.cam9", model="lid")])
    for name in ("default", "housing", "lid"):
        models.put(served(name))
    assert models.choose(capture("line1.cam1")).name == "default"
    assert models.choose(capture("line2.cam9")).name == "housing"  # first match wins
    assert models.choose(capture("line2.cam9", model="lid")).name == "lid"
    with pytest.raises(FrameError) as unknown:
        models.choose(capture("line1.cam1", model="ghost"))
    assert unknown.value.code == "model_unknown" and "ghost" in str(unknown.value)


def test_a_configured_model_without_a_version_is_unavailable():
    models = ModelSet({"default": ModelSettings(), "new": ModelSettings()}, "default", [])
    models.put(served("default"))
    with pytest.raises(FrameError) as unavailable:
        models.choose(capture("a.b", model="new"))
    assert unavailable.value.code == "model_unavailable" and "inspector refit --model new" in str(unavailable.value)


class FakePlugin:
    def __init__(self, probability):
        self.probability = probability

    def prepare(self, image):
        return torch.from_numpy(image).permute(2, 0, 1)

    def score(self, batch):
        p = np.full(len(batch), self.probability)
        return Scores(probability=p, raw=p)


def test_warm_up_refuses_a_model_that_scores_nonsense():
    warm_up(FakePlugin(0.2))
    for bad in (float("nan"), 1.5, -0.1):
        with pytest.raises(StateError):
            warm_up(FakePlugin(bad))


def test_a_refused_version_is_counted_once_and_the_old_one_stays(monkeypatch):
    models = ModelSet({"default": ModelSettings()}, "default", [])
    models.put(served("default"))
    store = SimpleNamespace(current=lambda name: "v2")
    outcomes = []

    def broken(*args, **kwargs):
        raise StateError("checksum mismatch")

    monkeypatch.setattr("inspector.worker.serving.load_version", broken)
    reloader = Reloader(store, models, torch.device("cpu"), 0, on_loaded=lambda s: None,
                        on_outcome=lambda n, o: outcomes.append((n, o)))
    assert reloader.reload("default") is None
    assert reloader.reload("default") is None
    assert outcomes == [("default", "failed")] and models.get("default").version == "v1"


def test_a_version_that_failed_for_a_passing_reason_is_tried_again_after_a_backoff(monkeypatch):
    from inspector.worker import serving

    models = ModelSet({"default": ModelSettings()}, "default", [])
    models.put(served("default"))
    store = SimpleNamespace(current=lambda name: "v2")
    outcomes, attempts = [], []
    clock = [1000.0]

    def flaky(*args, **kwargs):
        attempts.append(clock[0])
        if len(attempts) == 1:
            raise OSError("NFS server not responding")
        if len(attempts) == 2:
            raise RuntimeError("CUDA out of memory")
        return ServedModel(name="default", plugin_name="p", version="v2", threshold=0.5, plugin=None)

    monkeypatch.setattr(serving, "load_version", flaky)
    monkeypatch.setattr(serving.time, "monotonic", lambda: clock[0])
    reloader = Reloader(store, models, torch.device("cpu"), 0, on_loaded=lambda s: None,
                        on_outcome=lambda n, o: outcomes.append((n, o)))
    assert reloader.reload("default") is None  # fails: tried again no sooner than RETRY_FIRST_S
    clock[0] += serving.RETRY_FIRST_S - 1
    assert reloader.reload("default") is None and len(attempts) == 1
    clock[0] += 1
    assert reloader.reload("default") is None and len(attempts) == 2  # fails again: the wait doubles
    clock[0] += 2 * serving.RETRY_FIRST_S
    assert reloader.reload("default").version == "v2"
    assert outcomes == [("default", "failed"), ("default", "failed"), ("default", "success")]
    assert ("default", "v2") not in reloader.refused and not reloader.retry_at


def test_a_batch_for_the_cpu_is_a_plain_stack():
    from inspector.worker.loop import stack_for

    tensors = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(3)]
    batch = stack_for(torch.device("cpu"), tensors)
    assert torch.equal(batch, torch.stack(tensors)) and not batch.is_pinned()


@pytest.mark.cuda
def test_a_batch_for_cuda_is_pinned_for_an_asynchronous_copy():
    from inspector.worker.loop import stack_for

    tensors = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(3)]
    batch = stack_for(torch.device("cuda"), tensors)
    assert batch.is_pinned() and torch.equal(batch, torch.stack(tensors))
    assert torch.equal(batch.to("cuda", non_blocking=True).cpu(), torch.stack(tensors))


def test_a_failing_batch_is_rescored_frame_by_frame_to_find_the_frame_at_fault():
    from inspector.worker.serving import score_batch

    class Picky:
        def score(self, batch):  # fails on any batch holding a frame of 9s; gives NaN for a frame of 7s
            if (batch == 9).any():
                raise RuntimeError("out of memory")
            p = np.where(batch.flatten(1)[:, 0].numpy() == 7, np.nan, 0.25)
            return Scores(probability=p, raw=p * 4)

    model = ServedModel(name="m", plugin_name="picky", version="v", threshold=0.5, plugin=Picky())
    frames = [torch.full((1, 2, 2), v, dtype=torch.uint8) for v in (1, 9, 7, 2)]
    probability, raw, failures = score_batch(model, frames)
    assert probability[0] == 0.25 and raw[3] == 1.0
    assert np.isnan(probability[1]) and "out of memory" in failures[1]
    assert np.isnan(probability[2]) and "gave probability nan" in failures[2]
    assert failures[0] is None and failures[3] is None


def test_maps_come_through_the_same_scoring_and_each_frame_keeps_its_own_after_a_retry():
    from inspector.plugin import Explained
    from inspector.worker.serving import explain_batch

    class Drawing:
        """Scores like Picky (a frame of 9s fails any batch it is in); frame i's map is filled with its value."""

        def score(self, batch):
            raise AssertionError("with maps asked for, the worker scores through explain")

        def explain(self, batch):
            if (batch == 9).any():
                raise RuntimeError("out of memory")
            values = batch.flatten(1)[:, 0].numpy().astype(float)
            scores = Scores(probability=values / 10, raw=values)
            return Explained(scores, lambda i, size: np.full(size[::-1], values[i] / 10, np.float32))

    model = ServedModel(name="m", plugin_name="drawing", version="v", threshold=0.5, plugin=Drawing())
    frames = [torch.full((1, 2, 2), v, dtype=torch.uint8) for v in (1, 9, 3)]
    probability, raw, failures, maps = explain_batch(model, frames)
    np.testing.assert_allclose(probability, [0.1, np.nan, 0.3])
    assert failures[0] is None and "out of memory" in failures[1] and failures[2] is None
    assert maps[1] is None
    assert maps[0]((3, 2)).shape == (2, 3) and float(maps[0]((3, 2)).max()) == pytest.approx(0.1)
    assert float(maps[2]((4, 4)).min()) == pytest.approx(0.3)  # its own map, drawn by its own one-frame call

    healthy = [frames[0], frames[2]]
    _, _, _, maps = explain_batch(model, healthy)
    assert [float(m((1, 1))[0, 0]) for m in maps] == pytest.approx([0.1, 0.3])
    class Blind:
        def score(self, batch):
            return Drawing().explain(batch).scores

    without = ServedModel(name="m", plugin_name="blind", version="v", threshold=0.5, plugin=Blind())
    probability, _, failures, maps = explain_batch(without, healthy)  # a plugin that draws no maps: scores, no maps
    np.testing.assert_allclose(probability, [0.1, 0.3])
    assert failures == [None, None] and maps == [None, None]


# -- failed reloads: passing or final, watched, bounded, and a worker that starts all the same ------------------


def _reloader(store, models, outcomes=None, on_loaded=lambda s: None, poll_s=0):
    return Reloader(store, models, torch.device("cpu"), poll_s, on_loaded=on_loaded,
                    on_outcome=lambda n, o: (outcomes if outcomes is not None else []).append((n, o)))


@pytest.mark.parametrize("passing", [
    lambda: __import__("inspector.errors", fromlist=["x"]).VersionIncomplete("settings.json: missing"),
    lambda: __import__("inspector.errors", fromlist=["x"]).ConfigError("access denied (AccessDenied)"),
    lambda: __import__("inspector.errors", fromlist=["x"]).StoreUnavailable("the store answered 503"),
    lambda: __import__("inspector.errors", fromlist=["x"]).ConfigError("unknown version '20991231T000000Z-abcdef'"),
])
def test_a_lagging_listing_a_403_or_a_read_error_is_tried_again_not_refused_for_ever(monkeypatch, passing):
    from inspector.worker import serving

    models = ModelSet({"default": ModelSettings()}, "default", [])
    models.put(served("default"))
    attempts, clock = [], [1000.0]

    def load(*args, **kwargs):
        attempts.append(clock[0])
        if len(attempts) == 1:
            raise passing()
        return ServedModel(name="default", plugin_name="p", version="v2", threshold=0.5, plugin=None)

    monkeypatch.setattr(serving, "load_version", load)
    monkeypatch.setattr(serving.time, "monotonic", lambda: clock[0])
    reloader = _reloader(SimpleNamespace(current=lambda name: "v2"), models)
    assert reloader.reload("default") is None and ("default", "v2") not in reloader.refused
    clock[0] += serving.RETRY_FIRST_S
    assert reloader.reload("default").version == "v2" and len(attempts) == 2


def test_a_passing_failure_is_retried_by_the_thread_itself_without_a_poll_or_announcement(monkeypatch):
    from inspector.errors import VersionIncomplete
    from inspector.worker import serving

    monkeypatch.setattr(serving, "RETRY_FIRST_S", 0.05)
    models = ModelSet({"default": ModelSettings()}, "default", [])
    attempts = []

    def load(*args, **kwargs):
        attempts.append(1)
        if len(attempts) < 3:
            raise VersionIncomplete("manifest.json: missing")
        return ServedModel(name="default", plugin_name="p", version="v2", threshold=0.5, plugin=None)

    monkeypatch.setattr(serving, "load_version", load)
    reloader = _reloader(SimpleNamespace(current=lambda name: "v2"), models)  # poll_s 0: no polling at all
    reloader.start()
    reloader.request("default")
    deadline = time.monotonic() + 5
    while models.get("default") is None and time.monotonic() < deadline:
        time.sleep(0.02)
    reloader.stop(2)
    assert models.get("default").version == "v2" and len(attempts) == 3


def test_requests_are_coalesced_per_model():
    models = ModelSet({"a": ModelSettings(), "b": ModelSettings()}, "a", [])
    reloader = _reloader(SimpleNamespace(current=lambda name: None), models)
    for _ in range(10_000):
        reloader.request("a")
        reloader.request_all()
    assert reloader.pending == 2


def test_a_reload_hung_on_the_store_is_seen_by_the_watchdog():
    from inspector.worker.watchdog import Watchdog

    hung = threading.Event()
    models = ModelSet({"default": ModelSettings()}, "default", [])
    store = SimpleNamespace(current=lambda name: "v2", load_path=lambda *a, **k: hung.wait(30))
    reloader = _reloader(store, models)
    watchdog = Watchdog()
    reloader.watch(watchdog, limit_s=0.3)
    reloader.start()
    assert watchdog.check() is None  # idle is not stuck
    reloader.request("default")
    time.sleep(0.8)
    try:
        assert "the reload thread has made no progress" in (watchdog.check() or "")
    finally:
        hung.set()
        reloader.stop(2)


def _null_version(store, probability):
    """A stored version of the null plugin; a probability outside [0, 1] is a version its plugin refuses."""
    import json

    def save(folder):
        (folder / "null.json").write_text(json.dumps({"probability": probability, "score": 0.0}))
        return ["null.json"]

    return store.write("default", save, {"plugin": "null"}).version


def test_at_start_a_current_version_that_cannot_serve_gives_way_to_the_last_good_one(tmp_path):
    from inspector.stores import ModelStore

    store = ModelStore(tmp_path / "models")
    good = _null_version(store, 0.25)
    bad = _null_version(store, 1.5)
    models = ModelSet({"default": ModelSettings(plugin="null")}, "default", [])
    outcomes = []
    reloader = _reloader(store, models, outcomes)
    assert reloader.load_at_start("default").version == good
    assert ("default", bad) in reloader.refused and store.current("default") == bad
    assert outcomes == [("default", "failed")]  # a load at start is not a reload; its failure is counted
    assert reloader.reload("default") is None and models.get("default").version == good  # refused: not tried again


def test_with_no_good_version_the_worker_starts_not_ready_and_takes_up_a_good_one_when_it_appears(tmp_path):
    from inspector import config
    from inspector.stores import ModelStore
    from inspector.worker.loop import Worker
    from tests.workerkit import worker_config

    root = tmp_path / "models"
    store = ModelStore(root)
    _null_version(store, 1.5)
    settings = config.load(worker_config(tmp_path, root, "p", '[models.default]\nplugin = "null"\n'))
    worker = Worker(settings)
    worker._load_models()  # used to raise StateError: the process exited and restarted for ever
    worker.metrics.set_broker_connected(True)
    reason = worker.metrics.not_ready_reason()
    assert reason is not None and reason.startswith("no model loaded: model default: version") and "refused" in reason
    assert "refused" in worker._reloader.problems["default"]
    with pytest.raises(FrameError) as unavailable:
        worker.models.choose(capture("line1.cam1"))
    assert unavailable.value.code == "model_unavailable"
    good = _null_version(store, 0.25)
    assert worker._reloader.reload("default").version == good
    sample = worker.metrics.registry.get_sample_value
    assert sample("inspector_model_info", {"model": "default", "plugin": "null", "version": good}) == 1


def test_the_served_version_is_exported_and_stays_right_after_a_failed_reload(tmp_path):
    from inspector.config import MetricsSettings
    from inspector.stores import ModelStore
    from inspector.worker.metrics import Metrics

    store = ModelStore(tmp_path / "models")
    good = _null_version(store, 0.25)
    metrics = Metrics(MetricsSettings())
    models = ModelSet({"default": ModelSettings(plugin="null")}, "default", [])
    reloader = Reloader(store, models, torch.device("cpu"), 0, on_outcome=metrics.model_reload,
                        on_loaded=lambda s: metrics.set_model(s.name, s.plugin_name, s.version, s.threshold))
    reloader.load_at_start("default")
    bad = _null_version(store, 1.5)
    assert reloader.reload("default") is None
    sample = metrics.registry.get_sample_value
    assert sample("inspector_model_info", {"model": "default", "plugin": "null", "version": good}) == 1
    assert sample("inspector_model_info", {"model": "default", "plugin": "null", "version": bad}) is None
    assert sample("inspector_model_reloads_total", {"model": "default", "outcome": "failed"}) == 1
