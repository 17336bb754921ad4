"""Which logical CPUs make up one physical core, for `--pin`: pinned workers get whole cores, never two hyper-threads
of one core split between two workers. On the usual x86 numbering CPU k and CPU k+N are siblings, so slicing
the sorted CPU ids would give two workers the same physical cores.

`read_topology` is the one function that reads sysfs; the rest are pure, so that an SMT machine can be tested on
one without it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

SYSFS_CPUS = Path("/sys/devices/system/cpu")

CoreKey = tuple[int, int]  # (physical_package_id, core_id): one physical core
Topology = Mapping[int, CoreKey]  # logical CPU id -> its physical core


def read_topology(cpus: Iterable[int], root: Path = SYSFS_CPUS) -> dict[int, CoreKey] | None:
    """Each CPU's (package, core) from `cpuN/topology/physical_package_id` and `core_id`; None when any of them
    cannot be read (a kernel or container without that sysfs), and the caller then counts each CPU as a core."""
    topology: dict[int, CoreKey] = {}
    for cpu in cpus:
        folder = root / f"cpu{cpu}" / "topology"
        try:
            package = int((folder / "physical_package_id").read_text().strip())
            core = int((folder / "core_id").read_text().strip())
        except (OSError, ValueError):
            return None
        topology[cpu] = (package, core)
    return topology


def physical_cores(available: Iterable[int], topology: Topology | None) -> list[list[int]]:
    """The CPUs of `available` grouped by physical core (each group sorted), groups in the order of their lowest
    CPU id. Without a topology, or for a CPU it does not name, each CPU is a core of its own. Only CPUs in
    `available` (the process's affinity mask) are grouped: a sibling outside it is not handed out."""
    groups: dict[object, list[int]] = {}
    for cpu in sorted(set(available)):
        key: object = topology[cpu] if topology is not None and cpu in topology else ("cpu", cpu)
        groups.setdefault(key, []).append(cpu)
    return sorted(groups.values(), key=lambda group: group[0])


def pin_problem(cores: Sequence[Sequence[int]], workers: int, per_worker: int = 0) -> str | None:
    """Why `workers` workers with `per_worker` whole cores each (0: an equal share) cannot be pinned; None when they
    fit. The message always contains "do not fit"."""
    per_worker = per_worker or len(cores) // workers
    if len(cores) < workers:
        cpus = sorted(cpu for core in cores for cpu in core)
        return (
            f"{workers} worker(s) do not fit in {len(cores)} whole core(s) (CPUs {cpus}): each pinned worker needs "
            "a physical core of its own, and hyper-threads of one core are not separate cores"
        )
    if per_worker < 1 or per_worker * workers > len(cores):
        return f"{workers} worker(s) x {per_worker} whole core(s) do not fit in the {len(cores)} whole cores available"
    return None


def group_cores(cores: Sequence[Sequence[int]], workers: int, per_worker: int = 0) -> list[list[int]]:
    """Disjoint groups of whole cores, `per_worker` cores each (0: an equal share), one group per worker in core
    order, each group as the sorted list of its logical CPUs. The caller has checked `pin_problem`."""
    per_worker = per_worker or len(cores) // workers
    blocks = [cores[i * per_worker : (i + 1) * per_worker] for i in range(workers)]
    return [sorted(cpu for core in block for cpu in core) for block in blocks]
