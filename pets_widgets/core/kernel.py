"""What a service's kernel does before it answers anything (the site's and the enclave's).
"""

from __future__ import annotations


def forget_requests() -> None:
    """Keep no request: IPython would otherwise store every cell the gateway runs (each
    request, tokens included) in its input history, in memory and in its history file."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    history = shell.history_manager
    history.store_inputs = lambda *args, **kwargs: None
    history.store_output = lambda *args, **kwargs: None
    history.enabled = False
