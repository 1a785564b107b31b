"""``python -m trl_plus`` (and ``accelerate launch -m trl_plus train recipe.yaml``)."""

import sys

from .cli import main

sys.exit(main())
