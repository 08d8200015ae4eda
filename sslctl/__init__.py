"""sslctl: self-supervised visual pre-training (Triplet, BYOL) and its standard evaluations."""

import signal

__version__ = "0.1.0"

# The signals that stop a run cleanly (checkpoint first): what Slurm, `timeout` and Ctrl-C send.
# Here, below every layer, so that the engine, the data loaders' workers and the launcher agree.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class UserError(Exception):
    """A mistake the user can fix: printed as one line by the CLI, exit code 2, no traceback."""


def last_line(e: BaseException, limit: int = 200) -> str:
    """The last non-empty line of an exception's message (for torch's load_state_dict errors,
    the one that names the mismatch), for quoting inside a one-line UserError."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:limit] if lines else e.__class__.__name__
