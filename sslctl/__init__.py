"""sslctl: self-supervised visual pre-training (Triplet, BYOL) and its standard evaluations."""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix: printed as one line by the CLI, exit code 2, no traceback."""
