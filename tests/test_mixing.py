"""Random erasing and mixup / CutMix batches (distill/data/mixing.py) against timm's, and through record and
replay."""
import numpy as np
import pytest
import torch
from timm.data import Mixup

from distill.config import DataConfig
from distill.data import Batch
from distill.data.mixing import BatchEraser, BatchMixer
from distill.data.seeding import seeded
from distill.errors import DistillError
from distill.training.trainer import Trainer
from test_teacher_record import run_config, setup, train_epochs  # noqa: F401 (setup is a fixture)


@pytest.mark.parametrize('mixup, cutmix', [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_a_mixed_batch_is_timms_batch_mode_mixup(mixup, cutmix):
    """Same numpy seed, same batch: the images and label distributions of timm's Mixup(mode='batch'), for mixup,
    CutMix and the switch between them (half the batches unmixed at mix_prob 0.5)."""
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    ours = BatchMixer(DataConfig(mixup=mixup, cutmix=cutmix, mix_prob=0.5), num_classes=5)
    timm_mixup = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, prob=0.5, switch_prob=0.5, mode='batch',
                       label_smoothing=0.0, num_classes=5)
    unmixed = 0
    for seed in range(12):
        mixed = ours(Batch(images, labels), seed)
        np.random.seed(seed)
        expected_images, expected_targets = timm_mixup(images.clone(), labels)
        assert torch.equal(mixed.images, expected_images) and torch.equal(mixed.soft_targets, expected_targets)
        unmixed += torch.equal(mixed.images, images)
    assert 0 < unmixed < 12


def test_an_erased_batch_is_timms_random_erasing():
    """Same seed: the boxes and noise of timm's RandomErasing (pixel mode, up to 2 boxes), in place as timm's."""
    from timm.data.random_erasing import RandomErasing
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 16, 16), torch.arange(6)
    expected = images.clone()
    with seeded(7):
        RandomErasing(probability=0.5, mode='pixel', max_count=2, device='cpu')(expected)
    original = images.clone()
    erased = BatchEraser(DataConfig(reprob=0.5, remode='pixel', recount=2), torch.device('cpu'))(Batch(images, labels),
                                                                                                7)
    assert torch.equal(erased.images, expected) and not torch.equal(expected, original)
    assert erased.images is images  # a loader's batch is made afresh: no copy


@pytest.mark.slow  # records and replays two streamed runs (~30 s)
def test_mixed_batches_record_and_replay_and_refuse_single_class_terms(tmp_path, setup):  # noqa: F811
    """Teacher and student see the same erased and mixed batch; a replay of an erasing + mixup + CutMix recording
    erases and mixes as the recording run did (its students end bit-equal); DKD (one class per sample) and the views
    table are refused."""
    mixing = {'mixup': 0.8, 'cutmix': 1.0, 'reprob': 0.5}
    recorder = train_epochs(Trainer(run_config(tmp_path, setup, 'record', 'record', **mixing), quiet=True), 2)
    replay = train_epochs(Trainer(run_config(tmp_path, setup, 'replay', 'replay', **mixing), quiet=True), 2)
    for (name, a), b in zip(recorder.distiller.student.state_dict().items(),
                            replay.distiller.student.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(DistillError, match='no recording .* differs in erasing, mixing'):
        Trainer(run_config(tmp_path, setup, 'unmixed', 'replay'), quiet=True)
    dkd = run_config(tmp_path, setup, 'dkd', 'record', **mixing)
    dkd.losses = {'ce': 1.0, 'dkd': 1.0}
    with pytest.raises(DistillError, match='a loss term reads one class per sample'):
        Trainer(dkd, quiet=True)
    views = run_config(tmp_path, setup, 'views', 'views', in_memory=True, augment='crop_flip', auto_augment=None,
                       **mixing)
    with pytest.raises(DistillError, match='erased or mixed images are not among the crop-and-flip views'):
        Trainer(views, quiet=True)


def test_a_term_reading_the_labels_of_a_mixed_batch_without_declaring_them_stops_in_one_line():
    """A term that reads ``step.targets`` but forgot ``Need.CLASS_LABELS`` (so mixing was not refused for it) would
    read the unmixed labels of mixed images; it stops, naming itself. Unmixed batches and ce (soft targets) run."""
    import timm
    import torch.nn.functional as F

    from distill import Distiller
    from distill.losses import LossTerm, register_loss

    @register_loss('test_reads_labels')
    class ReadsLabels(LossTerm):
        def forward(self, step):
            return F.cross_entropy(step.student_logits, step.targets)

    torch.manual_seed(0)
    student = timm.create_model('cifar_resnet8', num_classes=4)
    distiller = Distiller(None, student, {'ce': 1.0, 'test_reads_labels': 1.0})
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    assert distiller(Batch(images, labels)).loss.item() > 0
    mixed = Batch(images, labels, soft_targets=torch.tensor([[0.6, 0, 0, 0.4], [0.4, 0, 0, 0.6]]))
    with pytest.raises(DistillError, match="loss term 'test_reads_labels' reads each sample's class, but mixup"):
        distiller(mixed)
    assert Distiller(None, distiller.student, {'ce': 1.0})(mixed).loss.item() > 0
