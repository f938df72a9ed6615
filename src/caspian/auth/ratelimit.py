"""Failed-login limiting that holds under parallel guessing and cannot be turned on owners.

Each login is counted in sliding windows of ``window_s`` seconds:

- per principal (key id or user name) and client address, ``max_failures``: the
  guesser is stopped, the principal stays usable from every other address;
- per client address over every principal, ``ADDRESS_FACTOR`` times that: one
  address cannot spread its guesses over many principals, while a few people behind
  one NAT who mistype do not lock each other out;
- per user over every address, ``USER_FACTOR`` times that, against a guesser spread
  over many addresses; an address the user logged in from within ``KNOWN_ADDRESS_S``
  is exempt, so such a guesser cannot lock the owner out. Keys get no such count:
  their secrets are 256 random bits, which no guessing rate reaches, so a key-wide
  lock would only hand attackers a way to lock owners out.

A login reserves a slot in each of its counts before its secret is checked, and
settles it after: a failure keeps the slot as a failure, a success or an error frees
it. The check is an argon2 verification in a worker, long enough for many more
requests to arrive; without the reservation they would all be let through while the
first was still being checked.

IPv6 clients are counted per /64 network, the block one host or site commonly holds.
The limiter belongs to one event loop: all its calls are made from it.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable
from time import monotonic
from typing import Literal

from caspian.auth.proxies import parse_address

#: The per-address limit is this many times ``max_failures``.
ADDRESS_FACTOR = 4
#: The per-user limit over all addresses is this many times ``max_failures``.
USER_FACTOR = 20
#: How long a user's successful login exempts its address from the per-user limit.
KNOWN_ADDRESS_S = 30 * 86_400.0
#: Names are counted by this many characters at most, so an entry's size is bounded;
#: no key id or user name is longer.
NAME_CHARS = 64
#: Retry-After for a login refused only because attempts still being checked could
#: reach the limit: they settle within about one argon2 verification.
PENDING_RETRY_S = 1

Kind = Literal["key", "user"]


class _Count:
    __slots__ = ("failures", "pending")

    def __init__(self) -> None:
        self.failures: list[float] = []
        #: Attempts holding a slot and not yet settled; an entry with any is never
        #: dropped, so an attempt can settle on the object it holds.
        self.pending = 0


class Attempt:
    """One login being checked: settle it with :meth:`succeeded` or :meth:`failed`.

    As a context manager, an attempt left unsettled when the block ends is settled
    by how it ended: an error (say the store was unreachable) frees its slots, as it
    is no guess; a cancellation (the client left) counts as a failure, as the
    verification it started still runs, and leaving early must not be a way to
    start more of them than the limit allows.
    """

    def __init__(
        self,
        limiter: LoginLimiter,
        held: list[tuple[str, _Count, int]],
        known_as: str | None,
    ) -> None:
        self._limiter = limiter
        self._held = held
        self._known_as = known_as
        self._settled = False

    def succeeded(self) -> None:
        self._free()
        if self._known_as is not None:
            self._limiter._remember(self._known_as)

    def failed(self) -> None:
        self._settle()
        now = self._limiter._clock()
        for subject, count, limit in self._held:
            count.failures.append(now)
            # Only the last ``limit`` failures decide when the lock lifts.
            del count.failures[:-limit]
            self._limiter._touch(subject, count)

    def _settle(self) -> None:
        if self._settled:
            raise RuntimeError("this login attempt is already settled")
        self._settled = True
        for _, count, _ in self._held:
            count.pending -= 1

    def _free(self) -> None:
        self._settle()
        for subject, count, _ in self._held:
            if not count.failures and not count.pending:
                self._limiter._counts.pop(subject, None)

    def __enter__(self) -> Attempt:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: object
    ) -> None:
        if self._settled:
            return
        if error is None or isinstance(error, Exception):
            self._free()
        else:
            self.failed()


class LoginLimiter:
    """Counts logins per principal and address, per address, and per user.

    A count is locked while its failures within the last ``window_s`` seconds, plus
    the attempts still being checked, reach its limit. A locked count lifts when the
    oldest of the failures that lock it is ``window_s`` old. A success does not erase
    failures: otherwise an attacker who knows one valid login could reset the count
    of an address at will.

    Memory is bounded under a spray of names and addresses: at most ``max_subjects``
    counts (beyond that the least recently used is dropped) plus the attempts in
    flight, and at most ``max_subjects`` known addresses.
    """

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        clock: Callable[[], float] = monotonic,
        max_subjects: int = 100_000,
    ) -> None:
        self._max = max_failures
        self._window = window_s
        self._clock = clock
        self._max_subjects = max_subjects
        self._counts: OrderedDict[str, _Count] = OrderedDict()
        #: "user:NAME@ADDRESS" -> time of its last successful login.
        self._known: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        """Entries held: counts and known addresses."""
        return len(self._counts) + len(self._known)

    def begin(self, kind: Kind, name: str, address: str) -> Attempt | int:
        """Reserve a slot for one login, or say how many seconds to wait (429)."""
        now = self._clock()
        principal = f"{kind}:{name[:NAME_CHARS]}"
        pair = f"{principal}@{_counted_address(address)}"
        subjects = [
            (pair, self._max),
            (f"addr:{_counted_address(address)}", self._max * ADDRESS_FACTOR),
        ]
        if kind == "user" and not self._is_known(pair, now):
            subjects.append((principal, self._max * USER_FACTOR))
        wait = max(self._wait(subject, limit, now) for subject, limit in subjects)
        if wait:
            return wait
        # The counts that exist are held first, so that making room for the new
        # ones cannot drop them.
        found = [self._counts.get(subject) for subject, _ in subjects]
        for (subject, _), count in zip(subjects, found, strict=True):
            if count is not None:
                self._touch(subject, count)
                count.pending += 1
        held: list[tuple[str, _Count, int]] = []
        for (subject, limit), count in zip(subjects, found, strict=True):
            if count is None:
                self._make_room()
                count = _Count()
                self._touch(subject, count)
                count.pending += 1
            held.append((subject, count, limit))
        return Attempt(self, held, pair if kind == "user" else None)

    def _wait(self, subject: str, limit: int, now: float) -> int:
        count = self._counts.get(subject)
        if count is None:
            return 0
        failures = count.failures
        cutoff = now - self._window
        while failures and failures[0] <= cutoff:
            failures.pop(0)
        if not failures and not count.pending:
            del self._counts[subject]
            return 0
        if len(failures) >= limit:
            return math.ceil(failures[-limit] + self._window - now)
        if len(failures) + count.pending >= limit:
            return PENDING_RETRY_S
        return 0

    def _touch(self, subject: str, count: _Count) -> None:
        self._counts[subject] = count
        self._counts.move_to_end(subject)

    def _make_room(self) -> None:
        if len(self._counts) < self._max_subjects:
            return
        # The least recently used entry that no attempt holds; if every one is held,
        # the table exceeds its bound by the attempts in flight, until they settle.
        for subject, count in self._counts.items():
            if not count.pending:
                del self._counts[subject]
                return

    def _is_known(self, pair: str, now: float) -> bool:
        since = self._known.get(pair)
        if since is None:
            return False
        if now - since >= KNOWN_ADDRESS_S:
            del self._known[pair]
            return False
        return True

    def _remember(self, pair: str) -> None:
        self._known[pair] = self._clock()
        self._known.move_to_end(pair)
        if len(self._known) > self._max_subjects:
            self._known.popitem(last=False)


def _counted_address(address: str) -> str:
    parsed = parse_address(address)
    if parsed is None:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed)
