"""ResNet parameter names and shapes against torchvision's (written out: torchvision is not importable here)."""

from __future__ import annotations

import pytest
import torch

from data_pipeline.errors import UserError
from training.models.resnet import resnet

# torchvision.models.resnet18().state_dict(): "name shape" per line, in order (empty shape: a scalar).
TORCHVISION_RESNET18 = """
    conv1.weight 64,3,7,7
    bn1.weight 64
    bn1.bias 64
    bn1.running_mean 64
    bn1.running_var 64
    bn1.num_batches_tracked
    layer1.0.conv1.weight 64,64,3,3
    layer1.0.bn1.weight 64
    layer1.0.bn1.bias 64
    layer1.0.bn1.running_mean 64
    layer1.0.bn1.running_var 64
    layer1.0.bn1.num_batches_tracked
    layer1.0.conv2.weight 64,64,3,3
    layer1.0.bn2.weight 64
    layer1.0.bn2.bias 64
    layer1.0.bn2.running_mean 64
    layer1.0.bn2.running_var 64
    layer1.0.bn2.num_batches_tracked
    layer1.1.conv1.weight 64,64,3,3
    layer1.1.bn1.weight 64
    layer1.1.bn1.bias 64
    layer1.1.bn1.running_mean 64
    layer1.1.bn1.running_var 64
    layer1.1.bn1.num_batches_tracked
    layer1.1.conv2.weight 64,64,3,3
    layer1.1.bn2.weight 64
    layer1.1.bn2.bias 64
    layer1.1.bn2.running_mean 64
    layer1.1.bn2.running_var 64
    layer1.1.bn2.num_batches_tracked
    layer2.0.conv1.weight 128,64,3,3
    layer2.0.bn1.weight 128
    layer2.0.bn1.bias 128
    layer2.0.bn1.running_mean 128
    layer2.0.bn1.running_var 128
    layer2.0.bn1.num_batches_tracked
    layer2.0.conv2.weight 128,128,3,3
    layer2.0.bn2.weight 128
    layer2.0.bn2.bias 128
    layer2.0.bn2.running_mean 128
    layer2.0.bn2.running_var 128
    layer2.0.bn2.num_batches_tracked
    layer2.0.downsample.0.weight 128,64,1,1
    layer2.0.downsample.1.weight 128
    layer2.0.downsample.1.bias 128
    layer2.0.downsample.1.running_mean 128
    layer2.0.downsample.1.running_var 128
    layer2.0.downsample.1.num_batches_tracked
    layer2.1.conv1.weight 128,128,3,3
    layer2.1.bn1.weight 128
    layer2.1.bn1.bias 128
    layer2.1.bn1.running_mean 128
    layer2.1.bn1.running_var 128
    layer2.1.bn1.num_batches_tracked
    layer2.1.conv2.weight 128,128,3,3
    layer2.1.bn2.weight 128
    layer2.1.bn2.bias 128
    layer2.1.bn2.running_mean 128
    layer2.1.bn2.running_var 128
    layer2.1.bn2.num_batches_tracked
    layer3.0.conv1.weight 256,128,3,3
    layer3.0.bn1.weight 256
    layer3.0.bn1.bias 256
    layer3.0.bn1.running_mean 256
    layer3.0.bn1.running_var 256
    layer3.0.bn1.num_batches_tracked
    layer3.0.conv2.weight 256,256,3,3
    layer3.0.bn2.weight 256
    layer3.0.bn2.bias 256
    layer3.0.bn2.running_mean 256
    layer3.0.bn2.running_var 256
    layer3.0.bn2.num_batches_tracked
    layer3.0.downsample.0.weight 256,128,1,1
    layer3.0.downsample.1.weight 256
    layer3.0.downsample.1.bias 256
    layer3.0.downsample.1.running_mean 256
    layer3.0.downsample.1.running_var 256
    layer3.0.downsample.1.num_batches_tracked
    layer3.1.conv1.weight 256,256,3,3
    layer3.1.bn1.weight 256
    layer3.1.bn1.bias 256
    layer3.1.bn1.running_mean 256
    layer3.1.bn1.running_var 256
    layer3.1.bn1.num_batches_tracked
    layer3.1.conv2.weight 256,256,3,3
    layer3.1.bn2.weight 256
    layer3.1.bn2.bias 256
    layer3.1.bn2.running_mean 256
    layer3.1.bn2.running_var 256
    layer3.1.bn2.num_batches_tracked
    layer4.0.conv1.weight 512,256,3,3
    layer4.0.bn1.weight 512
    layer4.0.bn1.bias 512
    layer4.0.bn1.running_mean 512
    layer4.0.bn1.running_var 512
    layer4.0.bn1.num_batches_tracked
    layer4.0.conv2.weight 512,512,3,3
    layer4.0.bn2.weight 512
    layer4.0.bn2.bias 512
    layer4.0.bn2.running_mean 512
    layer4.0.bn2.running_var 512
    layer4.0.bn2.num_batches_tracked
    layer4.0.downsample.0.weight 512,256,1,1
    layer4.0.downsample.1.weight 512
    layer4.0.downsample.1.bias 512
    layer4.0.downsample.1.running_mean 512
    layer4.0.downsample.1.running_var 512
    layer4.0.downsample.1.num_batches_tracked
    layer4.1.conv1.weight 512,512,3,3
    layer4.1.bn1.weight 512
    layer4.1.bn1.bias 512
    layer4.1.bn1.running_mean 512
    layer4.1.bn1.running_var 512
    layer4.1.bn1.num_batches_tracked
    layer4.1.conv2.weight 512,512,3,3
    layer4.1.bn2.weight 512
    layer4.1.bn2.bias 512
    layer4.1.bn2.running_mean 512
    layer4.1.bn2.running_var 512
    layer4.1.bn2.num_batches_tracked
    fc.weight 1000,512
    fc.bias 1000
"""

# A spot-check of torchvision.models.resnet50().state_dict().
TORCHVISION_RESNET50_SAMPLE = {
    "conv1.weight": (64, 3, 7, 7),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.running_var": (256,),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (512, 256, 1, 1),
    "layer3.5.bn2.running_mean": (256,),
    "layer3.5.conv3.weight": (1024, 256, 1, 1),
    "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "layer4.2.bn3.num_batches_tracked": (),
    "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}


def _expected_resnet18() -> dict[str, tuple[int, ...]]:
    expected = {}
    for line in TORCHVISION_RESNET18.strip().splitlines():
        name, _, shape = line.strip().partition(" ")
        expected[name] = tuple(int(size) for size in shape.split(",")) if shape else ()
    return expected


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def test_resnet18_matches_torchvision_names_and_shapes() -> None:
    assert list(_shapes(resnet(18, num_classes=1000)).items()) == list(_expected_resnet18().items())


def test_encoder_state_dict_misses_only_fc() -> None:
    expected = _expected_resnet18()
    encoder = _shapes(resnet(18))
    assert sorted(set(expected) - set(encoder)) == ["fc.bias", "fc.weight"]
    assert all(expected[name] == shape for name, shape in encoder.items())


def test_resnet50_spot_check_and_parameter_count() -> None:
    model = resnet(50, num_classes=1000)
    shapes = _shapes(model)
    assert {name: shapes[name] for name in TORCHVISION_RESNET50_SAMPLE} == TORCHVISION_RESNET50_SAMPLE
    assert len(shapes) == 320
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    encoder = resnet(50)
    assert sum(p.numel() for p in encoder.parameters()) == 23_508_032
    assert encoder.feature_dim == 2048


def test_resnet18_parameter_count() -> None:
    assert sum(p.numel() for p in resnet(18, num_classes=1000).parameters()) == 11_689_512


def test_cifar_stem_keeps_resolution_until_layer2() -> None:
    model = resnet(18, cifar_stem=True).eval()
    assert model.conv1.weight.shape == (64, 3, 3, 3)
    stem = model.maxpool(model.relu(model.bn1(model.conv1(torch.zeros(1, 3, 32, 32)))))
    assert stem.shape == (1, 64, 32, 32)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_forward_shapes_and_zero_init_residual() -> None:
    model = resnet(18, num_classes=10, zero_init_residual=True).eval()
    assert torch.all(model.layer1[0].bn2.weight == 0)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_unknown_depth_is_a_user_error() -> None:
    with pytest.raises(UserError, match="ResNet depth 19 is not one of"):
        resnet(19)
