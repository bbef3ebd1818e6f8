"""Hostile export files: `runner import` must not rename anything on this engine, must not
accept what escapes the sandbox (volumes, entrypoints, healthchecks), and a rerun takes its
limits from this host, never from the image's own label."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from conftest import runner_cli

from sandbox import naming

pytestmark = pytest.mark.docker

FORGED_LIMITS = json.dumps({"time_budget_s": 100000.0, "mem_limit_bytes": 2**50, "pids_limit": 10**7})


def _forged_export(docker_client, tmp_path, extra_dockerfile: str, names: list[str], tag: str = "forged") -> str:
    """An export file as a hostile host would write it: one image, saved under `names`."""
    labels = {naming.L_MANAGED: "true", naming.L_KIND: naming.KIND_EXPERIMENT, naming.L_TAG: tag,
              naming.L_COMMIT: "f" * 40, naming.L_LIMITS: FORGED_LIMITS}
    context = io.BytesIO()  # one tiny layer from scratch: saving stays quick
    with tarfile.open(fileobj=context, mode="w") as t:
        for name, data in (("Dockerfile", f"FROM scratch\nCOPY f /f\n{extra_dockerfile}\n".encode()), ("f", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    context.seek(0)
    image, _ = docker_client.images.build(fileobj=context, custom_context=True, labels=labels, rm=True)
    saved = _named(b"".join(docker_client.api.get_image(image.id)), names)
    path = tmp_path / "forged.tar"
    with tarfile.open(path, "w") as tar:
        for member, data in (("record.json", json.dumps({"ref": "x", "id": image.id,
                                                          "record": {"val_bpb": 0.001, "status": "keep"}}).encode()),
                             ("image.tar", saved)):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _named(saved: bytes, names: list[str]) -> bytes:
    """A docker-save archive of one image, rewritten to claim `names`, as a hostile host's save
    would: the names are written into the file, never onto this engine (tests run in parallel,
    and a moment with the base image's name on a forged image would poison another's build)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(saved)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        manifest = json.loads(src.extractfile("manifest.json").read())
        manifest[0]["RepoTags"] = names
        layer = manifest[0]["Layers"][-1].split("/")[0]
        repositories = {}
        for name in names:
            repository, tag = name.rsplit(":", 1)
            repositories.setdefault(repository, {})[tag] = layer
        rewritten = {"manifest.json": json.dumps(manifest).encode(), "repositories": json.dumps(repositories).encode()}
        for member in src.getmembers():
            if member.name not in rewritten:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        for name, data in rewritten.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _id(docker_client, ref):
    try:
        return docker_client.images.get(ref).id
    except Exception:
        return None


@pytest.mark.parametrize("extra,what", [
    ("VOLUME /data", "VOLUME"),
    ('ENTRYPOINT ["sh", "-c", "echo owned"]', "ENTRYPOINT"),
    ('HEALTHCHECK CMD ["true"]', "HEALTHCHECK"),
])
def test_images_that_escape_the_sandbox_are_refused(docker_client, tmp_path, extra, what):
    path = _forged_export(docker_client, tmp_path, extra, ["autoresearch-runner/evil:1"])
    r = runner_cli("import", path, env={"HOME": str(tmp_path / "home")})
    assert r.returncode == 2 and what in r.stderr and "refused" in r.stderr
    assert _id(docker_client, naming.experiment_image_ref("forged", "f" * 40)) is None


def test_an_import_renames_nothing_and_a_rerun_takes_this_hosts_limits(docker_client, tmp_path, engine_for):
    from sandbox.images import CPU_BASE_ALIAS

    base_before = _id(docker_client, CPU_BASE_ALIAS)
    # the file claims the base image's name: loaded as it is, every later experiment would run on it
    path = _forged_export(docker_client, tmp_path, "LABEL poisoned=yes", [CPU_BASE_ALIAS])
    assert _id(docker_client, CPU_BASE_ALIAS) == base_before
    r = runner_cli("import", path, env={"HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    assert _id(docker_client, CPU_BASE_ALIAS) == base_before
    ref = naming.experiment_image_ref("forged", "f" * 40)
    assert docker_client.images.get(ref).labels.get("poisoned") == "yes"

    from runner import reruns
    from sandbox.docker_backend import DockerExecutor, DockerImageStore

    image = reruns.find_experiment_image(DockerImageStore(docker_client), ref)
    from conftest import MINI_PREPARE, SUMMARY, make_repo

    engine = engine_for(make_repo(tmp_path / "repo", SUMMARY, MINI_PREPARE))
    limits = reruns.rerun_limits(engine, image)
    assert limits.mem_limit_bytes == 16 * 2**30 and limits.pids_limit == 512
    assert limits.time_budget_s == reruns.RERUN_MAX_BUDGET_S

    again = runner_cli("import", path, env={"HOME": str(tmp_path / "home")})  # the same image: fine
    assert again.returncode == 0, again.stderr
    docker_client.images.remove(ref, force=True)
