"""`runner doctor`: is this host ready to run experiments? Each check says what to do if not."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def run_checks(repo: Path, data_dir: Path | None, echo: Callable[[str], None]) -> bool:
    from sandbox import gpu, images
    from sandbox.backend import BackendSettings, SandboxError, open_backend

    from .config import ConfigError, load_config
    from .data import DataError, check_data_dir
    from .repo import RepoError, ResearchRepo

    ok = True

    def report(good: bool, what: str, fix: str = "") -> None:
        nonlocal ok
        ok &= good
        echo(f"[{'ok' if good else 'FAIL'}] {what}" + ("" if good else f" -> {fix}"))

    try:  # where runs go is runner.yaml's to say; a broken one is reported below
        settings = load_config(repo, {"data_dir": data_dir}).backend_settings()
    except ConfigError:
        settings = BackendSettings()
    backend = None
    try:
        backend = open_backend(settings, runs=False)
        report(True, backend.store.version())
        if settings.executor != "docker":
            report(True, backend.executor.version())
    except SandboxError as exc:
        report(False, "Docker engine" if settings.executor == "docker" else f"{settings.executor} backend", str(exc))

    try:
        nvml = gpu.RealNvml()
        devices = nvml.devices()
        if devices:
            for d in devices:
                echo(f"[ok] GPU {d.label}: {d.name} {d.memory_mb / 1024:.0f} GiB {d.uuid}")
        else:
            try:
                echo(f"[ok] no NVIDIA GPU ({gpu.cpu_host_reason(nvml, gpu.DEV_DIR)}): experiments run on the CPU")
            except gpu.GpuError as exc:
                report(False, "GPUs", str(exc))

        try:
            cfg = load_config(repo, {"data_dir": data_dir})
            report(True, f"config ({cfg.repo / 'runner.yaml'} {'found' if (cfg.repo / 'runner.yaml').exists() else 'absent: defaults'})")
        except ConfigError as exc:
            report(False, "runner.yaml", str(exc))
            return False
        if backend is not None:
            want = cfg.base_image if cfg.base_image != "auto" else images.CUDA_BASE_DEFAULT if devices else images.CPU_BASE_ALIAS
            present = backend.store.image(want) is not None
            report(present, f"base image {want} (base_image: {cfg.base_image})",
                   "run `runner base-image build`" if want == images.CPU_BASE_ALIAS else f"docker pull {want} (or docker load it)")
        if backend is not None and devices:
            runtime = backend.executor.gpu_runtime(cfg.gpu_runtime)
            what = f"GPU access: {runtime} (gpu_runtime: {cfg.gpu_runtime})"
            if runtime == "toolkit":
                has_runtime = backend.executor.gpu_runtime("auto") == "toolkit"
                report(has_runtime, f"{what}: the engine's nvidia runtime",
                       "install nvidia-container-toolkit and register its runtime with the engine, or set gpu_runtime: devices")
            else:
                try:  # what a run would be given: every device node and driver library, checked
                    nodes = gpu.devices_access([d.uuid for d in devices], nvml).device_nodes
                    report(True, f"{what}: {len(nodes)} device nodes and the driver's libraries")
                except gpu.GpuError as exc:
                    report(False, what, str(exc))
        repo_ok = False
        try:
            research = ResearchRepo(cfg.repo)
            report(True, f"research repo {cfg.repo}")
            repo_ok = True
        except RepoError as exc:
            report(False, "research repo", str(exc))
        try:
            check_data_dir(cfg.data_dir)
            report(True, f"data cache {cfg.data_dir}")
        except DataError as exc:
            report(False, f"data cache {cfg.data_dir}", str(exc))
        if repo_ok:
            from .hub import SOURCES, wanted_refs

            try:
                refs = wanted_refs({name: research.committed_text(name) for name in SOURCES}, cfg.hf_prefetch)
            except (RepoError, ConfigError) as exc:
                report(False, "Hugging Face Hub repos", str(exc))
                return ok
            missing = [r.repo_id for r in refs if not r.is_cached(cfg.hf_cache)]
            if refs and not missing:
                echo(f"[ok] Hub repos the code names are cached in {cfg.hf_cache}: {', '.join(r.repo_id for r in refs)}")
            elif refs:
                # not a failure: code can name repos only one GPU generation loads (autoresearch's FA3)
                echo(f"[warn] Hub repos not in {cfg.hf_cache}: {', '.join(missing)} -> `runner prepare` fetches them "
                     "(an experiment that asks for a missing one crashes with reason hub_offline)")
        return ok
    finally:
        if backend is not None:
            backend.close()
