"""MNIST for Hinton et al. (2015) §3: the IDX source (md5-checked), transfer sets, the ``mnist_mlp`` zoo, the
max-norm constraint, translation jitter, and the output-bias fit."""
import gzip
import os
import shutil

import pytest
import timm
import torch

import distill  # noqa: F401 (registers the models)
from distill.tools.bias import bias_report, fit_bias_on
from distill.config import DataConfig
from distill.data import build_data, load_split
from distill.errors import DistillError
from distill.training.stepping import max_norm_constraint

SHARED_MNIST = os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data', 'mnist')
needs_mnist = pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason='../shared/data/mnist is absent')
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_mnist
def test_mnist_reads_the_real_idx_files_with_their_label_counts():
    cfg = DataConfig(name='mnist', root=SHARED_MNIST, image_size=28)
    train, test = load_split(cfg, True), load_split(cfg, False)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.bincount(train.labels).tolist() == TRAIN_COUNTS
    assert torch.bincount(test.labels).tolist() == TEST_COUNTS and test.classes == [str(d) for d in range(10)]
    assert int(train.images.max()) == 255 and abs(train.images.float().mean().item() / 255 - 0.1307) < 1e-4


@needs_mnist
def test_transfer_sets_change_the_training_split_only():
    without_3 = DataConfig(name='mnist', root=SHARED_MNIST, image_size=28, exclude_classes=[3])
    train, test = load_split(without_3, True), load_split(without_3, False)
    assert 3 not in train.labels.tolist() and len(train) == 60000 - TRAIN_COUNTS[3]
    assert len(test) == 10000 and len(train.classes) == 10
    only = load_split(DataConfig(name='mnist', root=SHARED_MNIST, image_size=28, include_classes=['7', 8]), True)
    assert torch.bincount(only.labels, minlength=10).tolist() == [0] * 7 + TRAIN_COUNTS[7:9] + [0]
    bundle = build_data(without_3, seed=0)  # normalised with MNIST's own statistics, whatever the transfer set
    assert bundle.channels == 1 and torch.allclose(bundle.train.mean.flatten(), torch.tensor([0.1307]))
    with pytest.raises(DistillError, match=r"data.exclude_classes \['x'\] not in mnist"):
        load_split(DataConfig(name='mnist', root=SHARED_MNIST, image_size=28, exclude_classes=['x']), True)


@needs_mnist
@pytest.mark.parametrize('damage, message', [
    ('missing', r"MNIST file t10k-labels-idx1-ubyte\(.gz\) not found under"),
    ('truncated', r"does not decompress"),
    ('other', r"is not the original MNIST t10k-labels-idx1-ubyte \(md5 .*expected 27ae3e4e"),
])
def test_bad_mnist_files_are_named_in_one_line(tmp_path, damage, message):
    for name in os.listdir(SHARED_MNIST):
        shutil.copy(os.path.join(SHARED_MNIST, name), tmp_path / name)
    labels = tmp_path / 't10k-labels-idx1-ubyte.gz'
    if damage == 'missing':
        labels.unlink()
    elif damage == 'truncated':
        labels.write_bytes(labels.read_bytes()[:-100])
    else:
        labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-1] + b'\x07'))
    with pytest.raises(DistillError, match=message):
        load_split(DataConfig(name='mnist', root=str(tmp_path), image_size=28), False)


@pytest.mark.parametrize('name, widths', [('mnist_mlp_1200', [1200, 1200]), ('mnist_mlp_800', [800, 800]),
                                          ('mnist_mlp_300', [300, 300]), ('mnist_mlp_30', [30, 30])])
def test_mnist_mlps_follow_the_paper_and_timm_api(name, widths):
    model = timm.create_model(name, drop_rate=0.5, input_drop_rate=0.2).eval()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == list(zip([784] + widths, widths + [10]))
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(model(x), model.forward_head(model.forward_features(x)))
    assert [f['num_chs'] for f in model.feature_info] == widths
    final, hidden = model.forward_intermediates(x)
    assert torch.equal(final, hidden[-1]) and [h.shape[1] for h in hidden] == widths
    features = timm.create_model(name, features_only=True)
    assert [f.shape[1] for f in features(x)] == widths
    model.reset_classifier(4)
    assert model(x).shape == (3, 4)
    model.train()  # dropout: 20% of the inputs, 50% of the hidden units
    assert model.input_drop.p == 0.2 and all(block[2].p == 0.5 for block in model.blocks)
    assert timm.create_model('mnist_mlp', hidden=[50]).fc.in_features == 50


def test_max_norm_bounds_every_hidden_units_incoming_weights_but_not_the_classifier():
    model = timm.create_model('mnist_mlp_30')
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(50)
    before = model.fc.weight.clone()
    max_norm_constraint(model, 2.0)()
    for block in model.blocks:
        norms = block[0].weight.norm(dim=1)
        assert norms.max() <= 2.0 * (1 + 1e-6) and norms.min() > 1.99  # float32 rounding of the rescaled rows
    assert torch.equal(model.fc.weight, before)  # the output layer is not a hidden unit
    assert max_norm_constraint(model, None) is None


def test_jitter_is_a_translation_by_up_to_the_padding_in_each_direction():
    """augment: crop with crop_padding N moves the digit by up to N pixels left/right and up/down (zero fill)."""
    from distill.data import augment_batch
    image = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    image[0, 0, 14, 14] = 255
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        moved = augment_batch(image, 2, False, generator)
        row, col = (moved[0, 0] == 255).nonzero()[0].tolist()
        seen.add((row - 14, col - 14))
    assert seen == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}


def _brute_force_best(logits, labels, classes):
    deltas = torch.arange(-30, 30, 0.005)
    errors = torch.stack([(logits.index_add(1, torch.tensor(classes), torch.full((len(logits), len(classes)),
                                                                                   float(d))).argmax(1) != labels).sum()
                          for d in deltas])
    return int(errors.min())


@pytest.mark.parametrize('classes', [[3], [7, 8]])
def test_fit_bias_finds_the_fewest_errors(classes):
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 10, (400,), generator=generator)
    logits = torch.randn(400, 10, generator=generator) * 3
    logits[torch.arange(400), labels] += 2.5
    logits[:, classes] -= 4  # a student that never saw these classes
    delta = fit_bias_on(logits, labels, classes)
    fitted = bias_report(logits, labels, classes, delta)
    assert fitted['errors'] == _brute_force_best(logits, labels, classes)
    assert fitted['errors'] < bias_report(logits, labels)['errors'] and 2 < delta < 8
    assert sum(fitted['class_errors']) == fitted['errors'] and sum(fitted['class_counts']) == 400
