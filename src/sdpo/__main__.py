"""``python -m sdpo`` = the ``sdpo`` command (what ``torchrun -m sdpo`` and ``accelerate launch -m sdpo`` run)."""

import sys

from sdpo.cli import main

sys.exit(main())
