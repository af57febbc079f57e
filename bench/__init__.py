"""ddbench — a benchmark harness for dataset distillation.

The harness (this package) owns data, architectures, augmentation, the one evaluation loop, seeding,
records and the command line; the distillation methods live in the sibling package ``methods``.
"""

__version__ = "0.1.0"
