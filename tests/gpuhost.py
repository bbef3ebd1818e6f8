"""A GPU host without a GPU, for tests: tests/fakenvml's pynvml describes the GPUs, stand-in
device nodes (char devices that behave as /dev/null) and a stand-in 64-bit driver library take
the driver's place, and a thread fills NVML's process table with the real host PIDs of the
runner's containers, so the real code (RealNvml, leases, devices access, the watchdog, the CLI
in a child process) runs as it would on a GPU host.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Callable

from sandbox import naming

TESTS = Path(__file__).resolve().parent
FAKE_NVML_DIR = TESTS / "fakenvml"
UUIDS = ("GPU-7f2c0c4e-0000-4a1b-9c1d-00000000000a", "GPU-7f2c0c4e-0000-4a1b-9c1d-00000000000b")


class FakeGpuHost:
    def __init__(self, root: Path, gpus: int = 2, name: str = "Fake H100", memory_mb: float = 81559.0):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.file = root / "nvml.json"
        self.dev = root / "dev"
        self.libs = root / "driver"
        self.locks = root / "locks"
        self.machine = {"devices": [{"uuid": UUIDS[i], "name": name, "memory_mb": memory_mb, "minor": i} for i in range(gpus)],
                        "processes": {}}
        self.write()
        self.dev.mkdir()
        for n in ["nvidiactl", "nvidia-uvm"] + [f"nvidia{i}" for i in range(gpus)]:
            self.node(n)
        self.libs.mkdir()
        real_elf = Path(sys.executable).resolve()  # any 64-bit ELF stands in for the driver's library
        for lib in ("libcuda.so.1", "libnvidia-ml.so.1"):
            shutil.copy(real_elf, self.libs / lib)

    @property
    def uuids(self) -> list[str]:
        return [d["uuid"] for d in self.machine["devices"]]

    def node(self, name: str) -> Path:
        path = self.dev / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))
        os.chmod(path, 0o666)
        return path

    def write(self) -> None:
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.machine))
        tmp.replace(self.file)  # a reader never sees half a file

    def env(self) -> dict[str, str]:
        """The environment of a runner process on this host."""
        return {"PYTHONPATH": os.pathsep.join([str(FAKE_NVML_DIR), str(TESTS.parent)]),
                "FAKE_NVML_FILE": str(self.file), "AUTORESEARCH_DEV_DIR": str(self.dev),
                "AUTORESEARCH_LOCK_DIR": str(self.locks), "LD_LIBRARY_PATH": str(self.libs)}

    def install(self, monkeypatch) -> None:
        """This process meets the fake NVML too (RealNvml imports pynvml on construction)."""
        import importlib.util

        spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        spec.loader.exec_module(module)
        for key, value in self.env().items():
            if key != "PYTHONPATH":
                monkeypatch.setenv(key, value)


class ProcessTable(threading.Thread):
    """Puts every running experiment container of `tag` into NVML's process table, by its real
    host PID, on the GPUs its labels name, using `mib(labels)` MiB."""

    def __init__(self, host: FakeGpuHost, client, tag: str, mib: Callable[[dict], float]):
        super().__init__(daemon=True)
        self.host, self.client, self.tag, self.mib = host, client, tag, mib
        self.done = threading.Event()
        self.seen: dict[str, dict] = {}  # container name -> labels

    def run(self) -> None:
        while not self.done.wait(0.1):
            table: dict[str, dict[str, float]] = {}
            try:
                running = self.client.containers.list(filters=naming.managed_filter(naming.KIND_RUN, **{naming.L_TAG: self.tag}))
                for c in running:
                    pid = c.attrs["State"]["Pid"]
                    for uuid in filter(None, c.labels.get(naming.L_GPUS, "").split(",")):
                        table.setdefault(uuid, {})[str(pid)] = self.mib(c.labels)
                    self.seen[c.name] = dict(c.labels)
            except Exception:
                continue  # a container gone between the list and its attributes
            self.host.machine["processes"] = table
            self.host.write()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(timeout=5)
