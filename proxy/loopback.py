"""Whether a host name or address is this machine: one definition for the listen address check
(open auth off loopback) and the Host checks that keep DNS rebinding out."""

from __future__ import annotations

import functools
import ipaddress


# Every /v1 request asks this of its Host header (open auth on loopback), and parsing an address
# is a few µs; clients send the same few Host values, so answers are memoised, bounded because
# the header is the client's to choose.
@functools.lru_cache(maxsize=256)
def loopback_host(host: str | None) -> bool:
    """Does a host (a Host header, or a listen address) name this machine: localhost or a
    *.localhost name, 127.0.0.0/8, ::1; any port?

    Where the proxy trusts a caller for being local (open auth, the admin page without admin
    keys), the TCP peer is not enough: a web page the operator opens can rebind its own domain
    to 127.0.0.1 (DNS rebinding) and then read and spend through the proxy as same-origin. The
    browser still sends that domain as Host, so a request naming another host is refused."""
    if not host:
        return True                     # no Host (HTTP/1.0): not a browser
    name = host.strip()
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    name = name.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):     # browsers resolve these to loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
