"""`inspector explain`: the drawing (overlay, 16-bit map) against numpy, the names, and the command on a
fitted model, its results held to the result schema and to the plugin's own scores."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from jsonschema import Draft202012Validator
from PIL import Image

from inspector import cli, config
from inspector.imagefiles import map_image
from inspector.plugin import Explained
from inspector.stores import ModelStore
from inspector.tools import samples
from inspector.tools.explain import ExplainOptions, output_names, run_explain
from inspector.tools.overlay import MAP_FLOOR, MIN_WIDTH, VERDICT_COLOURS, Header, checked_map, overlay
from inspector_dfkde.plugin import DfkdePlugin
from tests.workerkit import SIZE, tool_config

ROOT = Path(__file__).resolve().parents[1]
RESULT_SCHEMA = json.loads((ROOT / "docs" / "schemas" / "result.schema.json").read_text())
HAS_EXPLAIN = hasattr(DfkdePlugin, "explain")


# -- names ---------------------------------------------------------------------------------------


def test_names_join_folders_and_never_collide_or_escape():
    names = output_names(["good/001.png", "scratch/001.png", "001.png", "001.jpg", "A/x.png", "a/X.png",
                          "../../etc/passwd.png", ".hidden.png", "-rf.png", "sub dir/ä b.png", "x" * 400 + ".png"])
    assert names[:3] == ["good__001", "scratch__001", "001"]
    assert names[3] == "001~2"  # the same stem from another suffix
    assert names[4] == "A__x" and names[5] == "a__X~2"  # one file system may ignore case
    assert len({n.lower() for n in names}) == len(names)
    for name in names:
        assert "/" not in name and not name.startswith((".", "-")) and name not in ("", ".", "..")
        assert len((name + ".map.png").encode()) <= 255
    assert names[6] == "_.__..__etc__passwd"  # no separator left: a plain name inside the folder


# -- the 16-bit map and the overlay ----------------------------------------------------------------


def test_map_png_is_round_map_times_65535_at_its_size(tmp_path):
    rng = np.random.default_rng(3)
    amap = rng.random((37, 53)).astype(np.float32)
    amap[0, :4] = [0.0, 1.0, 0.5 / 65535, 1.5 / 65535]  # the ends and two rounding cases
    map_image(amap).save(tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as back:
        assert back.mode == "I;16" and back.size == (53, 37)
        levels = np.array(back)
    np.testing.assert_array_equal(levels, np.round(amap.astype(np.float64) * 65535).astype(np.uint16))
    assert levels[0, 0] == 0 and levels[0, 1] == 65535


def test_a_map_of_the_wrong_shape_or_range_is_refused():
    with pytest.raises(ValueError, match="shape"):
        checked_map(np.zeros((10, 12)), (10, 12))  # (width, height): 12 x 10 expected
    with pytest.raises(ValueError, match="outside"):
        checked_map(np.full((4, 4), 1.2), (4, 4))
    with pytest.raises(ValueError, match="not finite"):
        checked_map(np.full((4, 4), np.nan), (4, 4))


def _header(verdict="fail", probability=0.9):
    return Header(verdict=verdict, probability=probability, threshold=0.5, model="default@v1", source="a/b.png")


def test_overlay_colours_only_where_the_map_is_over_the_floor():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (400, 500, 3), dtype=np.uint8)
    amap = np.full((400, 500), MAP_FLOOR * 0.9, np.float32)  # a good part's faint map: nothing drawn
    amap[100:200, 300:400] = 1.0
    drawn = overlay(image, amap, _header())
    band = drawn.height - image.shape[0]
    assert drawn.width == 500 and band > 0
    body = np.asarray(drawn)[band:]
    outside = np.ones((400, 500), bool)
    outside[100:200, 300:400] = False
    np.testing.assert_array_equal(body[outside], image[outside])
    assert np.abs(body[~outside].astype(int) - image[~outside]).mean() > 20
    # the band says the verdict by colour (the first column is padding: no text)
    assert tuple(np.asarray(drawn)[0, 0]) == VERDICT_COLOURS["fail"]
    assert tuple(np.asarray(overlay(image, None, _header("pass", 0.1)))[0, 0]) == VERDICT_COLOURS["pass"]
    np.testing.assert_array_equal(np.asarray(overlay(image, np.zeros((400, 500)), _header()))[band:], image)


def test_small_images_are_enlarged_and_thumbnails_fit():
    image = np.zeros((64, 96, 3), np.uint8)
    assert overlay(image, None, _header()).width == MIN_WIDTH
    thumb = overlay(np.zeros((600, 300, 3), np.uint8), None, _header(), max_side=256)
    assert thumb.width == 128 and thumb.height > 256


# -- the command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("explain") / "test"
    samples.write_folder(root, 6, 2, size=SIZE)
    return root


def _fake_explain(self, batch):
    """Scores as `score` gives them, and a map that is a gradient scaled by the probability: a stand-in
    for a plugin that draws maps, so the tool is tested apart from any one plugin's maps."""
    scores = self.score(batch)

    def map_of(index, size):
        width, height = size
        ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[np.newaxis, :].repeat(height, 0)
        return ramp * np.float32(scores.probability[index])

    return Explained(scores=scores, map_of=map_of)


def _plugin_scores(store: Path, files: list[Path]) -> np.ndarray:
    """Probabilities by PIL and the plugin directly, not the tool's way."""
    plugin = DfkdePlugin.load(ModelStore(store).load_path("default").path, torch.device("cpu"))
    images = [np.array(Image.open(f).convert("RGB")) for f in files]
    return np.asarray(plugin.score(torch.stack([plugin.prepare(im) for im in images])).probability, float)


def test_explain_writes_overlays_maps_and_results(fitted, test_set, tmp_path, monkeypatch):
    if not HAS_EXPLAIN:
        monkeypatch.setattr(DfkdePlugin, "explain", _fake_explain, raising=False)
    data = tmp_path / "data"
    shutil.copytree(test_set, data)
    (data / "good" / "broken.png").write_bytes(os.urandom(300))
    single = tmp_path / "one.png"
    shutil.copy(test_set / "scratch" / "000.png", single)
    settings = config.load(tool_config(tmp_path, fitted))
    out = tmp_path / "out"
    summary = run_explain(settings, ExplainOptions(data=[data, single], out=out, model="default", batch_size=4))

    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    files = sorted(p for p in data.rglob("*.png")) + [single]
    assert len(results) == len(files) == 6 + 2 * len(samples.DEFECT_KINDS) + 2
    validator = Draft202012Validator(RESULT_SCHEMA)
    for body in results:
        assert not list(validator.iter_errors(body)), body
    by_source = {r["meta"]["source"]: r for r in results}
    broken = by_source.pop("good/broken.png")
    assert broken["verdict"] == "error" and broken["error"]["code"] == "image_undecodable"
    assert not (out / f"{broken['frame_id']}.png").exists()
    assert summary.verdicts["error"] == 1 and summary.images == len(files)

    scored = [f for f in files if f.name != "broken.png"]
    sources = [f.relative_to(data).as_posix() if f != single else "one.png" for f in scored]
    expected = _plugin_scores(fitted, scored)
    got = np.array([by_source[s]["anomaly_probability"] for s in sources])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    version = ModelStore(fitted).current("default")
    for source, f in zip(sources, scored):
        body = by_source[source]
        assert body["model"] == {"name": "default", "plugin": "dfkde", "version": version}
        assert body["verdict"] == ("fail" if body["anomaly_probability"] >= 0.5 else "pass")
        assert body["frame_id"] == source.removesuffix(".png").replace("/", "__")
        assert body["meta"]["overlay"] == body["frame_id"] + ".png"
        with Image.open(f) as original, Image.open(out / body["meta"]["map"]) as amap, \
                Image.open(out / body["meta"]["overlay"]) as drawn:
            assert amap.mode == "I;16" and amap.size == original.size
            assert drawn.mode == "RGB" and drawn.width == max(original.width, MIN_WIDTH)
            levels = np.array(amap)
        assert levels.max() <= 65535 and levels.dtype == np.uint16
        if not HAS_EXPLAIN:  # the stand-in's map, exactly
            width, height = original.size
            ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[np.newaxis, :].repeat(height, 0)
            reference = np.round(ramp * np.float32(body["anomaly_probability"]) * 65535.0)
            np.testing.assert_allclose(levels, reference, atol=1)


@pytest.mark.skipif(not HAS_EXPLAIN, reason="DFKDE draws no maps yet (no `explain` in plugins/dfkde)")
def test_dfkde_maps_are_brighter_on_defects_through_the_cli(fitted, test_set, tmp_path):
    cfg = tool_config(tmp_path, fitted)
    out = tmp_path / "out"
    result = _inspector("explain", "--config", str(cfg), "--data", str(test_set), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "explained" in result.stdout
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    means = {"good": [], "defective": []}
    for body in results:
        with Image.open(out / body["meta"]["map"]) as amap:
            level = np.array(amap).astype(float).mean() / 65535
        means["good" if body["meta"]["source"].startswith("good/") else "defective"].append(level)
    assert np.mean(means["defective"]) > np.mean(means["good"])


def _inspector(*args, cwd: Path, timeout: float = 180):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    return subprocess.run([sys.executable, "-m", "inspector.cli", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_a_model_without_maps_is_an_operator_error(fitted, test_set, tmp_path, monkeypatch, capsys):
    if HAS_EXPLAIN:
        monkeypatch.delattr(DfkdePlugin, "explain")
    cfg = tool_config(tmp_path, fitted)
    code = cli.main(["explain", "--config", str(cfg), "--data", str(test_set), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "draws no anomaly maps: its plugin has no `explain`" in err and "refit it" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["no such path", "not an image", "empty folder", "unknown model"])
def test_operator_mistakes_exit_2_naming_the_thing(fitted, tmp_path, case, capsys):
    cfg = tool_config(tmp_path, fitted)
    target = tmp_path / "target"
    args = ["explain", "--config", str(cfg), "--out", str(tmp_path / "out"), "--data", str(target)]
    if case == "no such path":
        expected = "target: no such folder"
    elif case == "not an image":
        target.write_text("hello")
        expected = "target: not an image file"
    elif case == "empty folder":
        target.mkdir()
        expected = "target: no image files in it"
    else:
        target.mkdir()
        Image.new("RGB", (8, 8)).save(target / "a.png")
        args += ["--model", "other"]
        expected = "--model 'other' is not a configured model"
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expected in err and "Traceback" not in err


def test_overlay_outlines_each_region_in_its_colour():
    from inspector.regions import Region
    from inspector.tools.overlay import REGION_COLOUR

    image = np.full((400, 400, 3), 90, np.uint8)
    box = Region(x=100, y=150, width=60, height=40, peak=0.9, area=1000)
    drawn = np.array(overlay(image, None, _header(), regions=[box]))
    plain = np.array(overlay(image, None, _header()))
    changed = np.argwhere((drawn != plain).any(axis=2))
    band = plain.shape[0] - 400  # the header band above the image
    ys, xs = changed[:, 0] - band, changed[:, 1]
    assert (ys.min(), xs.min(), ys.max(), xs.max()) == (150, 100, 189, 159)  # the outline, nothing else
    assert tuple(drawn[band + 150, 120]) == REGION_COLOUR and tuple(drawn[band + 170, 130]) == (90, 90, 90)


def test_explain_writes_each_failing_file_s_regions_and_boxes_them(fitted, test_set, tmp_path, monkeypatch):
    """A stand-in map (a ramp scaled by the probability) and level: the regions in results.jsonl are those of
    inspector.regions on that map at the file's size, for fails only, and their overlays carry the boxes."""
    from inspector.regions import regions_of
    from inspector.tools.overlay import REGION_COLOUR

    level = 0.3
    monkeypatch.setattr(DfkdePlugin, "explain", _fake_explain, raising=False)
    monkeypatch.setattr(DfkdePlugin, "region_level", level, raising=False)
    settings = config.load(tool_config(tmp_path, fitted))
    out = tmp_path / "out"
    run_explain(settings, ExplainOptions(data=[test_set], out=out, model="default", batch_size=4))
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    validator = Draft202012Validator(RESULT_SCHEMA)
    assert {r["verdict"] for r in results} == {"pass", "fail"}
    for body in results:
        assert not list(validator.iter_errors(body)), body
        with Image.open(test_set / body["meta"]["source"]) as original:
            width, height = original.size
        with Image.open(out / body["meta"]["overlay"]) as drawn:
            magenta = (np.array(drawn) == REGION_COLOUR).all(axis=2).any()
        if body["verdict"] == "pass":
            assert "regions" not in body and not magenta
            continue
        ramp = np.linspace(0.0, 1.0, width, dtype=np.float32)[np.newaxis, :].repeat(height, 0)
        expected = regions_of(ramp * np.float32(body["anomaly_probability"]), level, (width, height))
        assert body["regions"] == [r.as_json() for r in expected] and body["regions"]
        assert magenta
