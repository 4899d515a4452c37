"""Who is calling: the verified identity of the current call, in a context variable.

The auth interceptor sets it before the handler runs; handlers read it. Without auth every call
is ``ANONYMOUS``, which holds every scope.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True)
class Identity:
    subject: str
    scopes: frozenset[str]
    tenant: str = ""
    authenticated: bool = True

    def may_infer(self, model: str) -> bool:
        return not self.authenticated or "infer:*" in self.scopes or f"infer:{model}" in self.scopes

    def may_admin(self) -> bool:
        return not self.authenticated or "admin:routes" in self.scopes


ANONYMOUS = Identity(subject="anonymous", scopes=frozenset(), authenticated=False)

current_identity: contextvars.ContextVar[Identity] = contextvars.ContextVar("infergate_identity", default=ANONYMOUS)

auth_window_ns: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar("infergate_auth_window", default=None)
"""When the auth interceptor checked the current call (``time.time_ns`` at start and end), for the
``infergate/auth`` span; None without auth."""
