"""AutoScheme: mixed per-layer schemes chosen to meet an average-bit budget.

``options.py`` holds the request and the bit accounting, ``groups.py`` which layers share a
scheme, ``score.py`` the block-by-block sensitivity, ``solve.py`` the exact budgeted choice and
``select.py`` the steps in order.
"""

from .options import AutoScheme, layer_bits
from .select import LAYER_CONFIG_FILE, Request, Selection, prepare, select, trial_plans

__all__ = ["AutoScheme", "LAYER_CONFIG_FILE", "Request", "Selection", "layer_bits", "prepare", "select", "trial_plans"]
