"""The ledger's audit log for operators: ``python -m pets_widgets.audit LEDGER [--json]``.

Re-exported from :mod:`pets_widgets.enclave.ledger`, where the ledger lives.
"""

from pets_widgets.enclave.ledger import *  # noqa: F403
from pets_widgets.enclave.ledger import main

if __name__ == "__main__":
    raise SystemExit(main())
