"""The vision track's floating-point substrate: image data, CNN architectures and FP training.

``datasets`` loads verified image classification data (Fashion-MNIST from a pinned Debian
package by default; CIFAR and ImageFolder trees at paper scale) and yields normalised batches;
``models`` builds the CNNs and declares their structure in ``VisionAdapter``s; ``train`` trains
and evaluates them and caches seeded FP checkpoints.

This package knows nothing about quantization. QAT methods (LSQ, TR scheduling) and PTQ methods
use it through its public pieces: the adapters say which layers exist and how the forward splits
into blocks, and ``train.train`` accepts a caller's optimizer, param groups and a per-step hook.
"""
