"""The GPU inventory: what NVML reports, a simulated host for planning, or CPU only."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil
import pynvml

logger = logging.getLogger(__name__)

_SIZE_UNITS = {
    "tib": 1024**4, "gib": 1024**3, "mib": 1024**2,
    "tb": 1000**4, "gb": 1000**3, "mb": 1000**2,
}
_GROUP = re.compile(
    r"^(?:(?P<count>\d+)\s*[x×*]\s*)?(?P<size>\d+(?:\.\d+)?)\s*(?P<unit>[a-z]+)$", re.IGNORECASE
)
_SPEC_HELP = (
    "expected COUNTxSIZE groups like '8x80GiB' or '2x24GiB,1x48GiB' (GiB, GB, MiB), or 'cpu'"
)


@dataclass(frozen=True)
class GPU:
    """One GPU as placement sees it."""

    index: int
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int
    nvlink_peers: tuple[int, ...] = ()


@dataclass(frozen=True)
class Inventory:
    """The GPUs and the CPUs this process may use."""

    gpus: tuple[GPU, ...]
    cpus: tuple[int, ...]
    simulated: bool = False


_nvml_lock = threading.Lock()
_nvml_ready: bool | None = None  # None: not tried yet


def _nvml() -> bool:
    """Initialise NVML once per process; False (remembered) when there is no driver."""
    global _nvml_ready
    with _nvml_lock:
        if _nvml_ready is None:
            try:
                pynvml.nvmlInit()
                _nvml_ready = True
            except pynvml.NVMLError as e:
                logger.debug("no NVML (%s): CPU-only inventory", e)
                _nvml_ready = False
            except OSError as e:  # a broken libnvidia-ml install
                logger.debug("no NVML (%s): CPU-only inventory", e)
                _nvml_ready = False
        return _nvml_ready


def host_cpus() -> tuple[int, ...]:
    """The CPUs this process may run on (its affinity mask)."""
    try:
        return tuple(sorted(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    try:
        affinity = psutil.Process().cpu_affinity()
        if affinity:
            return tuple(sorted(affinity))
    except (AttributeError, psutil.Error, OSError):
        pass
    return tuple(range(os.cpu_count() or 1))


def read_inventory() -> Inventory:
    """The real host: GPUs through NVML, or a CPU-only inventory when there is no driver."""
    cpus = host_cpus()
    if not _nvml():
        return Inventory(gpus=(), cpus=cpus)
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        gpus = []
        for index, handle in enumerate(handles):
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GPU(
                index=index,
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                total_bytes=int(memory.total),
                free_bytes=int(memory.free),
            ))
    except pynvml.NVMLError as e:
        logger.warning("failed to read GPUs through NVML (%s): CPU-only inventory", e)
        return Inventory(gpus=(), cpus=cpus)
    peers = _nvlink_peers(handles)
    gpus = [
        GPU(g.index, g.uuid, g.name, g.total_bytes, g.free_bytes, tuple(sorted(peers[g.index])))
        for g in gpus
    ]
    return Inventory(gpus=tuple(gpus), cpus=cpus)


def _nvlink_peers(handles: list[Any]) -> dict[int, set[int]]:
    """Which GPUs reach which over NVLink; empty where NVML cannot tell."""
    peers: dict[int, set[int]] = {i: set() for i in range(len(handles))}
    # NVLink P2P status works through NVSwitch as well as direct links.
    for i, a in enumerate(handles):
        for j in range(i + 1, len(handles)):
            try:
                status = pynvml.nvmlDeviceGetP2PStatus(
                    a, handles[j], pynvml.NVML_P2P_CAPS_INDEX_NVLINK
                )
            except pynvml.NVMLError:
                continue
            if status == pynvml.NVML_P2P_STATUS_OK:
                peers[i].add(j)
                peers[j].add(i)
    if any(peers.values()):
        return peers
    # Older drivers: follow each active link to the PCI bus id at its other end.
    bus_ids: dict[str, int] = {}
    for i, handle in enumerate(handles):
        try:
            bus_ids[_bus_id(pynvml.nvmlDeviceGetPciInfo(handle))] = i
        except pynvml.NVMLError:
            continue
    for i, handle in enumerate(handles):
        for link in range(pynvml.NVML_NVLINK_MAX_LINKS):
            try:
                if pynvml.nvmlDeviceGetNvLinkState(handle, link) != pynvml.NVML_FEATURE_ENABLED:
                    continue
                remote = _bus_id(pynvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link))
            except pynvml.NVMLError:
                break  # no NVLink on this device, or past its last link
            peer = bus_ids.get(remote)
            if peer is not None and peer != i:
                peers[i].add(peer)
                peers[peer].add(i)
    return peers


def _bus_id(pci: Any) -> str:
    """A PCI bus id normalised for comparison ('0000:17:00.0' and '00000000:17:00.0' match)."""
    text = _text(getattr(pci, "busId", "")).lower()
    parts = text.split(":")
    if len(parts) == 3:
        try:
            return f"{int(parts[0], 16):08x}:{parts[1]}:{parts[2]}"
        except ValueError:
            pass
    return text


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_stats() -> list[dict[str, Any]]:
    """Live per-GPU figures for /status and metrics; [] without NVML."""
    if not _nvml():
        return []
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as e:
        logger.debug("failed to count GPUs: %s", e)
        return []
    stats: list[dict[str, Any]] = []
    for index in range(count):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            entry: dict[str, Any] = {
                "index": index,
                "uuid": _text(pynvml.nvmlDeviceGetUUID(handle)),
                "name": _text(pynvml.nvmlDeviceGetName(handle)),
                "memory_total": int(memory.total),
                "memory_used": int(memory.used),
                "memory_free": int(memory.free),
            }
        except pynvml.NVMLError as e:
            logger.debug("failed to read GPU %d: %s", index, e)
            continue
        entry.update(_optional_stats(handle))
        stats.append(entry)
    return stats


def _optional_stats(handle: Any) -> dict[str, Any]:
    """Readings that some GPUs do not support: zero where NVML says no."""
    stats: dict[str, Any] = {"utilization": 0, "temperature": 0, "power_w": 0.0}
    try:
        stats["utilization"] = int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except pynvml.NVMLError:
        pass
    try:
        stats["temperature"] = int(
            pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        )
    except pynvml.NVMLError:
        pass
    try:
        stats["power_w"] = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
    except pynvml.NVMLError:
        pass
    return stats


def parse_size(text: str) -> int:
    """Bytes in '80GiB', '24 GB', '512MiB' (GiB/MiB/TiB binary, GB/MB/TB decimal)."""
    match = _GROUP.match(text.strip())
    if not match or match.group("count") is not None:
        raise ValueError(f"bad size {text!r}: expected a number and a unit like 80GiB")
    return _size(match.group("size"), match.group("unit"), text)


def _size(number: str, unit: str, text: str) -> int:
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"bad unit {unit!r} in {text!r}: use GiB, GB, MiB, MB, TiB or TB")
    size = int(float(number) * factor)
    if size <= 0:
        raise ValueError(f"bad size in {text!r}: must be more than zero")
    return size


def simulated_inventory(spec: str, cpus: int | Iterable[int] | None = None) -> Inventory:
    """A hypothetical host for `plan --gpus`: '8x80GiB', '2x24GiB,1x48GiB', '1x80GB', 'cpu'.

    ``cpus`` is a CPU count or a set of CPU ids; None uses this host's CPUs.
    """
    if cpus is None:
        cpu_ids = host_cpus()
    elif isinstance(cpus, int):
        if cpus < 1:
            raise ValueError(f"bad CPU count {cpus}: must be at least 1")
        cpu_ids = tuple(range(cpus))
    else:
        cpu_ids = tuple(sorted(set(cpus)))
        if not cpu_ids:
            raise ValueError("bad CPU set: empty")
    text = spec.strip()
    if not text:
        raise ValueError(f"bad GPU spec {spec!r}: empty; {_SPEC_HELP}")
    if text.lower() in ("cpu", "none"):
        return Inventory(gpus=(), cpus=cpu_ids, simulated=True)
    gpus: list[GPU] = []
    for part in text.split(","):
        group = part.strip()
        match = _GROUP.match(group)
        if not match:
            raise ValueError(f"bad GPU spec {spec!r}: cannot read {group!r}; {_SPEC_HELP}")
        count = int(match.group("count") or 1)
        if count < 1:
            raise ValueError(f"bad GPU spec {spec!r}: {group!r} has no GPUs; {_SPEC_HELP}")
        try:
            size = _size(match.group("size"), match.group("unit"), group)
        except ValueError as e:
            raise ValueError(f"bad GPU spec {spec!r}: {e}") from None
        label = match.group("size") + match.group("unit")
        for _ in range(count):
            index = len(gpus)
            gpus.append(GPU(
                index=index,
                uuid=f"GPU-simulated-{index}",
                name=f"simulated {label}",
                total_bytes=size,
                free_bytes=size,
            ))
    return Inventory(gpus=tuple(gpus), cpus=cpu_ids, simulated=True)
