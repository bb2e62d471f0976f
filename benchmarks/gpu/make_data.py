"""Pack the GPU check's data: the first 1,000 training and 200 test images per class of the shared CIFAR-10 tree
(10,000 + 2,000 images, 32x32 uint8, 37 MB) into one ``.npz`` (``data.name: npz``) that travels with the working
tree to a machine without the shared folder.

    python benchmarks/gpu/make_data.py [--data ../shared/data/cifar10-jpeg] [--out benchmarks/gpu/data/cifar10_12k.npz]

The output is ignored by git; name ``benchmarks/gpu/data`` in the device run's carry list.
"""
import argparse
import os

import numpy as np

from distill.config import DataConfig
from distill.data import load_split

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=os.path.join(HERE, '..', '..', '..', 'shared', 'data', 'cifar10-jpeg'))
    parser.add_argument('--out', default=os.path.join(HERE, 'data', 'cifar10_12k.npz'))
    parser.add_argument('--train-per-class', type=int, default=1000)
    parser.add_argument('--test-per-class', type=int, default=200)
    args = parser.parse_args()
    cfg = DataConfig(name='imagefolder', root=args.data, image_size=32, train_per_class=args.train_per_class,
                     val_per_class=args.test_per_class)
    train, test = load_split(cfg, train=True), load_split(cfg, train=False)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    staging = args.out + '.tmp.npz'
    np.savez(staging, train_images=train.images.permute(0, 2, 3, 1).numpy(), train_labels=train.labels.numpy(),
             test_images=test.images.permute(0, 2, 3, 1).numpy(), test_labels=test.labels.numpy(),
             classes=np.array(train.classes))
    os.replace(staging, args.out)
    print(f"{args.out}: {len(train)} train + {len(test)} test images, {len(train.classes)} classes, "
          f"{os.path.getsize(args.out) / 2 ** 20:.1f} MiB")


if __name__ == '__main__':
    main()
