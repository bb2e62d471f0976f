"""Pack the GPU check's data: the first 1,000 training and 200 test images per class of the shared CIFAR-10 tree
(10,000 + 2,000 images, 32x32 uint8, 37 MB) into one ``.npz`` (``data.name: npz``) that travels with the working
tree to a machine without the shared folder; beside it, copies of the first ``--jpeg-per-class`` training and
``--jpeg-val-per-class`` test JPEGs per class as an ImageFolder tree (``cifar10-jpeg``, 2.5 MB by default), and with
``--timm-train`` a copy of timm's train.py (``timm_train.py``), for ``benchmarks/vs_timm.py`` on that machine.

    python benchmarks/gpu/make_data.py [--data ../shared/data/cifar10-jpeg] [--out benchmarks/gpu/data/cifar10_12k.npz]
        [--timm-train /tmp/timm_train_main.py]

The outputs are ignored by git; name ``benchmarks/gpu/data`` in the device run's carry list.
"""
import argparse
import os
import shutil

import numpy as np

from distill.config import DataConfig
from distill.data import load_split
from distill.data.imagefolder import link_subset

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=os.path.join(HERE, '..', '..', '..', 'shared', 'data', 'cifar10-jpeg'))
    parser.add_argument('--out', default=os.path.join(HERE, 'data', 'cifar10_12k.npz'))
    parser.add_argument('--train-per-class', type=int, default=1000)
    parser.add_argument('--test-per-class', type=int, default=200)
    parser.add_argument('--jpeg-per-class', type=int, default=200)
    parser.add_argument('--jpeg-val-per-class', type=int, default=50)
    parser.add_argument('--timm-train', help="timm's train.py to copy beside the data (benchmarks/vs_timm.py)")
    args = parser.parse_args()
    if args.timm_train and not os.path.isfile(args.timm_train):
        parser.error(f"--timm-train {args.timm_train} is not a file: pass timm's train.py (the repository's, at a tag)")
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
    folder = os.path.dirname(os.path.abspath(args.out))
    tree = link_subset(args.data, os.path.join(folder, 'cifar10-jpeg'),
                       {'train': args.jpeg_per_class, 'test': args.jpeg_val_per_class}, copy=True)
    print(f"{tree}: {args.jpeg_per_class} train + {args.jpeg_val_per_class} test JPEGs per class")
    if args.timm_train:
        shutil.copyfile(args.timm_train, os.path.join(folder, 'timm_train.py'))
        print(f"{os.path.join(folder, 'timm_train.py')}: a copy of {args.timm_train}")


if __name__ == '__main__':
    main()
