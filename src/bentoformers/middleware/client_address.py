"""The caller's address, believing X-Forwarded-For only from trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from starlette.types import Scope

from bentoformers.middleware.refusal import header


class ClientAddress:
    """The caller's address: the peer, or, when the peer is a trusted proxy, the rightmost X-Forwarded-For
    entry that is not itself a trusted proxy (entries further left are whatever the client wrote)."""

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]

    def trusts(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.strip())
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def __call__(self, scope: Scope) -> str:
        peer = (scope.get("client") or ("unknown", 0))[0]
        if not self.trusted or not self.trusts(peer):
            return peer
        hops = [h.strip() for h in header(scope, b"x-forwarded-for").split(",") if h.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                return hop
        return hops[0] if hops else peer
