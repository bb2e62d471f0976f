"""Feature taps: stage indices, module paths, 'pre_logits' and 'preact:N' on the cifar_ zoo and timm models,
all from the one forward pass that also gives the logits."""
import pytest
import timm
import torch

import distill  # noqa: F401
from distill import DistillError, FeatureExtractor


def _model(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    for module in model.modules():  # non-trivial BN affine and statistics (timm zero-inits some BN weights)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
            module.running_mean.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.mark.parametrize('name', ['cifar_resnet8x4', 'cifar_vgg8', 'resnet18'])
def test_preact_is_the_stage_before_its_final_relu(name):
    model = _model(name)
    stages = len(model.feature_info)
    extractor = FeatureExtractor(model, [f'preact:{i}' for i in range(stages)] + list(range(stages)))
    images = torch.randn(2, 3, 32, 32)
    logits, features = extractor(images)
    torch.testing.assert_close(logits, model(images))
    for stage, (preact, feature) in enumerate(zip(features[:stages], features[stages:])):
        torch.testing.assert_close(preact.clamp(min=0), feature)
        if stage > 0:
            assert (preact < 0).any(), stage


def test_wrn_preact_is_the_stage_output_through_the_next_bn_as_in_repdistiller():
    model = _model('cifar_wrn_16_2')
    images = torch.randn(2, 3, 32, 32)
    _, (pre1, pre2, pre3, f1, f2, f3) = FeatureExtractor(model, ['preact:1', 'preact:2', 'preact:3', 1, 2, 3])(images)
    # RepDistiller models/wrn.py: f1 = block2.layer[0].bn1(f1); f2 = block3.layer[0].bn1(f2); f3 = bn1(f3)
    torch.testing.assert_close(pre1, model.block2.layer[0].bn1(f1))
    torch.testing.assert_close(pre2, model.block3.layer[0].bn1(f2))
    torch.testing.assert_close(pre3, model.bn1(f3))


def test_module_paths_pre_logits_and_vit_stages_in_one_pass():
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, depth=3, num_classes=10).eval()
    calls = []
    model.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    extractor = FeatureExtractor(model, [1, 'blocks.2.mlp', 'pre_logits'])
    images = torch.randn(2, 3, 32, 32)
    logits, (stage1, mlp, pooled) = extractor(images)
    assert len(calls) == 1
    torch.testing.assert_close(logits, model(images))
    assert stage1.shape == (2, 192, 2, 2)  # NCHW map, class token dropped
    assert mlp.shape == (2, 5, 192)  # raw tokens of a module path
    torch.testing.assert_close(pooled, model.forward_head(model.forward_features(images), pre_logits=True))


@pytest.mark.parametrize('tap, fragment', [
    (7, 'feature tap 7 is out of range: CifarResNet has 4 stages'),
    ('layer9', "feature tap 'layer9' is not a module of CifarResNet (did you mean 'layer3'?)"),
    ('preact:x', "feature tap 'preact:x': write 'preact:N' with a stage index N"),
    ('preact:5', 'feature tap 5 is out of range'),
    (1.5, "feature tap 1.5 must be a stage index, a module path, 'pre_logits' or 'preact:N'"),
])
def test_bad_taps_are_one_line_errors(tap, fragment):
    with pytest.raises(DistillError) as info:
        FeatureExtractor(_model('cifar_resnet8'), [tap])
    assert fragment in str(info.value) and '\n' not in str(info.value)


def test_a_tap_overwritten_in_place_is_refused():
    model = _model('cifar_resnet8')
    with pytest.raises(DistillError, match="feature tap 'bn1' of CifarResNet is modified in place"):
        FeatureExtractor(model, ['bn1'])(torch.randn(2, 3, 8, 8))
