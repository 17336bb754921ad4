"""Who is admitted next from the waiting queue: tenants take turns, and within a tenant lower priority goes first.

Policy (`WaitingQueue`):
- **Tenants take turns.** Each tenant (the `Llmbus-Tenant` header; the bridge sets it from the API key) has its own
  queue, and admissions rotate among the tenants that have requests waiting: A, B, C, A, B, C... A tenant's burst
  therefore delays another tenant's request by at most one turn of the rotation.
- **Priority within a tenant.** A request's `priority` (-10..10, default 0) orders its tenant's queue: lower first,
  then first come, first served.
- **Aging.** Every `aging` admissions from a tenant's queue lower the effective priority of its requests still
  waiting by one, so a low-priority request is never starved by a stream of higher-priority ones. Aging counts
  admissions, not seconds, so the policy is the same on a fast machine and a slow one, and tests can check it in
  engine steps. Only the admissions since a request arrived count, so a tenant's clock is kept only while it has
  requests waiting (tenants name themselves: one per request must not grow the queue's memory).

The queue keeps counts of the requests waiting by tenant and by priority, for `$SRV.STATS`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from inference_worker.sequence import Sequence

AGING = 8  # admissions from a tenant's queue per step of aging


class WaitingQueue:
    def __init__(self, aging: int = AGING) -> None:
        self.aging = aging
        self._tenants: dict[str, list[Sequence]] = {}  # insertion order is the rotation order
        self._admitted: Counter[str] = Counter()  # admissions per waiting tenant: the clock its aging counts
        self._joined: dict[int, int] = {}  # seq_id -> its tenant's admission count when it arrived
        self.by_tenant: Counter[str] = Counter()
        self.by_priority: Counter[int] = Counter()

    def __len__(self) -> int:
        return sum(self.by_tenant.values())

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[Sequence]:
        return iter([seq for queue in self._tenants.values() for seq in queue])

    def append(self, seq: Sequence) -> None:
        self._tenants.setdefault(seq.tenant, []).append(seq)
        self._joined[seq.seq_id] = self._admitted[seq.tenant]
        self.by_tenant[seq.tenant] += 1
        self.by_priority[seq.priority] += 1

    def peek(self) -> Sequence:
        """The request `popleft` would return."""
        tenant = next(iter(self._tenants))
        return min(self._tenants[tenant], key=self._order)

    def popleft(self) -> Sequence:
        """Admit the next request: the best of the tenant whose turn it is; that tenant goes to the back."""
        seq = self.peek()
        self._admitted[seq.tenant] += 1
        self._take(seq)
        queue = self._tenants.pop(seq.tenant)
        if queue:
            self._tenants[seq.tenant] = queue  # to the back of the rotation
        else:
            self._forget(seq.tenant)
        return seq

    def remove(self, seq: Sequence) -> None:
        self._take(seq)
        if not self._tenants[seq.tenant]:
            del self._tenants[seq.tenant]
            self._forget(seq.tenant)

    def clear(self) -> None:
        self._tenants.clear()
        self._admitted.clear()
        self._joined.clear()
        self.by_tenant.clear()
        self.by_priority.clear()

    def effective_priority(self, seq: Sequence) -> int:
        waited = self._admitted[seq.tenant] - self._joined[seq.seq_id]
        return seq.priority - waited // self.aging

    def _order(self, seq: Sequence) -> tuple[int, int]:
        return (self.effective_priority(seq), seq.seq_id)

    def _forget(self, tenant: str) -> None:
        """`tenant` has nothing waiting: its clock can restart from 0 (aging counts differences, never the value)."""
        del self._admitted[tenant]

    def _take(self, seq: Sequence) -> None:
        self._tenants[seq.tenant].remove(seq)
        del self._joined[seq.seq_id]
        self.by_tenant[seq.tenant] -= 1
        self.by_priority[seq.priority] -= 1
        self.by_tenant += Counter()  # drop the zero counts
        self.by_priority += Counter()
