"""Distillation methods, one file each (same shape every time: paper → Config → Method → recipes).

``bench.registry.list_methods()`` imports every module of this package (each registers itself with
``@register_method``); third-party methods register through the ``ddbench.methods`` entry-point group.
"""

import pkgutil

BUILTIN = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"))
