#!/usr/bin/env python3
"""Write scikit-learn's bundled handwritten digits as an IDX data set for `mnist_bnn --data DIR`.

The data set is UCI's "Optical Recognition of Handwritten Digits" (1797 images of 8x8 pixels,
17 grey levels 0..16, 10 classes, 43 writers) as scikit-learn ships it inside its wheel
(`sklearn.datasets.load_digits`): nothing is downloaded at run time. It is not MNIST: different
writers, scanning and preprocessing (32x32 bitmaps counted in 4x4 blocks).

Usage (the Python lives in a virtual environment outside the checkout; nothing here is needed at
build or test time):

    python3 -m venv ~/.cache/caseopt/datasets-venv
    ~/.cache/caseopt/datasets-venv/bin/pip install scikit-learn numpy
    ~/.cache/caseopt/datasets-venv/bin/python scripts/make_idx.py /tmp/digits-idx
    scripts/env.sh cargo run --release --example mnist_bnn -- --data /tmp/digits-idx

It writes `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`
and `t10k-labels-idx1-ubyte.gz` into the directory (created if missing), in MNIST's layout:
- a stratified 80/20 train/test split with a fixed seed (`--seed`, default 0): 1437 training and
  360 test images, each class in the same proportion in both;
- pixels scaled from 0..16 to 0..255 (round(v * 255 / 16)) as uint8;
- each image upsampled by nearest-neighbour repetition, by a factor of 3 (`--scale`) to 24x24,
  because the example's network (three 3x3 convolutions, two 2x2 poolings) needs at least 18x18.
The gzip headers carry no time stamp, so the same arguments give byte-identical files.
"""

import argparse
import gzip
import os
import struct
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the rank.
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
MIN_SIDE = 18


def write_idx(path, magic, array):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    # mtime=0 keeps the output reproducible; the temporary name keeps a failed write from
    # leaving a half-written file under the final name.
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(header)
            gz.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write the four .gz IDX files into")
    parser.add_argument("--seed", type=int, default=0, help="train/test split seed (0)")
    parser.add_argument("--scale", type=int, default=3, help="upsampling factor (3: 8x8 -> 24x24)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="test share (0.2)")
    args = parser.parse_args()

    digits = load_digits()
    images = digits.images  # (1797, 8, 8) floats holding the integers 0..16
    labels = digits.target.astype(np.uint8)
    if args.scale < 1 or images.shape[1] * args.scale < MIN_SIDE:
        sys.exit(f"--scale {args.scale} gives images smaller than {MIN_SIDE}x{MIN_SIDE}")
    if not 0.0 < args.test_fraction < 1.0:
        sys.exit("--test-fraction must lie strictly between 0 and 1")

    pixels = np.rint(images * (255.0 / 16.0)).astype(np.uint8)
    pixels = pixels.repeat(args.scale, axis=1).repeat(args.scale, axis=2)

    x_train, x_test, y_train, y_test = train_test_split(
        pixels, labels, test_size=args.test_fraction, random_state=args.seed, stratify=labels
    )

    os.makedirs(args.out_dir, exist_ok=True)
    for name, magic, array in [
        ("train-images-idx3-ubyte.gz", IMAGES_MAGIC, x_train),
        ("train-labels-idx1-ubyte.gz", LABELS_MAGIC, y_train),
        ("t10k-images-idx3-ubyte.gz", IMAGES_MAGIC, x_test),
        ("t10k-labels-idx1-ubyte.gz", LABELS_MAGIC, y_test),
    ]:
        write_idx(os.path.join(args.out_dir, name), magic, array)
    side = pixels.shape[1]
    print(
        f"{args.out_dir}: {len(y_train)} training and {len(y_test)} test images, "
        f"{side}x{side}, {int(labels.max()) + 1} classes"
    )


if __name__ == "__main__":
    main()
