"""``python -m tl_deploy.datasets NAME ...`` (the same as ``tl-deploy datasets NAME ...``)."""

from __future__ import annotations

from tl_deploy.datasets.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
