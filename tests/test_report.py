"""`inspector evaluate --report`: the page's figures against scikit-learn on scores taken from the plugin
directly, the page self-contained (every image a data: URI that decodes, nothing fetched), galleries with
and without maps, region boxes against the plugin's own maps, and the page rendered by a real browser
(headless Chromium)."""

import base64
import io
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from inspector import cli, config
from inspector.plugin import Explained
from inspector.regions import regions_of
from inspector.stores import ModelStore
from inspector.tools import samples
from inspector.tools.evaluate import EvaluateOptions, run_evaluate
from inspector.tools.overlay import REGION_COLOUR
from inspector.tools.report import ScoredImage, galleries
from inspector.tools.report_figures import roc_points
from inspector_dfkde.plugin import DfkdePlugin
from tests.workerkit import SIZE, tool_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


# -- the pure pieces -----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_roc_points_are_sklearns_roc_curve(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(30 + 20 * seed) < 0.4
    labels[:2] = [True, False]
    scores = rng.integers(0, 5 + seed, len(labels)) / (5 + seed) + 0.2 * labels * rng.random()  # many ties
    fpr, tpr, thresholds = roc_points(labels, scores)
    ref_fpr, ref_tpr, ref_thresholds = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-12)
    np.testing.assert_array_equal(thresholds[1:], ref_thresholds[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def _image(name, kind, p):
    return ScoredImage(path=Path(name), relative=name, kind=kind, probability=p)


def test_galleries_choose_false_rejects_missed_defects_and_closest_calls():
    images = [_image("g1", "good", 0.2), _image("g2", "good", 0.9), _image("g3", "good", 0.55),
              _image("g4", "good", 0.45), _image("d1", "hole", 0.3), _image("d2", "hole", 0.1),
              _image("d3", "hole", 0.95), _image("d4", "scratch", 0.52), _image("x", "hole", math.nan)]
    false_rejects, missed, closest = galleries(images, 0.5, size=2)
    assert [i.relative for i in false_rejects.images] == ["g2", "g3"]  # highest first
    assert [i.relative for i in missed.images] == ["d2", "d1"]  # lowest first
    assert [i.relative for i in closest.images] == ["d4", "g4"]  # the others, nearest the threshold
    assert "2" in false_rejects.note and "2" in missed.note


# -- the page from a real evaluation -----------------------------------------------------------


class Page(HTMLParser):
    """The parts of the page the tests read: images, sections, figures, confusion cells, data, links."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images, self.sections, self.links = [], [], []
        self.figures, self.cells, self.scripts = {}, {}, []
        self._script = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "section":
            self.sections.append(a.get("id"))
        for key in ("href", "src", "action", "srcset", "poster"):
            if key in a and tag != "img":
                self.links.append(a[key])
        if "data-figure" in a:
            self.figures[a["data-figure"]] = float(a["data-value"]) if "data-value" in a else None
        if "data-cell" in a:
            self._cell = a["data-cell"]
        if tag == "script":
            self._script = a
            self.scripts.append([a, ""])

    def handle_data(self, data):
        if self._script is not None:
            self.scripts[-1][1] += data
        if getattr(self, "_cell", None):
            self.cells[self._cell] = int(data)
            self._cell = None

    def handle_endtag(self, tag):
        if tag == "script":
            self._script = None


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report") / "test"
    samples.write_folder(root, 10, 3, size=SIZE)
    return root


def _plugin_scores(store: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities by PIL and the plugin directly, not evaluate's way."""
    plugin = DfkdePlugin.load(ModelStore(store).load_path("default").path, torch.device("cpu"))
    files = sorted(data.rglob("*.png"))
    labels = np.array([f.parent.name != "good" for f in files])
    images = [np.array(Image.open(f).convert("RGB")) for f in files]
    probability = plugin.score(torch.stack([plugin.prepare(im) for im in images])).probability
    return labels, np.asarray(probability, float)


def _fake_explain(self, batch):
    scores = self.score(batch)

    def map_of(index, size):
        width, height = size
        return np.full((height, width), np.float32(scores.probability[index]))

    return Explained(scores=scores, map_of=map_of)


@pytest.fixture(scope="module")
def report(fitted, test_set, tmp_path_factory):
    """The page of a real evaluation of the sample test set, drawn by DFKDE as it stands (with or without
    maps), its text and where it lies."""
    root = tmp_path_factory.mktemp("page")
    path = root / "out" / "report.html"
    code = cli.main(["evaluate", "--config", str(tool_config(root, fitted)), "--data", str(test_set),
                     "--report", str(path)])
    assert code == 0
    return path, path.read_text(encoding="utf-8")


def test_the_page_figures_agree_with_sklearn(report, fitted, test_set):
    _, text = report
    page = Page(text)
    labels, probability = _plugin_scores(fitted, test_set)
    assert page.figures["auroc"] == pytest.approx(roc_auc_score(labels, probability), abs=1e-6)
    tn, fp, fn, tp = confusion_matrix(labels, probability >= 0.5, labels=[False, True]).ravel()
    assert page.cells == {"good_passed": tn, "good_failed": fp, "defective_passed": fn, "defective_failed": tp}
    assert page.figures["false_reject_rate"] == pytest.approx(fp / (fp + tn))
    (attrs, data), = [s for s in page.scripts if s[0].get("id") == "roc-data"]
    assert attrs.get("type") == "application/json"
    roc = json.loads(data)
    ref_fpr, ref_tpr, _ = roc_curve(labels, probability, drop_intermediate=False)
    # the same curve, allowing for scores that batching moved by float noise and so tie or not
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(np.trapezoid(ref_tpr, ref_fpr), abs=1e-6)
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and roc["fpr"][-1] == 1
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)


def test_the_page_is_self_contained(report):
    _, text = report
    page = Page(text)
    assert {"figures", "roc", "histogram", "confusion", "kinds", "false-rejects", "missed-defects",
            "closest-calls"} <= set(page.sections)
    assert len(page.images) >= 4 + 1  # the four plots and at least one gallery image
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as image:
            image.load()
            assert image.width > 50 and image.height > 50
    assert page.links == []  # no stylesheet, script, frame or link to fetch
    assert all(attrs.get("type") == "application/json" for attrs, _ in page.scripts)  # data only, never run
    outside_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"(?i)(?:https?:|ftp:|file:)?//[a-z0-9]", outside_images)
    assert "@import" not in text and "url(" not in text


def test_galleries_show_maps_when_the_model_draws_them(fitted, test_set, tmp_path, monkeypatch):
    if not hasattr(DfkdePlugin, "explain"):
        monkeypatch.setattr(DfkdePlugin, "explain", _fake_explain, raising=False)
    settings = config.load(tool_config(tmp_path, fitted))
    with_maps = tmp_path / "maps.html"
    run_evaluate(settings, EvaluateOptions(data=test_set, model="default", batch_size=4, report=with_maps))
    text = with_maps.read_text()
    assert "are drawn with their anomaly maps" in text
    monkeypatch.delattr(DfkdePlugin, "explain")
    without = tmp_path / "plain.html"
    run_evaluate(settings, EvaluateOptions(data=test_set, model="default", batch_size=4, report=without))
    plain = without.read_text()
    assert "draws no anomaly maps" in plain
    # the same images in the galleries; with maps their pixels differ where the map is over the floor
    drawn, undrawn = Page(text).images[4:], Page(plain).images[4:]
    assert len(drawn) == len(undrawn) > 0
    assert sum(a != b for a, b in zip(drawn, undrawn)) > 0


class Figures(HTMLParser):
    """Each gallery figure: its image's alt and src, and its data-regions (None when it has none)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.shown: dict[str, tuple[str, list | None]] = {}
        self._in_figure, self._regions = False, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure":
            self._in_figure = True
            self._regions = json.loads(a["data-regions"]) if "data-regions" in a else None
        if tag == "img" and self._in_figure:
            self.shown[a["alt"]] = (a["src"], self._regions)

    def handle_endtag(self, tag):
        if tag == "figure":
            self._in_figure = False


def _magenta_pixels(src: str) -> int:
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as image:
        pixels = np.asarray(image.convert("RGB"), int)
    return int((np.abs(pixels - np.array(REGION_COLOUR)).max(axis=2) < 60).sum())


def test_galleries_outline_the_regions_of_a_version_with_a_level(fitted, test_set, tmp_path, monkeypatch):
    plugin = DfkdePlugin.load(ModelStore(fitted).load_path("default").path, torch.device("cpu"))
    assert plugin.draws_maps and plugin.region_level is None  # the shared version: maps, too few good for a level
    files = sorted(test_set.rglob("*.png"))
    images = [np.array(Image.open(f).convert("RGB")) for f in files]
    explained = plugin.explain(torch.stack([plugin.prepare(im) for im in images]))
    maps = {f.relative_to(test_set).as_posix(): explained.map_of(i, (im.shape[1], im.shape[0]))
            for i, (f, im) in enumerate(zip(files, images))}
    peaks = sorted(float(m.max()) for m in maps.values())
    level = (peaks[len(peaks) // 2 - 1] + peaks[len(peaks) // 2]) / 2  # half the images reach it, half do not
    monkeypatch.setattr(DfkdePlugin, "region_level", property(lambda self: level))
    path = tmp_path / "regions.html"
    run_evaluate(config.load(tool_config(tmp_path, fitted)),
                 EvaluateOptions(data=test_set, model="default", batch_size=4, report=path))
    text = path.read_text()
    assert f"region level {level:g}" in text
    shown = Figures(text).shown
    assert shown and set(shown) <= set(maps)
    boxed = 0
    for relative, (src, found) in shown.items():
        size = (maps[relative].shape[1], maps[relative].shape[0])
        expected = [r.as_json() for r in regions_of(maps[relative], level, size)]
        assert found == expected, relative
        assert f"{len(found)} region" in text.split(f'alt="{relative}"', 1)[1].split("</figure>", 1)[0]
        if found:
            boxed += 1
            assert _magenta_pixels(src) > 0, relative
        else:
            assert maps[relative].max() < level and _magenta_pixels(src) == 0, relative
    assert 0 < boxed < len(shown)  # boxes on some images, none on those whose map never reaches the level


def test_a_version_without_a_level_says_why_it_shows_no_boxes(report):
    _, text = report
    (note,) = re.findall(r'<p class="note" id="regions-note">([^<]*)</p>', text)
    assert note.startswith("No region boxes") and ("no calibrated region level" in note or "no anomaly maps" in note)
    assert "data-regions" not in text and all(_magenta_pixels(src) == 0 for src in Page(text).images[4:])


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_chromium_renders_the_page_without_errors(report, tmp_path):
    path, _ = report
    shot = tmp_path / "shot.png"
    base = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}"]
    rendered = subprocess.run([*base, f"--screenshot={shot}", "--window-size=1280,4000", "--enable-logging=stderr",
                               "--v=0", path.as_uri()], capture_output=True, text=True, timeout=120, check=False)
    assert rendered.returncode == 0, rendered.stderr
    assert "Uncaught" not in rendered.stderr and "ERROR:CONSOLE" not in rendered.stderr
    with Image.open(shot) as image:
        assert image.size == (1280, 4000)
        pixels = np.asarray(image.convert("L"), float)
    assert pixels.std() > 20  # text, plots and images: not a blank page
    assert (pixels[:2000] < 128).mean() > 0.01  # dark ink in the upper half: the figures were drawn
    dom = subprocess.run([*base, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120,
                         check=False)
    assert dom.returncode == 0, dom.stderr
    page = Page(dom.stdout)
    assert {"roc", "histogram", "confusion", "kinds", "missed-defects"} <= set(page.sections)
    assert len(page.images) == len(Page(path.read_text()).images)


def test_a_report_path_that_is_a_folder_is_an_operator_error(fitted, test_set, tmp_path, capsys):
    code = cli.main(["evaluate", "--config", str(tool_config(tmp_path, fitted)), "--data", str(test_set),
                     "--report", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "a folder; name the HTML file to write" in err and "Traceback" not in err
