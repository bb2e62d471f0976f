"""The cifar_* zoo: registered in timm, RepDistiller-compatible keys, equal forward to the reference."""
import json
import os

import pytest
import timm
import torch

import distill  # noqa: F401  (registers the cifar_* models)
from distill.errors import DistillError
from distill.models import load_weights
from reference_weights import fill_by_key, reference_input

with open(os.path.join(os.path.dirname(__file__), 'data', 'repdistiller_reference.json')) as f:
    REFERENCE = json.load(f)

# Parameter counts at 100 classes quoted by the issue from the reference implementations.
QUOTED_PARAMS = {
    'cifar_resnet8x4': 1_233_540, 'cifar_resnet32x4': 7_433_860, 'cifar_wrn_16_2': 703_284,
    'cifar_wrn_40_1': 569_780, 'cifar_wrn_40_2': 2_255_156, 'cifar_vgg8': 3_965_028, 'cifar_vgg13': 9_462_180,
    # the cross-architecture models, counted on RepDistiller's definitions (the DKD/ReviewKD tables round them
    # to 0.81M, 0.95M, 1.36M and 23.71M)
    'cifar_mobilenetv2': 812_836, 'cifar_shufflenetv1': 949_258, 'cifar_shufflenetv2': 1_355_528,
    'cifar_resnet50': 23_705_252,
}


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_keys_params_and_logits_match_repdistiller(name):
    ref = REFERENCE[name]
    model = fill_by_key(timm.create_model(name, num_classes=100))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref['state_dict']
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == ref['num_params'] == QUOTED_PARAMS.get(name, num_params)
    with torch.no_grad():
        logits = model(reference_input())
        features = model.forward_intermediates(reference_input(), intermediates_only=True)
    torch.testing.assert_close(logits, torch.tensor(ref['logits']), rtol=1e-4, atol=1e-4)
    assert len(features) == len(model.feature_info) == len(ref['features'])
    for feature, ref_feature, info in zip(features, ref['features'], model.feature_info):
        assert list(feature.shape) == ref_feature['shape']
        assert feature.shape[1] == info['num_chs'] and 32 // feature.shape[-1] == info['reduction']
        assert feature.mean().item() == pytest.approx(ref_feature['mean'], rel=1e-3, abs=1e-4)
        assert feature.abs().mean().item() == pytest.approx(ref_feature['abs_mean'], rel=1e-3, abs=1e-4)


@pytest.mark.parametrize('name', ['cifar_mobilenetv2', 'cifar_shufflenetv1', 'cifar_shufflenetv2', 'cifar_resnet50'])
def test_preact_taps_match_repdistiller_preact_features(name):
    """'preact:N' on the cross-architecture models equals RepDistiller's ``is_feat=True, preact=True`` features
    (recorded from its own definitions, see tests/reference_weights.py)."""
    from distill.models.features import FeatureExtractor
    model = fill_by_key(timm.create_model(name, num_classes=100))
    ref = REFERENCE[name]['preact_features']
    with torch.no_grad():
        _, features = FeatureExtractor(model, [f'preact:{i}' for i in range(len(ref))])(reference_input())
    for feature, ref_feature in zip(features, ref):
        assert list(feature.shape) == ref_feature['shape']
        assert feature.mean().item() == pytest.approx(ref_feature['mean'], rel=1e-3, abs=1e-4)
        assert feature.abs().mean().item() == pytest.approx(ref_feature['abs_mean'], rel=1e-3, abs=1e-4)


def test_all_issue_models_registered():
    names = set(timm.list_models('cifar_*'))
    for required in ['cifar_resnet20', 'cifar_resnet32', 'cifar_resnet56', 'cifar_resnet110', 'cifar_resnet8x4',
                     'cifar_resnet32x4', 'cifar_wrn_16_2', 'cifar_wrn_40_1', 'cifar_wrn_40_2', 'cifar_vgg8',
                     'cifar_vgg13', 'cifar_mobilenetv2', 'cifar_shufflenetv1', 'cifar_shufflenetv2', 'cifar_resnet50']:
        assert required in names


@pytest.mark.parametrize('name', ['cifar_resnet8x4', 'cifar_wrn_16_2', 'cifar_vgg8', 'cifar_mobilenetv2',
                                  'cifar_shufflenetv1', 'cifar_shufflenetv2', 'cifar_resnet50'])
def test_timm_api(name):
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(3, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape[1] == model.num_features
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (3, model.num_features)
    torch.testing.assert_close(model.forward_head(features), model(x))
    # forward_intermediates: last-n and explicit indices, stop_early, final tensor equals forward_features
    final, taken = model.forward_intermediates(x, indices=[1, -1])
    torch.testing.assert_close(final, features)
    assert [t.shape[1] for t in taken] == [model.feature_info[1]['num_chs'], model.feature_info[-1]['num_chs']]
    early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], taken[0])
    # reset_classifier swaps the head for a new class count; 0 gives pooled features
    model.reset_classifier(7)
    assert model(x).shape == (3, 7) and model.get_classifier().out_features == 7
    model.reset_classifier(0)
    assert model(x).shape == (3, model.num_features)
    # timm's features_only wrapper works through forward_intermediates
    backbone = timm.create_model(name, features_only=True, out_indices=(1, 2))
    assert [f.shape[1] for f in backbone(x)] == backbone.feature_info.channels()
    assert model.pretrained_cfg['input_size'] == (3, 32, 32)


def test_models_accept_other_resolutions():
    model = timm.create_model('cifar_vgg8', num_classes=10).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    assert timm.create_model('cifar_resnet8', num_classes=10)(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_repdistiller_checkpoint_loads_strict(tmp_path):
    teacher = fill_by_key(timm.create_model('cifar_resnet8x4', num_classes=100))
    # The public ckpt_epoch_240.pth layout: {'epoch', 'model', 'accuracy', 'optimizer'}.
    path = tmp_path / 'ckpt_epoch_240.pth'
    torch.save({'epoch': 240, 'model': teacher.state_dict(), 'accuracy': torch.tensor(73.1),
                'optimizer': torch.optim.SGD(teacher.parameters(), lr=0.1).state_dict()}, path)
    loaded = load_weights(timm.create_model('cifar_resnet8x4', num_classes=100), str(path)).eval()
    x = reference_input()
    torch.testing.assert_close(loaded(x), teacher(x))
    # DataParallel-saved weights ('module.' prefix) load too
    torch.save({'model': {'module.' + k: v for k, v in teacher.state_dict().items()}}, path)
    load_weights(timm.create_model('cifar_resnet8x4', num_classes=100), str(path))


def test_checkpoint_for_wrong_model_is_one_line_error(tmp_path):
    path = tmp_path / 'ckpt.pth'
    torch.save({'model': timm.create_model('cifar_resnet8x4', num_classes=100).state_dict()}, path)
    with pytest.raises(DistillError, match='shape mismatch|missing keys'):
        load_weights(timm.create_model('cifar_resnet32x4', num_classes=100), str(path))
    with pytest.raises(DistillError, match='classifier has 100 classes but the data has 10'):
        load_weights(timm.create_model('cifar_resnet8x4', num_classes=10), str(path))
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DistillError, match='corrupt or truncated'):
        load_weights(timm.create_model('cifar_resnet8x4', num_classes=100), str(path))
    with pytest.raises(DistillError, match='not found'):
        load_weights(timm.create_model('cifar_resnet8x4', num_classes=100), str(tmp_path / 'nope.pth'))


ZOO = timm.list_models('cifar_*') + timm.list_models('mnist_mlp*')


@pytest.mark.parametrize('name', ZOO)
def test_the_zoo_takes_timms_standard_model_arguments(name):
    """What timm's train.py passes (its None defaults are dropped by create_model): every model is built on the
    device and in the dtype asked for and runs there."""
    chans, size = (1, 28) if name.startswith('mnist') else (3, 32)
    model = timm.create_model(name, pretrained=False, in_chans=chans, num_classes=10, drop_rate=0.0,
                              drop_path_rate=None, drop_block_rate=None, global_pool=None, bn_momentum=None,
                              bn_eps=None, scriptable=None, checkpoint_path='', device='cpu', dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64} and model.in_chans == chans
    assert model.eval()(torch.randn(2, chans, size, size, dtype=torch.float64)).shape == (2, 10)


def test_drop_rate_is_dropout_before_the_classifier_and_drop_path_is_refused():
    torch.manual_seed(0)
    plain = timm.create_model('cifar_resnet8', num_classes=10)
    dropped = timm.create_model('cifar_resnet8', num_classes=10, drop_rate=0.5, global_pool='avg')
    dropped.load_state_dict(plain.state_dict())
    images = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(dropped.eval()(images), plain.eval()(images))
    features = plain.forward_features(images)
    torch.manual_seed(1)
    expected = plain.fc(torch.nn.functional.dropout(features.mean((2, 3)), 0.5, training=True))
    torch.manual_seed(1)
    torch.testing.assert_close(dropped.train().forward_head(features), expected)
    with pytest.raises(ValueError, match='cifar_resnet8 has no stochastic depth'):
        timm.create_model('cifar_resnet8', drop_path_rate=0.1)
