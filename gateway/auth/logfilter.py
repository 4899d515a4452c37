"""Every log line names who is calling: ``record.subject`` is the verified subject of the call
being served (``-`` outside calls and without auth). Installed on the CLI's log handler, whose
format shows it; only the subject is ever added, never a token or any other claim."""

from __future__ import annotations

import logging

from infergate.gateway.identity import current_identity


class SubjectLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        identity = current_identity.get()
        record.subject = identity.subject if identity.authenticated and identity.subject else "-"
        return True
