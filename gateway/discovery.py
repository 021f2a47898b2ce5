"""Where the workers are: a static list, DNS names (every address behind them), or both.

An entry is `HOST:PORT` (one worker; the channel resolves HOST itself) or `dns:NAME:PORT`
(every address NAME resolves to, as a Kubernetes headless Service gives one per ready pod),
resolved again every refresh so workers that join or leave are picked up without a restart.
A name that fails to resolve keeps the addresses it had: a resolver hiccup must not empty a
pool that is serving.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)
DNS_PREFIX = "dns:"


@dataclass(slots=True, frozen=True)
class WorkerEntry:
    host: str
    port: int
    dns: bool  # resolve to every address behind `host`

    def __str__(self) -> str:
        return f"{DNS_PREFIX if self.dns else ''}{self.host}:{self.port}"


def parse_entry(text: str) -> WorkerEntry:
    """`HOST:PORT` or `dns:NAME:PORT`; ValueError otherwise."""
    dns = text.startswith(DNS_PREFIX)
    rest = text[len(DNS_PREFIX) :] if dns else text
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"worker address must be HOST:PORT or dns:NAME:PORT, got {text!r}")
    return WorkerEntry(host, int(port), dns)


def parse_entries(texts: Sequence[str], flag: str) -> tuple[WorkerEntry, ...]:
    entries = tuple(parse_entry(t) for t in texts)
    if len(set(entries)) != len(entries):
        raise ValueError(f"{flag} lists an address twice")
    return entries


Resolver = Callable[[str, int], Awaitable[list[str]]]  # (name, port) -> IP addresses; OSError


async def resolve_dns(host: str, port: int) -> list[str]:
    """Every IP address `host` has (A and AAAA records, /etc/hosts included)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class Discovery:
    """Turns entries into the current worker addresses of one role."""

    def __init__(self, entries: Sequence[WorkerEntry], resolver: Resolver = resolve_dns) -> None:
        self._entries = tuple(entries)
        self._resolver = resolver
        self._last: dict[WorkerEntry, list[str]] = {}

    @property
    def has_dns(self) -> bool:
        return any(e.dns for e in self._entries)

    def static_addresses(self) -> list[str]:
        return [f"{e.host}:{e.port}" for e in self._entries if not e.dns]

    async def addresses(self) -> list[str]:
        found: list[str] = []
        for entry in self._entries:
            for address in await self._resolve(entry):
                if address not in found:
                    found.append(address)
        return found

    async def _resolve(self, entry: WorkerEntry) -> list[str]:
        if not entry.dns:
            return [f"{entry.host}:{entry.port}"]
        try:
            ips = await self._resolver(entry.host, entry.port)
        except OSError as exc:
            log.warning("cannot resolve %s (keeping %s): %s", entry, self._last.get(entry), exc)
            return self._last.get(entry, [])
        addresses = sorted({_address(ip, entry.port) for ip in ips})
        if addresses != self._last.get(entry):
            log.info("%s resolves to %s", entry, addresses)
        self._last[entry] = addresses
        return addresses
