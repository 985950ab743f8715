import numpy as np
import pytest
import torch

from dmdd.errors import BackboneError
from dmdd.models.backbone import available_backbones, build_backbone, register_backbone

OFFLINE = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
RANDOM_INIT = ["resnet18", "resnet34", "resnet50", "wide_resnet50_2"]


@pytest.mark.parametrize("name", OFFLINE + RANDOM_INIT)
def test_four_stages_with_reported_channels_and_strides(name):
    bb = build_backbone(name, pretrained=name in OFFLINE)
    assert len(bb.stages) == 4 and bb.strides == (4, 8, 16, 32)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for stage, c, s in zip(bb.stages.eval(), bb.channels, bb.strides):
            x = stage(x)
            assert x.shape == (1, c, 64 // s, 64 // s)
            assert torch.isfinite(x).all()
    assert len(bb.mean) == 3 and len(bb.std) == 3


def test_reported_lite0_channels_and_normalisation():
    bb = build_backbone("efficientnet_lite0")
    assert bb.channels == (24, 40, 112, 320)
    assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.5, 0.5, 0.5)
    assert build_backbone("wide_resnet50_2", pretrained=False).channels == (256, 512, 1024, 2048)


def _top5(bb, image: np.ndarray) -> list[int]:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)
    with torch.no_grad():
        for stage in bb.stages.eval():
            x = stage(x)
        logits = bb.head.eval()(x)
    return logits.topk(5).indices[0].tolist()


def test_lite0_imagenet_weights_are_really_loaded():
    skimage_data = pytest.importorskip("skimage.data")
    cat = skimage_data.chelsea()
    cats = set(range(281, 286))
    assert cats & set(_top5(build_backbone("efficientnet_lite0", pretrained=True), cat))
    torch.manual_seed(0)
    assert not cats & set(_top5(build_backbone("efficientnet_lite0", pretrained=False), cat))


def test_unknown_backbone_names_the_choices():
    with pytest.raises(BackboneError, match="unknown backbone 'vgg'.*efficientnet_lite0"):
        build_backbone("vgg")


def test_weights_file_of_another_architecture_is_rejected(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torch.nn.Linear(3, 3).state_dict(), path)
    with pytest.raises(BackboneError, match="does not match backbone 'resnet18'"):
        build_backbone("resnet18", weights=path)


def test_local_weights_file_is_loaded(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    bb = build_backbone("resnet18", weights=path)
    assert torch.equal(bb.stages[1][0].conv1.weight, reference.layer2[0].conv1.weight)


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(BackboneError, match="weights file not found"):
        build_backbone("efficientnet_lite0", weights=tmp_path / "nope.pth")


def test_registry_refuses_duplicates():
    assert "wide_resnet50_2" in available_backbones()
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18")(lambda pretrained, weights: None)
