"""The null plugin: registered like any plugin, fitted into a store by a real refit, served by a real worker
(on a StubConsumer: the broker adds nothing here), and scoring every frame with its configured constants."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from inspector import config
from inspector.errors import StateError
from inspector.plugin import Calibration, Scores, check_plugin, get_plugin
from inspector.stores import ModelStore
from inspector.tools import samples
from inspector.tools.refit import RefitOptions, run_refit
from inspector_null.plugin import STATE_FILE, NullPlugin, NullSettings
from tests.workerkit import encoded, worker_config

CPU = torch.device("cpu")


def test_it_is_registered_under_its_name_and_meets_the_contract():
    assert get_plugin("null") is NullPlugin
    assert check_plugin("null", NullPlugin) is NullPlugin


def test_every_frame_gets_the_configured_probability_and_score():
    plugin = NullPlugin.create(NullSettings(probability=0.25, score=-3.5), CPU)
    images = [np.zeros((8, 9, 3), np.uint8), np.full((40, 30, 3), 255, np.uint8)]
    batch = torch.stack([plugin.prepare(image) for image in images])
    scores = plugin.score(batch)
    np.testing.assert_array_equal(scores.probability, np.full(2, 0.25))
    np.testing.assert_array_equal(scores.raw, np.full(2, -3.5))
    assert plugin.fit([batch, batch]).images == 4


@pytest.mark.parametrize("table", [{"probability": 1.5}, {"probability": -0.1}, {"score": float("nan")},
                                   {"colour": "red"}])
def test_settings_out_of_range_are_refused(table):
    with pytest.raises(ValidationError):
        NullSettings.model_validate(table)


def test_the_state_is_a_small_json_file_that_loads_back(tmp_path):
    plugin = NullPlugin.create(NullSettings(probability=0.9, score=7.0), CPU)
    assert plugin.save(tmp_path) == [STATE_FILE]
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {"probability": 0.9, "score": 7.0}
    loaded = NullPlugin.load(tmp_path, CPU)
    assert loaded.describe() == plugin.describe()


@pytest.mark.parametrize("text", ["not json", '{"probability": 2}', '{"probability": 0.1, "extra": 1}'])
def test_a_damaged_state_is_a_state_error_naming_the_file(tmp_path, text):
    (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(StateError, match=STATE_FILE):
        NullPlugin.load(tmp_path, CPU)


def test_calibration_reports_what_the_fixed_probability_gives():
    plugin = NullPlugin.create(NullSettings(probability=0.6), CPU)
    held_out = Scores(probability=np.full(30, 0.6), raw=np.zeros(30))
    calibrated = plugin.calibrate(held_out, threshold=0.5, target_false_reject=0.01)
    assert isinstance(calibrated, Calibration)
    assert calibrated.threshold == 0.5 and calibrated.held_out_false_reject == 1.0
    assert calibrated.boundary is None and calibrated.promise is None  # no rule, so nothing promised
    assert calibrated.manifest()["held_out_false_reject"] == 1.0  # the manifest's record, as before
    assert plugin.calibrate(held_out, threshold=0.7, target_false_reject=0.01).held_out_false_reject == 0.0


def test_a_refit_null_model_is_served_by_a_worker(tmp_path, stub_start, prefix):
    samples.write_folder(tmp_path / "archive", 6, size=64)
    models = tmp_path / "models"
    text = '[models.default]\nplugin = "null"\n[plugins.null]\nprobability = 0.75\nscore = 2.5\n'
    settings = config.load(worker_config(tmp_path, models, prefix, text))
    result = run_refit(settings, RefitOptions(data=tmp_path / "archive" / "good", model="default", calibrate=False,
                                              held_out_share=0.0, announce=False))
    version = ModelStore(models).current("default")
    assert result.used == 6 and version is not None
    assert set(ModelStore(models).info("default", version).manifest["files"]) == {STATE_FILE}

    stub = stub_start(models, text).consumer
    image = samples.make_images(1, seed=3, size=64)[0]
    for i in range(5):
        stub.deliver(encoded(image, "PNG"), f"line1.cam{i}", message_id=f"n{i}", content_type="image/png")
    stub.deliver(b"not an image", "line1.cam9", message_id="bad", content_type="image/png")
    stub.join()
    results = {p.body["frame_id"]: (p.routing_key, p.body) for p in stub.results}
    assert set(results) == {"n0", "n1", "n2", "n3", "n4", "bad"}
    for i in range(5):
        key, body = results[f"n{i}"]
        assert key == f"fail.line1.cam{i}"  # 0.75 is over the threshold of 0.5
        assert (body["anomaly_probability"], body["anomaly_score"]) == (0.75, 2.5)
        assert body["model"]["plugin"] == "null" and body["model"]["version"] == version
    assert results["bad"][1]["error"]["code"] == "image_undecodable"  # decoding still judges every frame


def test_the_null_plugin_is_never_the_default():
    assert config.ModelSettings().plugin != "null"
