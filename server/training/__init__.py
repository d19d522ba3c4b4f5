"""Training and evaluation of policy adapters (``guardkit-server train`` / ``guardkit-server eval``)."""

import os as _os

# OpenMP threads that busy-wait collapse when the cores are shared with other jobs (measured on a
# 2-core machine: ~8x slower per step). Passive waiting costs little on an idle machine. This has
# to be set before torch loads, which is why it lives here.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
