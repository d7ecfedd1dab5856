"""Test accuracy of the trainer in fp32 and in bf16 autocast over several seeds, on real CIFAR-10.

What `train.amp: auto` changes on a CPU with native bf16 (and on CUDA): this trains the same model on the same
balanced subset with the same seeds in both precisions and prints each run's test accuracy, the mean and
sample std per precision, and the difference of the means against the seed noise.

    python benchmarks/train_precision.py --data /tmp/cifar10 --per-class 500 --epochs 4 --seeds 3

`--data` is a CIFAR-10 folder `load_cifar10` reads (official batches or train/ and test/ class folders).
"""

from __future__ import annotations

import argparse
import statistics

from synthgap_helpers.data import balanced_indices
from synthgap_helpers.datasets import load_dataset as load_cifar10
from synthgap_helpers.train.trainer import TrainParams, evaluate, train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 folder (official batches or class folders)")
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--per-class", type=int, default=500, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--test-images", type=int, default=2000, help="first N of a balanced test subset")
    parser.add_argument("--epochs", type=float, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    train_set, test_set = load_cifar10("train", args.data), load_cifar10("test", args.data)
    train_idx = balanced_indices(train_set.labels, args.per_class, seed=0)
    val_idx = balanced_indices(train_set.labels, args.val_per_class, seed=1, exclude=train_idx)
    test_idx = balanced_indices(test_set.labels, args.test_images // 10, seed=2)
    train_x, train_y = train_set.images[train_idx], train_set.labels[train_idx]
    val_x, val_y = train_set.images[val_idx], train_set.labels[val_idx]
    test_x, test_y = test_set.images[test_idx], test_set.labels[test_idx]
    print(f"{args.model}, {len(train_idx)} train / {len(val_idx)} val / {len(test_idx)} test images, "
          f"{args.epochs} epochs at batch {args.batch_size}, {args.seeds} seeds, {args.device}")
    accuracy: dict[str, list[float]] = {"off": [], "bf16": []}
    for seed in range(args.seeds):
        for amp in accuracy:
            params = TrainParams(model=args.model, batch_size=args.batch_size, epochs=args.epochs, amp=amp,
                                 progress=False)
            result = train_classifier(train_x, train_y, val_x, val_y, params, seed=seed, device=args.device)
            test = evaluate(result.model, test_x, test_y, device=args.device, amp=amp)
            accuracy[amp].append(100 * test["accuracy"])
            print(f"seed {seed} {result.precision}: test accuracy {accuracy[amp][-1]:.2f}% "
                  f"({result.images_per_second:.0f} img/s)", flush=True)
    for amp, values in accuracy.items():
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{'fp32' if amp == 'off' else 'bf16'}: {statistics.mean(values):.2f} +- {std:.2f} % (mean +- sample std)")
    gap = statistics.mean(accuracy["bf16"]) - statistics.mean(accuracy["off"])
    noise = statistics.stdev(accuracy["off"] + accuracy["bf16"]) if args.seeds > 1 else float("nan")
    print(f"bf16 - fp32: {gap:+.2f} points (seed std of all runs: {noise:.2f})")


if __name__ == "__main__":
    main()
