"""One plain Python function per subcommand, returning result dataclasses.

``sslctl.api`` is a package with one module per command so that each stays on a screen; the
functions are re-exported here so that ``from sslctl import api; api.pretrain(...)`` works.
"""

from sslctl.api.pretrain import PretrainResult, pretrain

__all__ = ["PretrainResult", "pretrain"]
