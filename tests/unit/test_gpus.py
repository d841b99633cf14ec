"""The GPU inventory: simulated specs, the real (driverless) host, and NVML through a fake."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from supervisor import gpus
from supervisor.gpus import GPU, Inventory, gpu_stats, read_inventory, simulated_inventory

GiB = 1024**3
MiB = 1024**2


@pytest.mark.parametrize(
    ("spec", "sizes"),
    [
        ("8x80GiB", [80 * GiB] * 8),
        ("2x24GiB,1x48GiB", [24 * GiB, 24 * GiB, 48 * GiB]),
        ("1x80GB", [80 * 10**9]),
        ("1x512MiB", [512 * MiB]),
        ("2 x 24 GiB , 1x48gib", [24 * GiB, 24 * GiB, 48 * GiB]),
        ("80GiB", [80 * GiB]),
        ("1x1.5GiB", [int(1.5 * GiB)]),
        ("cpu", []),
        ("CPU", []),
    ],
)
def test_simulated_spec(spec: str, sizes: list[int]) -> None:
    inv = simulated_inventory(spec, cpus=4)
    assert inv.simulated
    assert [g.total_bytes for g in inv.gpus] == sizes
    assert [g.free_bytes for g in inv.gpus] == sizes
    assert [g.index for g in inv.gpus] == list(range(len(sizes)))
    assert len({g.uuid for g in inv.gpus}) == len(sizes)
    assert inv.cpus == (0, 1, 2, 3)


def test_simulated_gpu_names_say_the_size() -> None:
    inv = simulated_inventory("1x24GiB,1x48GiB", cpus=1)
    assert [g.name for g in inv.gpus] == ["simulated 24GiB", "simulated 48GiB"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("8x80", "cannot read '8x80'"),
        ("x80GiB", "cannot read 'x80GiB'"),
        ("0x80GiB", "has no GPUs"),
        ("8x0GiB", "more than zero"),
        ("8x80XB", "bad unit 'XB'"),
        ("8x80GiB,", "cannot read ''"),
        ("eight x 80GiB", "cannot read"),
        ("-1x80GiB", "cannot read"),
    ],
)
def test_simulated_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match="bad GPU spec") as info:
        simulated_inventory(spec, cpus=2)
    assert message in str(info.value)


def test_simulated_cpus() -> None:
    assert simulated_inventory("cpu", cpus=2).cpus == (0, 1)
    assert simulated_inventory("cpu", cpus=[5, 3, 3]).cpus == (3, 5)
    assert simulated_inventory("cpu").cpus == gpus.host_cpus()
    with pytest.raises(ValueError, match="CPU count"):
        simulated_inventory("cpu", cpus=0)
    with pytest.raises(ValueError, match="CPU set"):
        simulated_inventory("cpu", cpus=[])


def test_parse_size() -> None:
    assert gpus.parse_size("80GiB") == 80 * GiB
    assert gpus.parse_size("24 GB") == 24 * 10**9
    with pytest.raises(ValueError, match="bad size"):
        gpus.parse_size("2x24GiB")


def test_host_cpus_is_the_affinity_mask() -> None:
    assert gpus.host_cpus() == tuple(sorted(os.sched_getaffinity(0)))


def test_read_inventory_without_driver_is_cpu_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A real call: this machine has no NVIDIA driver. Forget any cached NVML state first.
    monkeypatch.setattr(gpus, "_nvml_ready", None)
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA driver")
    with caplog.at_level(logging.DEBUG, logger="supervisor.gpus"):
        inv = read_inventory()
    assert inv == Inventory(gpus=(), cpus=gpus.host_cpus(), simulated=False)
    assert any(r.message.startswith("no NVML") for r in caplog.records)
    assert gpu_stats() == []


# --- NVML through a fake pynvml ---------------------------------------------------------


class FakeNVMLError(Exception):
    pass


@dataclass
class FakeDevice:
    uuid: str
    name: str
    total: int
    used: int
    bus_id: str
    links: list[str] = field(default_factory=list)   # remote bus ids of active links
    temperature: int | None = 60                     # None: not supported


class FakeNVML:
    """Enough of pynvml's surface for gpus.py, over a list of fake devices."""

    NVML_P2P_CAPS_INDEX_NVLINK = 2
    NVML_P2P_STATUS_OK = 0
    NVML_NVLINK_MAX_LINKS = 4
    NVML_FEATURE_ENABLED = 1
    NVML_TEMPERATURE_GPU = 0
    NVMLError = FakeNVMLError

    def __init__(
        self, devices: list[FakeDevice], *, init_error: bool = False, p2p: str = "links"
    ) -> None:
        self.devices = devices
        self.init_error = init_error
        self.p2p = p2p  # "links": answer from links; "error": P2P query unsupported
        self.init_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeDevice:
        return self.devices[i]

    def nvmlDeviceGetUUID(self, d: FakeDevice) -> str:
        return d.uuid

    def nvmlDeviceGetName(self, d: FakeDevice) -> bytes:
        return d.name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, d: FakeDevice) -> Any:
        return SimpleNamespace(total=d.total, used=d.used, free=d.total - d.used)

    def nvmlDeviceGetP2PStatus(self, a: FakeDevice, b: FakeDevice, cap: int) -> int:
        if self.p2p == "error":
            raise FakeNVMLError("Not Supported")
        return 0 if b.bus_id in a.links or a.bus_id in b.links else 3

    def nvmlDeviceGetPciInfo(self, d: FakeDevice) -> Any:
        return SimpleNamespace(busId=d.bus_id.encode())

    def nvmlDeviceGetNvLinkState(self, d: FakeDevice, link: int) -> int:
        if link >= len(d.links):
            raise FakeNVMLError("Invalid Argument")
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, d: FakeDevice, link: int) -> Any:
        # NVML reports the remote end with a shorter domain than nvmlDeviceGetPciInfo.
        return SimpleNamespace(busId=d.links[link].replace("00000000:", "0000:"))

    def nvmlDeviceGetUtilizationRates(self, d: FakeDevice) -> Any:
        return SimpleNamespace(gpu=42, memory=10)

    def nvmlDeviceGetTemperature(self, d: FakeDevice, sensor: int) -> int:
        if d.temperature is None:
            raise FakeNVMLError("Not Supported")
        return d.temperature

    def nvmlDeviceGetPowerUsage(self, d: FakeDevice) -> int:
        return 123_456  # milliwatts


def _devices() -> list[FakeDevice]:
    bus = ["00000000:17:00.0", "00000000:2A:00.0", "00000000:3D:00.0"]
    return [
        FakeDevice("GPU-a", "NVIDIA H100 80GB HBM3", 80 * GiB, 1 * GiB, bus[0], [bus[1]]),
        FakeDevice("GPU-b", "NVIDIA H100 80GB HBM3", 80 * GiB, 2 * GiB, bus[1], [bus[0]]),
        FakeDevice("GPU-c", "NVIDIA L4", 24 * GiB, 0, bus[2], [], temperature=None),
    ]


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNVML:
    fake = FakeNVML(_devices())
    monkeypatch.setattr(gpus, "pynvml", fake)
    monkeypatch.setattr(gpus, "_nvml_ready", None)
    return fake


def test_read_inventory_through_nvml(fake_nvml: FakeNVML) -> None:
    inv = read_inventory()
    assert inv.gpus == (
        GPU(0, "GPU-a", "NVIDIA H100 80GB HBM3", 80 * GiB, 79 * GiB, (1,)),
        GPU(1, "GPU-b", "NVIDIA H100 80GB HBM3", 80 * GiB, 78 * GiB, (0,)),
        GPU(2, "GPU-c", "NVIDIA L4", 24 * GiB, 24 * GiB, ()),
    )
    assert inv.cpus == gpus.host_cpus()
    assert not inv.simulated


def test_nvlink_peers_from_remote_pci_info_when_p2p_query_fails(fake_nvml: FakeNVML) -> None:
    fake_nvml.p2p = "error"
    inv = read_inventory()
    assert [g.nvlink_peers for g in inv.gpus] == [(1,), (0,), ()]


def test_nvlink_errors_leave_peers_empty(
    fake_nvml: FakeNVML, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml.p2p = "error"

    def broken(*args: object) -> int:
        raise FakeNVMLError("Unknown Error")

    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetNvLinkState", broken)
    inv = read_inventory()
    assert [g.nvlink_peers for g in inv.gpus] == [(), (), ()]
    assert len(inv.gpus) == 3


def test_nvml_init_error_is_cpu_only_and_cached(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeNVML(_devices(), init_error=True)
    monkeypatch.setattr(gpus, "pynvml", fake)
    monkeypatch.setattr(gpus, "_nvml_ready", None)
    with caplog.at_level(logging.DEBUG, logger="supervisor.gpus"):
        assert read_inventory().gpus == ()
        assert gpu_stats() == []
    assert fake.init_calls == 1
    assert "no NVML (Driver Not Loaded): CPU-only inventory" in caplog.messages


def test_nvml_init_runs_once(fake_nvml: FakeNVML) -> None:
    read_inventory()
    read_inventory()
    gpu_stats()
    assert fake_nvml.init_calls == 1


def test_gpu_stats(fake_nvml: FakeNVML) -> None:
    stats = gpu_stats()
    assert stats[0] == {
        "index": 0,
        "uuid": "GPU-a",
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total": 80 * GiB,
        "memory_used": 1 * GiB,
        "memory_free": 79 * GiB,
        "utilization": 42,
        "temperature": 60,
        "power_w": 123.456,
    }
    assert stats[2]["temperature"] == 0  # not supported on that one
    assert [s["index"] for s in stats] == [0, 1, 2]


def test_device_error_mid_inventory_falls_back_to_cpu_only(
    fake_nvml: FakeNVML, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(d: FakeDevice) -> Any:
        raise FakeNVMLError("GPU is lost")

    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetMemoryInfo", broken)
    assert read_inventory().gpus == ()
    assert gpu_stats() == []
