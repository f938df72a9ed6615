"""Which source instance serves which exchange: leases in a NATS JetStream key-value bucket.

Several source instances may run for the same exchanges; at any moment one
of them serves each exchange. The election is NATS's own compare-and-set,
not a consensus of ours: the bucket ``<prefix>_sources`` holds one key per
exchange, whose value is the epoch of the instance serving it.

- An instance that wants an exchange (a gateway watches one of its symbols)
  and does not serve it tries ``create``: it succeeds only while the key is
  absent, so exactly one instance wins it.
- The winner renews it every ``ttl_s / 3`` with ``update`` against the
  revision it last wrote; the bucket's ``ttl_s`` (its streams' max age)
  deletes a key nobody renewed, so a killed instance loses its exchanges
  within ``ttl_s`` and a standby wins them at its next try.
- A renewal refused (the key expired, or another instance holds it) means
  the exchange is lost: the instance stops serving it at once. A renewal
  that gets no answer (the bucket's stream is electing a leader after a
  NATS node died, or this instance is cut off) keeps the lease until the
  key may have expired: ``ttl_s`` after the last write that succeeded, timed
  from before it was sent, so no other instance can have won it sooner. An
  instance that stops, or no longer wants an exchange, deletes its key, and
  a standby takes over without waiting for the expiry.

Failure modes: an instance cut off from NATS keeps no exchange (it cannot
renew), and gateways cannot hear it either; two instances may both believe
they serve an exchange for at most one renewal period after a partition
heals, and a gateway then follows one epoch per symbol, joining again on
the other's events (a gap), never interleaving them. Without JetStream (a
server started without ``-js``) there is no election: every instance serves
every exchange it is asked for, which is right for one source instance and
wrong for two (say so in the deployment).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

#: Errors of a lease operation that mean "not yours now", rather than a fault.
_LOST = (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError)


class Leases:
    """One instance's leases; ``None`` from :meth:`open` when JetStream is not there."""

    def __init__(
        self,
        kv: KeyValue,
        owner: str,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kv = kv
        self._owner = owner.encode()
        self._ttl_s = ttl_s
        self._clock = clock
        #: exchange -> the revision this instance last wrote
        self._held: dict[str, int] = {}
        #: exchange -> until when (clock) nobody else can have won it
        self._until: dict[str, float] = {}

    @classmethod
    async def open(cls, nc: Client, prefix: str, ttl_s: float, owner: str) -> Leases | None:
        bucket = re.sub(r"[^A-Za-z0-9_-]", "_", prefix) + "_sources"
        failure: Exception | None = None
        # Three copies on a cluster, so that losing a NATS node loses no lease;
        # one on a single server, which refuses more.
        for replicas in (3, 1):
            try:
                kv = await nc.jetstream().create_key_value(
                    KeyValueConfig(bucket=bucket, ttl=ttl_s, history=1, replicas=replicas)
                )
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                failure = exc
                continue
            return cls(kv, owner, ttl_s)
        log.warning(
            "NATS JetStream is not available (%s): no failover between source instances; "
            "this instance serves every exchange it is asked for",
            failure,
        )
        return None

    @property
    def held(self) -> frozenset[str]:
        return frozenset(self._held)

    async def acquire(self, exchange: str) -> bool:
        """Tries to win ``exchange``; True when this instance serves it now."""
        if exchange in self._held:
            return True
        sent = self._clock()
        try:
            revision = await self._create_or_retake(exchange)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.warning("could not take the lease of %s: %s", exchange, exc)
            return False
        if revision is None:
            return False
        self._held[exchange] = revision
        self._until[exchange] = sent + self._ttl_s
        log.info("serving %s: its lease is ours", exchange)
        return True

    async def _create_or_retake(self, exchange: str) -> int | None:
        """The revision written, or None when another instance holds the key. A key that
        still names this instance is taken back: a renewal whose answer was lost may
        have been written, and its holder need not wait out the expiry."""
        try:
            return await self._kv.create(exchange, self._owner)
        except _LOST:
            pass
        try:
            entry = await self._kv.get(exchange)
            if entry.value != self._owner or entry.revision is None:
                return None
            return await self._kv.update(exchange, self._owner, last=entry.revision)
        except _LOST:
            return None

    async def renew(self) -> set[str]:
        """Renews every lease held; the exchanges lost."""
        lost: set[str] = set()
        for exchange, revision in list(self._held.items()):
            sent = self._clock()
            try:
                self._held[exchange] = await self._kv.update(exchange, self._owner, last=revision)
            except _LOST as exc:
                log.warning("lost the lease of %s: %s", exchange, exc)
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                left = self._until[exchange] - self._clock()
                if left > 0:
                    log.warning(
                        "could not renew the lease of %s (%s): kept for %.1f s more",
                        exchange,
                        exc,
                        left,
                    )
                    continue
                log.warning(
                    "lost the lease of %s: unrenewed until it could expire: %s", exchange, exc
                )
            else:
                self._until[exchange] = sent + self._ttl_s
                continue
            del self._held[exchange], self._until[exchange]
            lost.add(exchange)
        return lost

    async def release(self, exchange: str) -> None:
        revision = self._held.pop(exchange, None)
        if revision is None:
            return
        del self._until[exchange]
        try:
            await self._kv.delete(exchange, last=revision)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.info("the lease of %s ends by expiry: %s", exchange, exc)
