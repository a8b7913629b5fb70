"""``python -m tl_deploy.adapt``: the same program as ``tl-deploy adapt``."""

from __future__ import annotations

import sys

from tl_deploy.adapt import main

sys.exit(main())
