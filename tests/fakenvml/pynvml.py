"""A stand-in for nvidia-ml-py's `pynvml`, for hosts without a GPU: the runner's real NVML code
(sandbox.gpu.RealNvml), the CLI in a subprocess and Ray actors all meet it when this directory
comes first on PYTHONPATH (or tests put it in sys.modules).

The machine it describes is a JSON file named by $FAKE_NVML_FILE, read again on every call so
that a test can change it while a runner watches (a process appears, an error starts):

    {"devices": [{"uuid": "GPU-...", "name": "Fake H100", "memory_mb": 81559, "minor": 0,
                  "mig": [{"uuid": "MIG-...", "gi": 1, "ci": 0, "memory_mb": 9856}]}],
     "processes": {"GPU-... or MIG-...": {"<host pid>": <MiB or null>}},
     "fail": {"nvmlInit": "DRIVER_NOT_LOADED", "nvmlDeviceGetComputeRunningProcesses": "GPU_IS_LOST"}}

Device order is NVML's index order (PCI bus order on a real host). A device with a "mig" list is
in MIG mode. With no file (or $FAKE_NVML_FILE unset) nvmlInit fails as on a host without the
driver. Only the calls the runner makes exist; a new one fails loudly here first.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999
NVML_DEVICE_MIG_DISABLE = 0
NVML_DEVICE_MIG_ENABLE = 1

_NAMES = {NVML_ERROR_UNINITIALIZED: "Uninitialized", NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
          NVML_ERROR_NOT_SUPPORTED: "Not Supported", NVML_ERROR_NOT_FOUND: "Not Found",
          NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded", NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
          NVML_ERROR_GPU_IS_LOST: "GPU is lost", NVML_ERROR_UNKNOWN: "Unknown Error"}


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _NAMES.get(self.value, f"NVML error {self.value}")


@dataclass(frozen=True)
class _Handle:
    gpu: int                 # index of the whole GPU
    mig: int | None = None   # index of the MIG device on it


@dataclass(frozen=True)
class _Memory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class _Process:
    pid: int
    usedGpuMemory: int | None


_initialised = False


def _machine(call: str) -> dict:
    path = os.environ.get("FAKE_NVML_FILE", "")
    try:
        with open(path) as f:
            machine = json.load(f)
    except OSError:
        raise NVMLError(NVML_ERROR_DRIVER_NOT_LOADED) from None
    fail = (machine.get("fail") or {}).get(call)
    if fail:
        raise NVMLError(globals()[f"NVML_ERROR_{fail}"])
    return machine


def _checked(call: str) -> dict:
    if not _initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return _machine(call)


def _entry(machine: dict, h: _Handle) -> dict:
    try:
        gpu = machine["devices"][h.gpu]
        return gpu if h.mig is None else gpu["mig"][h.mig]
    except (IndexError, KeyError, TypeError):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT) from None


def nvmlInit() -> None:
    global _initialised
    _machine("nvmlInit")
    _initialised = True


def nvmlShutdown() -> None:
    global _initialised
    _initialised = False


def nvmlDeviceGetCount() -> int:
    return len(_checked("nvmlDeviceGetCount")["devices"])


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    if not 0 <= index < len(_checked("nvmlDeviceGetHandleByIndex")["devices"]):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _Handle(index)


def nvmlDeviceGetHandleByUUID(uuid) -> _Handle:
    uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
    for i, gpu in enumerate(_checked("nvmlDeviceGetHandleByUUID")["devices"]):
        if gpu["uuid"] == uuid:
            return _Handle(i)
        for j, mig in enumerate(gpu.get("mig") or []):
            if mig["uuid"] == uuid:
                return _Handle(i, j)
    raise NVMLError(NVML_ERROR_NOT_FOUND)


def nvmlDeviceGetName(h: _Handle) -> str:
    machine = _checked("nvmlDeviceGetName")
    gpu = machine["devices"][h.gpu]
    return gpu["name"] if h.mig is None else f"{gpu['name']} MIG {_entry(machine, h).get('profile', 'slice')}"


def nvmlDeviceGetUUID(h: _Handle) -> str:
    return _entry(_checked("nvmlDeviceGetUUID"), h)["uuid"]


def nvmlDeviceGetMemoryInfo(h: _Handle) -> _Memory:
    total = int(_entry(_checked("nvmlDeviceGetMemoryInfo"), h)["memory_mb"] * 2**20)
    return _Memory(total=total, free=total, used=0)


def nvmlDeviceGetMinorNumber(h: _Handle) -> int:
    machine = _checked("nvmlDeviceGetMinorNumber")
    if h.mig is not None:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)  # as the driver does: ask the parent GPU
    return machine["devices"][h.gpu].get("minor", h.gpu)


def nvmlDeviceGetMigMode(h: _Handle) -> list[int]:
    gpu = _entry(_checked("nvmlDeviceGetMigMode"), h)
    if "mig" not in gpu:
        raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
    mode = NVML_DEVICE_MIG_ENABLE if gpu["mig"] else NVML_DEVICE_MIG_DISABLE
    return [mode, mode]


def nvmlDeviceGetMaxMigDeviceCount(h: _Handle) -> int:
    return 7 if "mig" in _entry(_checked("nvmlDeviceGetMaxMigDeviceCount"), h) else 0


def nvmlDeviceGetMigDeviceHandleByIndex(h: _Handle, index: int) -> _Handle:
    gpu = _entry(_checked("nvmlDeviceGetMigDeviceHandleByIndex"), h)
    if index >= len(gpu.get("mig") or []):
        raise NVMLError(NVML_ERROR_NOT_FOUND)  # an empty slot: the driver answers the same
    return _Handle(h.gpu, index)


def nvmlDeviceIsMigDeviceHandle(h: _Handle) -> bool:
    return h.mig is not None


def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(h: _Handle) -> _Handle:
    _checked("nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
    if h.mig is None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _Handle(h.gpu)


def nvmlDeviceGetGpuInstanceId(h: _Handle) -> int:
    if h.mig is None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _entry(_checked("nvmlDeviceGetGpuInstanceId"), h)["gi"]


def nvmlDeviceGetComputeInstanceId(h: _Handle) -> int:
    if h.mig is None:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _entry(_checked("nvmlDeviceGetComputeInstanceId"), h)["ci"]


def nvmlDeviceGetComputeRunningProcesses(h: _Handle) -> list[_Process]:
    machine = _checked("nvmlDeviceGetComputeRunningProcesses")
    table = (machine.get("processes") or {}).get(_entry(machine, h)["uuid"]) or {}
    return [_Process(int(pid), None if mb is None else int(mb * 2**20)) for pid, mb in table.items()]
