"""`inspector evaluate`: the figures against independent references, the whole command through the real
CLI on a fitted sample line, and the operator's mistakes."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import mannwhitneyu

from inspector import config
from inspector.errors import ConfigError
from inspector.stores import ModelStore
from inspector.tools import samples
from inspector.tools.evaluate import scan_test_set
from inspector.tools.figures import auroc, average_precision, best_f1_threshold, confusion, figures
from inspector.tools.refit import RefitOptions, run_refit
from inspector_dfkde.plugin import DfkdePlugin

SIZE = 128  # frames and model input: small, so the file stays quick on two cores


# -- the figures ---------------------------------------------------------------------------------


def _random_case(seed: int, n: int, levels: int):
    """Labels with both classes and scores on `levels` values, so ties are common (within and across classes)."""
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < rng.uniform(0.2, 0.8)
    labels[:2] = [True, False]
    scores = rng.integers(0, levels, n) / levels + 0.3 * labels * rng.random()
    return labels, scores


def test_sklearn_documentation_example():
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert auroc(labels, scores) == pytest.approx(0.75)
    assert average_precision(labels, scores) == pytest.approx(0.8333333333333333)


@pytest.mark.parametrize("seed", range(12))
def test_auroc_is_the_mann_whitney_u_with_ties(seed):
    labels, scores = _random_case(seed, n=20 + 15 * seed, levels=3 + seed)
    defective, good = scores[labels], scores[~labels]
    u = mannwhitneyu(defective, good, alternative="two-sided").statistic
    assert auroc(labels, scores) == pytest.approx(u / (len(defective) * len(good)), abs=1e-12)
    # a brute force over every pair, ties counting half
    pairs = (defective[:, None] > good[None, :]) + 0.5 * (defective[:, None] == good[None, :])
    assert auroc(labels, scores) == pytest.approx(pairs.mean(), abs=1e-12)


def _ap_by_positives(labels, scores) -> float:
    """The mean over defective images of the precision when every image scoring at least as high fails
    (a tie group is all in or all out, as in scikit-learn)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    precisions = [labels[scores >= s].sum() / (scores >= s).sum() for s in scores[labels]]
    return float(np.mean(precisions))


@pytest.mark.parametrize("seed", range(12))
def test_average_precision_against_a_brute_force(seed):
    labels, scores = _random_case(seed, n=10 + 20 * seed, levels=2 + seed)
    assert average_precision(labels, scores) == pytest.approx(_ap_by_positives(labels, scores), abs=1e-12)


def test_average_precision_known_cases():
    assert average_precision([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0  # perfectly sorted
    assert average_precision([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert average_precision([0, 1, 0, 1, 1], [0.5] * 5) == pytest.approx(0.6)  # one tie group: the prevalence
    # a tie across the classes at the top: precision 1/2 there for both recall steps... then 2/3
    assert average_precision([1, 0, 1, 0], [0.9, 0.9, 0.5, 0.1]) == pytest.approx((0.5 + 2 / 3) / 2)


def test_precision_recall_f1_at_the_threshold():
    labels = [0, 0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.7, 0.2, 0.5, 0.9, 0.3]
    c = confusion(labels, scores, 0.5)  # at the threshold fails, as in the worker
    assert (c.good_passed, c.good_failed, c.defective_passed, c.defective_failed) == (2, 2, 1, 2)
    assert c.precision == pytest.approx(0.5)
    assert c.recall == pytest.approx(2 / 3)
    assert c.f1 == pytest.approx(4 / 7)  # 2 * 0.5 * 2/3 / (0.5 + 2/3)
    assert c.false_reject_rate == pytest.approx(0.5)
    nothing_fails = confusion(labels, scores, 0.95)
    assert math.isnan(nothing_fails.precision) and nothing_fails.recall == 0 and nothing_fails.f1 == 0


def test_f1_best_threshold_known_case():
    labels = [0, 0, 1, 0, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.4, 0.8, 0.9]
    # F1 at 0.9, 0.8, 0.4, 0.3, 0.2, 0.1: 2/4, 4/5, 4/6, 6/7, 6/8, 6/9
    best = best_f1_threshold(labels, scores)
    assert best.threshold == 0.3 and best.next_below == 0.2
    assert best.f1 == pytest.approx(6 / 7)
    assert best.precision == pytest.approx(3 / 4) and best.recall == 1.0


@pytest.mark.parametrize("seed", range(8))
def test_f1_best_threshold_is_the_highest_of_the_best(seed):
    labels, scores = _random_case(seed, n=15 + 10 * seed, levels=4 + seed)
    best = best_f1_threshold(labels, scores)
    candidates = np.unique(scores)
    f1 = np.array([confusion(labels, scores, t).f1 for t in candidates])
    assert best.f1 == pytest.approx(f1.max(), abs=1e-12)
    assert best.threshold == candidates[np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))[-1]]
    at_best = confusion(labels, scores, best.threshold)
    assert (best.precision, best.recall) == pytest.approx((at_best.precision, at_best.recall))
    below = candidates[candidates < best.threshold]
    assert best.next_below == (below.max() if len(below) else None)


def test_figures_per_kind_and_one_class_refused():
    fig = figures(np.array([0.1, 0.2, 0.6]), {"scratch": np.array([0.7, 0.9]), "hole": np.array([0.15])}, 0.5)
    assert (fig.good, fig.defective) == (3, 3)
    assert fig.kinds["scratch"] == {"images": 2, "recall": 1.0, "auroc": 1.0}
    assert fig.kinds["hole"] == {"images": 1, "recall": 0.0, "auroc": pytest.approx(1 / 3)}  # above 0.1 only
    assert list(fig.kinds) == ["hole", "scratch"]
    with pytest.raises(ValueError):
        auroc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError):
        average_precision([0, 0], [0.2, 0.3])


# -- the folder layout -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A small labelled folder: 3 good, 1 per defect kind, 64 px."""
    root = tmp_path_factory.mktemp("tiny") / "test"
    samples.write_folder(root, 3, 1, size=64)
    return root


def test_layout_mistakes_name_the_folder_and_the_layout(tmp_path, tiny):
    only_good = tmp_path / "only_good"
    shutil.copytree(tiny / "good", only_good / "good")
    with pytest.raises(ConfigError, match=r"only_good: no defect folder beside good/; expected MVTec AD"):
        scan_test_set(only_good)
    empty_good = tmp_path / "empty_good"
    (empty_good / "good").mkdir(parents=True)
    shutil.copytree(tiny / "hole", empty_good / "hole")
    with pytest.raises(ConfigError, match=r"empty_good: no images in good/"):
        scan_test_set(empty_good)
    no_defects = tmp_path / "no_defects"
    shutil.copytree(tiny / "good", no_defects / "good")
    (no_defects / "scratch").mkdir()
    with pytest.raises(ConfigError, match=r"no images in any defect folder \(scratch\)"):
        scan_test_set(no_defects)
    category = tmp_path / "bottle"
    shutil.copytree(tiny, category / "test")
    with pytest.raises(ConfigError, match=r"no good/ folder.*pass --data .*bottle/test"):
        scan_test_set(category)


def test_layout_classes_and_what_is_left_out(tmp_path, tiny, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny, data)
    (data / "empty_kind").mkdir()
    (data / "scratch" / "day2").mkdir()
    shutil.copy(tiny / "scratch" / "000.png", data / "scratch" / "day2" / "000.PNG")
    shutil.copy(tiny / "good" / "000.png", data / "loose.png")
    (data / ".hidden").mkdir()
    with caplog.at_level(logging.WARNING):
        found = scan_test_set(data)
    assert len(found.good) == 3
    assert sorted(found.kinds) == sorted(samples.DEFECT_KINDS)  # the empty folder and the hidden one are not kinds
    assert len(found.kinds["scratch"]) == 2  # recursive, any case of suffix
    assert "empty_kind/ holds no images" in caplog.text and "loose.png" in caplog.text


# -- the command, through the real CLI --------------------------------------------------------------


def inspector(*args, cwd: Path, timeout: float = 180):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTOR_")}
    return subprocess.run([sys.executable, "-m", "inspector.cli", *args], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _config(root: Path, store: Path, name: str = "inspector.toml") -> Path:
    """No localisation maps: evaluate's figures come from the scores alone, and the maps' own backbone pass would
    double the fit (the report's page draws them: tests/test_report.py)."""
    path = root / name
    path.write_text(f'device = "cpu"\n[store]\npath = "{store}"\n[plugins.dfkde]\ninput_size = {SIZE}\n'
                    "localisation_maps = false\n")
    return path


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A sample line and a store with one calibrated version of `default` fitted on its train/good."""
    root = tmp_path_factory.mktemp("evaluate")
    samples.write_line(root / "line", train=80, test=20, defective_per_kind=4, size=SIZE)
    cfg = _config(root, root / "models")
    run_refit(config.load(cfg), RefitOptions(data=root / "line" / "train" / "good", model="default",
                                             held_out_share=0.3, target_false_reject=0.05, announce=False))
    return root, cfg


def _scores_by_calling_the_plugin(store: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of every image under data/, by PIL and the plugin directly (not the CLI's way)."""
    plugin = DfkdePlugin.load(ModelStore(store).load_path("default").path, torch.device("cpu"))
    files = sorted(data.rglob("*.png"))
    labels = np.array([f.parent.name != "good" for f in files])
    probability = []
    for start in range(0, len(files), 16):
        images = [np.array(Image.open(f).convert("RGB")) for f in files[start : start + 16]]
        probability.append(plugin.score(torch.stack([plugin.prepare(im) for im in images])).probability)
    return labels, np.concatenate(probability)


def test_evaluate_json_end_to_end(line):
    root, cfg = line
    result = inspector("evaluate", "--config", str(cfg), "--data", "line/test", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    store = ModelStore(root / "models")
    assert report["model"] == {"name": "default", "plugin": "dfkde", "version": store.current("default")}
    assert report["threshold"] == 0.5 and report["device"] == "cpu"
    assert report["images"] == {"found": 40, "scored": 40, "good": 20, "defective": 20, "unreadable": 0,
                                "unscored": 0}
    assert sorted(report["kinds"]) == sorted(samples.DEFECT_KINDS)
    assert all(kind["images"] == 4 for kind in report["kinds"].values())
    assert report["auroc"] >= 0.9

    labels, probability = _scores_by_calling_the_plugin(root / "models", root / "line" / "test")
    defective, good = probability[labels], probability[~labels]
    u = mannwhitneyu(defective, good, alternative="two-sided").statistic
    assert report["auroc"] == pytest.approx(u / (len(defective) * len(good)), abs=1e-9)
    assert report["average_precision"] == pytest.approx(_ap_by_positives(labels, probability), abs=1e-9)

    c = report["confusion"]
    assert sum(c.values()) == 40
    assert c["good_passed"] + c["good_failed"] == 20 and c["defective_passed"] + c["defective_failed"] == 20
    failed = probability >= 0.5
    assert c == {"good_passed": int((~labels & ~failed).sum()), "good_failed": int((~labels & failed).sum()),
                 "defective_passed": int((labels & ~failed).sum()), "defective_failed": int((labels & failed).sum())}
    assert report["at_threshold"]["false_reject_rate"] == pytest.approx(c["good_failed"] / 20)
    assert report["at_threshold"]["recall"] == pytest.approx(c["defective_failed"] / 20)
    assert sum(k["recall"] * 4 for k in report["kinds"].values()) == pytest.approx(c["defective_failed"])
    best = report["best_f1"]
    assert best["applied"] is False and best["f1"] >= report["at_threshold"]["f1"] - 1e-12


def test_evaluate_table_leaves_out_unreadable_files(line, tmp_path):
    root, cfg = line
    data = tmp_path / "test"
    shutil.copytree(root / "line" / "test", data)
    (data / "scratch" / "garbage.png").write_bytes(os.urandom(500))
    (data / "good" / "empty.jpg").write_bytes(b"")
    (data / "good" / "notes.txt").write_text("not an image")
    result = inspector("evaluate", "--config", str(cfg), "--data", str(data), "--batch-size", "7", cwd=root)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "skipping" in result.stderr and "garbage.png" in result.stderr and "empty.jpg" in result.stderr
    assert "notes.txt" not in result.stderr
    assert "40 images scored (20 good, 20 defective in 5 kinds), 2 left out (2 unreadable" in out
    for text in ("image AUROC", "average precision", "false-reject rate", "confusion", "F1-best threshold",
                 "for information only, not applied", *samples.DEFECT_KINDS):
        assert text in out, text
    print(out)


@pytest.mark.parametrize("case", ["no such folder", "no good folder", "unknown model"])
def test_operator_mistakes_exit_2_without_a_traceback(tmp_path, tiny, case):
    cfg = _config(tmp_path, tmp_path / "models")
    args = ["evaluate", "--config", str(cfg), "--data", str(tiny)]
    if case == "no such folder":
        args[-1], expected = str(tmp_path / "nowhere"), "nowhere: no such folder; expected MVTec AD's test/ layout"
    elif case == "no good folder":
        args[-1], expected = str(tiny.parent), "no good/ folder; expected MVTec AD's test/ layout"
    else:
        args += ["--model", "other"]
        expected = "--model 'other' is not a configured model; configured: default"
    result = inspector(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_empty_store_exits_1_and_says_to_refit(tmp_path, tiny):
    cfg = _config(tmp_path, tmp_path / "models")
    result = inspector("evaluate", "--config", str(cfg), "--data", str(tiny), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "no current version" in result.stderr and "inspector refit --model default" in result.stderr
    assert "Traceback" not in result.stderr
