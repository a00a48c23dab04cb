"""The plugin contract is written once, in the Plugin protocol: `check_plugin` refuses a class that
lacks any required member of it, and accepts one without the optional members."""

import inspect

import numpy as np
import pytest
import torch

from inspector import plugin as contract
from inspector.errors import PluginError
from plugins.dfkde.plugin import DfkdePlugin

REQUIRED = sorted(name for name in vars(contract.Plugin)
                  if not name.startswith("_") and name not in contract.OPTIONAL_MEMBERS
                  and (inspect.isfunction(vars(contract.Plugin)[name])
                       or isinstance(vars(contract.Plugin)[name], (classmethod, property))))


def without(member: str) -> type:
    """DfkdePlugin with `member` removed (shadowed by a non-callable attribute)."""
    return type("Partial", (DfkdePlugin,), {member: None})


def test_the_protocol_names_what_the_worker_and_tools_call():
    assert {"create", "load", "min_images", "describe", "prepare", "fit", "score", "calibrate", "save"} <= set(REQUIRED)
    assert "decode_size" in vars(contract.Plugin) and "decode_size" not in REQUIRED
    assert "explain" in vars(contract.Plugin) and "explain" not in REQUIRED


@pytest.mark.parametrize("member", REQUIRED)
def test_a_plugin_missing_a_member_of_the_protocol_is_refused_by_name(member):
    with pytest.raises(PluginError, match=f"`{member}`"):
        contract.check_plugin("dfkde", without(member))


def test_a_classmethod_of_the_protocol_must_stay_a_classmethod():
    broken = type("Partial", (DfkdePlugin,), {"load": lambda self, folder, device: None})
    with pytest.raises(PluginError, match="`load` must be a classmethod"):
        contract.check_plugin("dfkde", broken)


def test_optional_members_may_be_left_out():
    assert contract.check_plugin("dfkde", without("decode_size")) is not None
    assert contract.check_plugin("dfkde", without("explain")) is not None
    assert contract.decode_size(object()) is None
    assert not contract.can_explain(object())


def test_maps_from_a_plugin_without_explain_are_a_clear_error():
    class Blind:
        name = "blind"

    with pytest.raises(PluginError, match="'blind' draws no anomaly maps"):
        contract.anomaly_maps(Blind(), torch.zeros(1, 3, 8, 8), [(8, 8)])


def test_maps_come_one_per_image_at_the_asked_sizes():
    class Flat:
        """Scores each image by its mean; its map is the image's first channel, resized by repetition."""

        def explain(self, batch):
            raw = batch.float().mean(dim=(1, 2, 3)).numpy()
            scores = contract.Scores(probability=raw / 255.0, raw=raw)

            def map_of(index, size):
                width, height = size
                return np.full((height, width), raw[index] / 255.0, np.float32)

            return contract.Explained(scores, map_of)

    batch = torch.stack([torch.full((3, 4, 4), 51, dtype=torch.uint8), torch.full((3, 4, 4), 204, dtype=torch.uint8)])
    scores, maps = contract.anomaly_maps(Flat(), batch, [(5, 3), (2, 7)])
    np.testing.assert_allclose(scores.raw, [51.0, 204.0])
    assert [m.shape for m in maps] == [(3, 5), (7, 2)]
    np.testing.assert_allclose([m.max() for m in maps], [0.2, 0.8], rtol=1e-6)
    with pytest.raises(ValueError, match="1 sizes for a batch of 2"):
        contract.anomaly_maps(Flat(), batch, [(5, 3)])
