"""tl_deploy: fine-tune a pretrained image classifier, export it, prove parity, serve it."""

from __future__ import annotations

__version__ = "0.1.0"

from tl_deploy.errors import TlDeployError  # noqa: E402

__all__ = ["TlDeployError", "__version__"]
