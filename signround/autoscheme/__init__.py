"""AutoScheme: mixed per-layer schemes chosen to meet an average-bit budget.

``options.py`` holds the request and the bit accounting, ``groups.py`` which layers share a
scheme, ``score.py`` the block-by-block sensitivity, ``solve.py`` the exact budgeted choice and
``select.py`` the steps in order.
"""

from .options import AutoScheme, base_spec, layer_bits
from .select import LAYER_CONFIG_FILE, Request, Selection, prepare, restore, select, trial_plans

__all__ = ["AutoScheme", "LAYER_CONFIG_FILE", "Request", "Selection", "base_spec", "layer_bits", "prepare", "restore", "select", "trial_plans"]
