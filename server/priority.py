"""The order of waiting work: priority first, FIFO inside a level, and aging so that no
priority starves forever.

A waiting request of priority p is queued as if it had arrived p × aging_s seconds earlier
(its *virtual arrival*), and queues run in virtual-arrival order. Equivalently, a request's
effective priority is p + (seconds waited) / aging_s, so waiting raises it one level per
aging_s seconds. Two consequences:

- Within a level the order is FIFO, and a higher level goes first among requests that arrived
  close together.
- A request of priority p is overtaken only by requests of priority q > p that arrive less than
  (q − p) × aging_s seconds after it. With priorities bounded to [-PRIORITY_LIMIT,
  PRIORITY_LIMIT], nothing that arrives more than 2 × PRIORITY_LIMIT × aging_s seconds after a
  request runs before it: no request starves.

The key does not depend on the current time, so a queue sorted once stays sorted.
"""

from __future__ import annotations

PRIORITY_LIMIT = 100
"""Priorities must be in [-PRIORITY_LIMIT, PRIORITY_LIMIT]."""


def virtual_arrival(priority: int, arrival: float, aging_s: float) -> float:
    """The queue key: smaller runs first."""
    return arrival - priority * aging_s
