"""Distillation methods, one file each (same shape every time: paper → Config → Method → recipes).

Importing ``bench.registry.list_methods()`` imports every module named in ``BUILTIN``; third-party methods
register through the ``ddbench.methods`` entry-point group.
"""

BUILTIN = ("random", "herding", "full")
