"""In-memory datasets, the batched CRD augmentation, ImageFolder decoding/caching and class-count checks."""
import os

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from distill.config import DataConfig
from distill.data import augment_batch, build_data, load_split
from distill.errors import DistillError
from helpers import SHARED_CIFAR10


def test_digits_split_is_fixed_and_stratified():
    cfg = DataConfig(name='digits', image_size=8)
    train, val = load_split(cfg, True), load_split(cfg, False)
    assert len(train) + len(val) == 1797 and train.images.shape[1:] == (3, 8, 8)
    assert train.images.dtype == torch.uint8 and len(train.classes) == 10
    assert torch.bincount(val.labels).min() >= 35  # every class in the validation split
    assert torch.equal(load_split(cfg, True).images, train.images)
    subset = load_split(DataConfig(name='digits', image_size=16, train_per_class=5), True)
    assert subset.images.shape == (50, 3, 16, 16) and torch.bincount(subset.labels).tolist() == [5] * 10


def test_augment_batch_equals_torchvision_crop_and_flip_per_sample():
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(3)
    out = augment_batch(images, 4, True, gen)
    # replay the same draws and apply torchvision's functional ops one sample at a time
    replay = torch.Generator().manual_seed(3)
    top = torch.randint(0, 9, (6,), generator=replay)
    left = torch.randint(0, 9, (6,), generator=replay)
    flip = torch.rand(6, generator=replay) < 0.5
    for i in range(6):
        expected = TF.crop(TF.pad(images[i], [4]), int(top[i]), int(left[i]), 32, 32)
        expected = TF.horizontal_flip(expected) if flip[i] else expected
        assert torch.equal(out[i], expected)
    assert 0 < flip.sum() < 6 and len(set(top.tolist())) > 1


def test_loader_order_is_seeded_and_normalised():
    cfg = DataConfig(name='digits', image_size=8, batch_size=100, augment='crop', crop_padding=1)
    first = [batch.labels for batch in build_data(cfg, seed=1).train]
    again = [batch.labels for batch in build_data(cfg, seed=1).train]
    other = [batch.labels for batch in build_data(cfg, seed=2).train]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    images = torch.cat([batch.images for batch in build_data(DataConfig(name='digits', image_size=8, augment='none'), 0).train])
    assert images.mean().abs() < 1e-3 and (images.std() - 1).abs() < 1e-2  # train statistics by default


def test_class_count_mismatch_and_missing_dirs(tmp_path):
    with pytest.raises(DistillError, match='data.num_classes=100 but digits.*has 10 classes'):
        build_data(DataConfig(name='digits', num_classes=100), 0)
    with pytest.raises(DistillError, match='data directory not found'):
        build_data(DataConfig(name='imagefolder', root=str(tmp_path / 'missing')), 0)
    (tmp_path / 'train').mkdir()
    with pytest.raises(DistillError, match='has no class folders'):
        build_data(DataConfig(name='imagefolder', root=str(tmp_path)), 0)
    (tmp_path / 'train' / 'cat').mkdir()
    with pytest.raises(DistillError, match='train/cat holds no images'):
        build_data(DataConfig(name='imagefolder', root=str(tmp_path)), 0)
    with pytest.raises(DistillError, match='no val or test/ folder'):
        build_data(DataConfig(name='imagefolder', root=str(tmp_path), allow_empty_classes=True), 0)
    with pytest.raises(DistillError, match='cifar100 not found under'):
        build_data(DataConfig(name='cifar100', root=str(tmp_path)), 0)


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR10), reason='../shared/data/cifar10-jpeg not present')
def test_imagefolder_on_shared_cifar10_decodes_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv('DISTILL_CACHE', str(tmp_path))
    cfg = DataConfig(name='imagefolder', root=SHARED_CIFAR10, train_per_class=20, val_per_class=10)
    data = build_data(cfg, 0)
    assert data.num_classes == 10 and data.classes[0] == 'airplane'
    assert data.train.split.images.shape == (200, 3, 32, 32) and len(data.val.split) == 100
    cached = os.listdir(tmp_path / 'imagefolder')
    assert len(cached) == 2
    again = load_split(cfg, True)
    assert torch.equal(again.images, data.train.split.images)
    # a damaged cache file is rebuilt, not trusted
    for name in cached:
        (tmp_path / 'imagefolder' / name).write_bytes(b'garbage')
    assert torch.equal(load_split(cfg, True).images, data.train.split.images)


def test_every_randaugment_operation_accepts_its_whole_range_on_uint8_images():
    """The MLKD strong view draws each magnitude uniformly in [low, high): every operation must accept both ends
    (a solarize threshold above 255 once crashed a run; in PIL's sense it inverts nothing)."""
    from distill.data.randaugment import OPERATIONS, rand_augment
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    for name, operation, low, high in OPERATIONS:
        for value in (low, (low + high) / 2, high - 1e-3):
            out = operation(images[0], value)
            assert out.dtype == torch.uint8 and out.shape == images[0].shape, name
    solarize = dict((name, op) for name, op, *_ in OPERATIONS)['solarize']
    assert torch.equal(solarize(images[0], 255.9), images[0])
    inverted = solarize(images[0], 128)
    assert torch.equal(inverted, torch.where(images[0] >= 128, 255 - images[0], images[0]))
    out = rand_augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8


def test_an_npz_file_of_uint8_arrays_is_a_dataset_and_a_bad_one_is_one_line(tmp_path):
    """data.name=npz: image arrays as numpy holds them (N x H x W x 3) load as the digits split they were made
    from; a missing array, a float array or a file that is not an .npz is a one-line error."""
    import numpy as np
    train, test = (load_split(DataConfig(name='digits', image_size=8), train=t) for t in (True, False))
    path = tmp_path / 'digits.npz'
    np.savez(path, train_images=train.images.permute(0, 2, 3, 1).numpy(), train_labels=train.labels.numpy(),
             test_images=test.images.numpy(), test_labels=test.labels.numpy())
    for split, reference in ((True, train), (False, test)):
        loaded = load_split(DataConfig(name='npz', root=str(path), image_size=8), train=split)
        assert torch.equal(loaded.images, reference.images) and torch.equal(loaded.labels, reference.labels)
        assert loaded.classes == [str(i) for i in range(10)]
    np.savez(tmp_path / 'partial.npz', train_images=train.images.numpy())
    np.savez(tmp_path / 'float.npz', train_images=train.images.float().numpy(), train_labels=train.labels.numpy(),
             test_images=test.images.numpy(), test_labels=test.labels.numpy())
    (tmp_path / 'junk.npz').write_text('not an archive')
    for name, message in (('partial.npz', r"lacks the arrays \['train_labels', 'test_images', 'test_labels'\]"),
                          ('float.npz', 'train_images is float32 .* must be uint8 images'),
                          ('junk.npz', 'is not a readable .npz file'), ('absent.npz', 'is not a readable .npz')):
        with pytest.raises(DistillError, match=message):
            load_split(DataConfig(name='npz', root=str(tmp_path / name)), train=True)


def test_streamed_augmentation_is_a_function_of_epoch_seed_and_index_alone():
    """data.in_memory=false with timm's RandAugment: the batches of two epochs are the same with 0 or 2 persistent
    workers, each image regenerates bit-exactly from (the epoch's seed, its index) alone, and decoding in the
    training process leaves its torch, numpy and Python RNGs as they were."""
    import dataclasses
    import random
    import numpy as np
    cfg = DataConfig(name='imagefolder', root=SHARED_CIFAR10, in_memory=False, image_size=32, batch_size=12,
                     augment='random_resized_crop', auto_augment='rand-m9-mstd0.5-inc1')
    runs = {}
    for workers in (0, 2):
        loader = build_data(dataclasses.replace(cfg, workers=workers), seed=5).train
        states = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        threads = torch.get_num_threads()
        runs[workers] = [(next(iter(loader)), loader.epoch_seed) for _ in range(2)]
        assert torch.get_num_threads() == threads  # normalising on one thread beside the workers gives it back
        assert torch.equal(states[0], torch.get_rng_state()) and states[1] == random.getstate()
        assert np.array_equal(states[2], np.random.get_state()[1])
    assert loader._loader.persistent_workers and runs[0][0][1] != runs[0][1][1]
    for (batch, seed), (again, _) in zip(runs[0], runs[2]):
        assert torch.equal(batch.images, again.images) and torch.equal(batch.indices, again.indices)
        for position in (0, 7):
            pixels = loader.augmented(int(batch.indices[position]), seed)
            expected = ((pixels.float() / 255 - loader.mean[0]) / loader.std[0])
            assert torch.equal(batch.images[position], expected)  # the same bits, normalised on one thread or two
    with pytest.raises(DistillError, match="data.auto_augment='rand-x9' is not a timm augmentation string"):
        build_data(dataclasses.replace(cfg, auto_augment='rand-x9'), seed=0)
    with pytest.raises(DistillError, match='data.auto_augment is for streamed data'):
        from distill.config import from_dict
        from_dict({'data': {'auto_augment': 'rand-m9'}})


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR10), reason='../shared/data/cifar10-jpeg not present')
def test_host_work_runs_on_one_thread_beside_workers_and_changes_no_number():
    """The trainer erases and mixes a streamed batch inside ``host_work``: one torch thread while DataLoader workers
    hold the cores (two threads wait for each other there), the same bits as two threads; in memory, untouched."""
    from distill.data.batching import BatchLoader
    from distill.data.mixing import create_batch_augment
    from distill.data.sources import ImageSplit
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = DataConfig(name='imagefolder', root=SHARED_CIFAR10, in_memory=False, workers=2, image_size=32,
                         batch_size=16, augment='random_resized_crop', reprob=0.5, remode='pixel', mixup=0.8,
                         cutmix=1.0)
        loader = build_data(cfg, seed=0).train
        augment = create_batch_augment(cfg, False, 10, torch.device('cpu'))
        batch = next(iter(loader))
        with loader.host_work():
            assert torch.get_num_threads() == 1
            on_one = augment(batch._replace(images=batch.images.clone()), 7)
        assert torch.get_num_threads() == 2
        on_two = augment(batch._replace(images=batch.images.clone()), 7)
        assert torch.equal(on_one.images, on_two.images) and torch.equal(on_one.soft_targets, on_two.soft_targets)
        assert not torch.equal(on_one.images, batch.images)  # it erased and mixed
        split = ImageSplit(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), ['a'])
        with BatchLoader(split, 2, torch.zeros(3), torch.ones(3), True).host_work():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def v2_reference(train: bool, size: int, auto_augment=None, mean=(0.485, 0.456, 0.406)):
    """The torchvision v2 pipelines the streamed transforms stand for (ImageNet's crop and flip, evaluation)."""
    from torchvision.transforms import v2 as T
    from distill.data.image_transforms import auto_augment_transform
    if not train:
        return T.Compose([T.ToImage(), T.Resize(round(size / 0.875), antialias=True), T.CenterCrop(size),
                          T.ToDtype(torch.uint8)])
    if auto_augment:
        return T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(),
                          auto_augment_transform(auto_augment, size, mean), T.ToImage(), T.ToDtype(torch.uint8)])
    return T.Compose([T.ToImage(), T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(),
                      T.ToDtype(torch.uint8)])


@pytest.mark.parametrize('train,size,auto_augment', [(True, 48, 'rand-m9-mstd0.5-inc1'), (True, 32, None),
                                                     (True, 224, None), (False, 32, None), (False, 224, None)])
def test_the_streamed_transforms_give_torchvision_v2s_draws_and_pixels(train, size, auto_augment):
    """The streamed transforms skip torchvision v2's per-call dispatch (v1 classes on the PIL image before timm's
    RandAugment, v2's kernels called directly otherwise): every image, for every seed, is bit-identical to the v2
    pipeline, and the generators end where v2 leaves them, so streamed runs and their recordings are unchanged."""
    import glob
    from PIL import Image
    from distill.data.seeding import seeded
    from distill.data.image_transforms import image_transform
    ours = image_transform(train, 'random_resized_crop', size, 4, 0.875, auto_augment, (0.485, 0.456, 0.406))
    reference = v2_reference(train, size, auto_augment)
    files = sorted(glob.glob(os.path.join(SHARED_CIFAR10, 'train', '*', '*.jpg')))[::500]
    images = [Image.open(path).convert('RGB') for path in files] + [Image.new('RGB', (61, 23), (9, 99, 199))]
    for seed, image in enumerate(images):
        with seeded(seed):
            pixels, after = ours(image), torch.rand(1)
        with seeded(seed):
            expected, expected_after = reference(image), torch.rand(1)
        assert type(pixels) is torch.Tensor and pixels.dtype == torch.uint8 and pixels.shape == (3, size, size)
        assert torch.equal(pixels, expected.as_subclass(torch.Tensor)) and torch.equal(after, expected_after), seed


@pytest.mark.parametrize('size', [(32, 32), (500, 375), (375, 500), (300, 12), (12, 300)])
def test_the_streamed_crop_draws_torchvisions_crops_and_the_same_fallback(size):
    """distill's RandomResizedCrop (the log ratios computed once) returns torchvision's crop for every generator
    state, on square and ImageNet-shaped images and on strips where no draw fits (torchvision's central fallback),
    and leaves the generator where torchvision leaves it."""
    from PIL import Image
    from torchvision import transforms as V1
    from distill.data.image_transforms import RandomResizedCrop
    image, crop = Image.new('RGB', size), RandomResizedCrop(224)
    for seed in range(300):
        torch.manual_seed(seed)
        expected, after = V1.RandomResizedCrop.get_params(image, crop.scale, crop.ratio), torch.rand(1)
        torch.manual_seed(seed)
        assert crop.get_params(image, crop.scale, crop.ratio) == expected, seed
        assert torch.equal(torch.rand(1), after)


def test_pil_to_uint8_is_torchvisions_pil_to_tensor_made_contiguous():
    import numpy as np
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor
    from distill.data.image_transforms import pil_to_uint8
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (7, 5, 3), dtype=np.uint8))
    pixels = pil_to_uint8(image)
    assert type(pixels) is torch.Tensor and pixels.is_contiguous() and torch.equal(pixels, pil_to_tensor(image))


@pytest.mark.parametrize('config', ['rand-m10-mstd0-inc1', 'rand-m10-mstd0', 'original', 'augmix-m10-w4-d2'])
def test_every_timm_augmentation_op_runs_at_its_highest_magnitude(config):
    """timm's PosterizeIncreasing at magnitude 10 asks Pillow for 0 bits, which Pillow 11+ refuses (a streamed
    rand-m9-mstd0.5-inc1 run crashed on it): here it gives the black image older Pillow gave, and every other op of
    each policy runs on a real image."""
    import numpy as np
    from PIL import Image
    from distill.data.image_transforms import auto_augment_transform
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8))
    transform = auto_augment_transform(config, 32, (0.5, 0.5, 0.5))
    ops = getattr(transform, 'ops', None) or [op for ops in transform.policy for op in ops]
    for op in ops:
        op.prob = 1.0
        out = op(image)
        assert out.size == image.size, op.name
        if op.name == 'PosterizeIncreasing' and config.startswith('rand'):
            assert np.asarray(out).max() == 0


def test_link_subset_links_the_first_images_of_each_class_and_names_a_missing_split(tmp_path):
    from distill.data.imagefolder import link_subset
    for name in ('cat', 'dog'):
        (tmp_path / 'src' / 'train' / name).mkdir(parents=True)
        for index in range(3):
            (tmp_path / 'src' / 'train' / name / f'{index}.png').write_bytes(b'x')
    for _ in range(2):  # a second call keeps the links it finds
        link_subset(str(tmp_path / 'src'), str(tmp_path / 'dst'), {'train': 2})
    for name in ('cat', 'dog'):
        links = sorted((tmp_path / 'dst' / 'train' / name).iterdir())
        assert [link.name for link in links] == ['0.png', '1.png'] and all(link.is_symlink() for link in links)
    with pytest.raises(DistillError, match=r'image folder not found: .*src/test'):
        link_subset(str(tmp_path / 'src'), str(tmp_path / 'dst'), {'test': 1})
    # copy: plain files with the images' bytes (a tree that travels), nothing left beside them
    (tmp_path / 'src' / 'train' / 'cat' / '0.png').write_bytes(b'cat zero')
    link_subset(str(tmp_path / 'src'), str(tmp_path / 'copied'), {'train': 1}, copy=True)
    copied = sorted((tmp_path / 'copied' / 'train').glob('*/*'))
    assert [(path.parent.name, path.name, path.is_symlink()) for path in copied] == [('cat', '0.png', False),
                                                                                     ('dog', '0.png', False)]
    assert copied[0].read_bytes() == b'cat zero' and copied[1].read_bytes() == b'x'
