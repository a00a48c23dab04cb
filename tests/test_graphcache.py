"""The exported backbone kept between processes: used when it gives the torch module's features, exported
again when it does not, and never kept where another user could change it."""

import logging
import os
from pathlib import Path

import pytest
import torch

from inspector_dfkde import graphcache, runtimes
from inspector_dfkde.model import DfkdeModel
from inspector_dfkde.plugin import DfkdeSettings

SHIPPED = DfkdeSettings()
SIZE = 64  # a small input: the cache's behaviour does not depend on it, the export time does


@pytest.fixture(scope="module")
def backbone():
    if runtimes.missing_packages("openvino"):
        pytest.skip("openvino is not installed here (`make setup` installs it)")
    return DfkdeModel(SHIPPED.backbone, layers=SHIPPED.layers, weights=SHIPPED.weights).backbone


@pytest.fixture(scope="module")
def exported(backbone):
    """The real export of the backbone at SIZE, made once: the cache's logic is under test, not the exporter."""
    return runtimes.export_onnx(backbone.extractor, SIZE)


@pytest.fixture
def cache(tmp_path, monkeypatch, exported):
    """A fresh process's view: no runner or graph in memory, the cache in tmp_path/graphs, exports counted."""
    folder = tmp_path / "graphs"
    monkeypatch.setattr(runtimes, "_runners", type(runtimes._runners)())
    monkeypatch.setattr(runtimes, "_graphs", {})
    monkeypatch.setattr(graphcache, "_warned", set())
    exports = []

    def counted(extractor, input_size):
        assert input_size == SIZE
        exports.append(input_size)
        return exported

    monkeypatch.setattr(runtimes, "export_onnx", counted)
    graphcache.use(str(folder))
    yield folder, exports
    graphcache.use(graphcache.AUTO)


def _new_process():
    runtimes._runners.clear()
    runtimes._graphs.clear()


def _features_match_torch(backbone, size=SIZE):
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    served = DfkdeModel(backbone, input_size=size, runtime="openvino").get_feature_maps(images)
    expected = DfkdeModel(backbone, input_size=size).get_feature_maps(images)
    return all(((s - e).abs().max() / e.abs().max()).item() <= 1e-5 for s, e in zip(served, expected))


def test_the_next_process_uses_the_kept_graph_instead_of_exporting(backbone, cache):
    folder, exports = cache
    assert _features_match_torch(backbone)
    assert exports == [SIZE]
    kept = list(folder.iterdir())
    assert len(kept) == 1 and kept[0].suffix == ".onnx"
    assert folder.stat().st_mode & 0o777 == 0o700 and kept[0].stat().st_mode & 0o777 == 0o600

    _new_process()
    assert _features_match_torch(backbone)
    assert exports == [SIZE]  # read back and checked, not exported again


def test_a_damaged_or_foreign_graph_is_exported_again_and_replaced(backbone, cache, caplog):
    folder, exports = cache
    name = graphcache.entry_name(DfkdeModel(backbone, input_size=SIZE, runtime="openvino").runner_key, SIZE,
                                 runtimes._OPSET)
    folder.mkdir(mode=0o700)
    (folder / name).write_bytes(b"\x08\x07not an onnx graph")
    with caplog.at_level(logging.WARNING):
        assert _features_match_torch(backbone)
    assert exports == [SIZE] and "exported again" in caplog.text
    good = (folder / name).read_bytes()
    assert good.startswith(b"\x08") and len(good) > 1_000_000  # the real export took its place

    # a well-formed graph that is not this backbone (a one-layer network's, under this name) is refused too
    foreign = _one_convolution_graph()
    (folder / name).write_bytes(foreign)
    _new_process()
    exports.clear()
    assert _features_match_torch(backbone)
    assert exports == [SIZE] and (folder / name).read_bytes() == good


def _one_convolution_graph() -> bytes:
    import io
    import warnings

    layer = torch.nn.Conv2d(3, 8, 3, stride=16)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer.eval(), (torch.zeros(2, 3, SIZE, SIZE),), buffer, dynamo=False, input_names=["images"],
                          dynamic_axes={"images": {0: "batch"}}, opset_version=runtimes._OPSET)
    return buffer.getvalue()


def test_a_folder_other_users_can_write_is_never_used(backbone, cache, caplog):
    folder, exports = cache
    folder.mkdir()
    os.chmod(folder, 0o777)
    with caplog.at_level(logging.WARNING):
        assert _features_match_torch(backbone)
    assert list(folder.iterdir()) == [] and "not this user's alone" in caplog.text
    _new_process()
    assert _features_match_torch(backbone)
    assert exports == [SIZE, SIZE]


def test_only_the_most_recently_used_graphs_are_kept(cache, monkeypatch):
    folder, _ = cache
    monkeypatch.setattr(graphcache, "MAX_KEPT", 3)
    for i in range(5):
        graphcache.write(f"{i}.onnx", b"graph %d" % i)
        os.utime(folder / f"{i}.onnx", (1000 + i, 1000 + i))
    assert graphcache.read("2.onnx") == b"graph 2"  # used again: now the newest
    graphcache.write("5.onnx", b"graph 5")
    assert sorted(p.name for p in folder.iterdir()) == ["2.onnx", "4.onnx", "5.onnx"]


def test_off_keeps_nothing(backbone, cache, tmp_path):
    folder, exports = cache
    graphcache.use(graphcache.OFF)
    assert _features_match_torch(backbone)
    assert not folder.exists() and exports == [SIZE]


def test_the_name_follows_everything_the_graph_depends_on():
    key = ("tf_efficientnet_lite0", "a" * 64, ("blocks.4", "blocks.6"))
    name = graphcache.entry_name(key, 128, 17)
    assert name == graphcache.entry_name(key, 128, 17) and name.endswith(".onnx")
    others = {graphcache.entry_name(key, 256, 17), graphcache.entry_name(key, 128, 18),
              graphcache.entry_name((key[0], "b" * 64, key[2]), 128, 17),
              graphcache.entry_name((key[0], key[1], ("blocks.6",)), 128, 17)}
    assert name not in others and len(others) == 4


def test_the_setting_is_checked_and_auto_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    graphcache.use(graphcache.AUTO)
    assert graphcache._folder == tmp_path / "inspector" / "graphs"
    graphcache.use("~/somewhere")
    assert graphcache._folder == Path.home() / "somewhere"
    graphcache.use(graphcache.AUTO)
    with pytest.raises(ValueError, match="graph_cache"):
        DfkdeSettings(graph_cache="")
