"""Choosing a model per capture and refusing a model that does not work: no broker."""

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
