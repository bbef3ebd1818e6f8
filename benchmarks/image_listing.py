"""What listing the runner's experiment images with what each adds on disk (`runner images`,
`runner images gc`) costs, measured side by side in one invocation: as it was (the Docker SDK's
`images.list`, which inspects every listed image again, then each image and the one below it
inspected for their sizes) against `reruns.experiment_images` now (the engine's list in one
request, sizes from it, the image below looked up once).

    python benchmarks/image_listing.py [--images 300] [--reps 3]

Makes `--images` experiment images of a throwaway tag (a few KiB each, on a one-file base
imported here), lists them, and removes them. Needs the Docker daemon only.
"""

from __future__ import annotations

import argparse
import io
import secrets
import statistics
import tarfile
import time

import docker

from runner.reruns import experiment_images
from sandbox import naming
from sandbox.docker_backend import DockerImageStore


def _tar(name: str, text: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    client = docker.from_env()
    tag = f"bench{secrets.token_hex(3)}"
    client.api.import_image_from_data(_tar("base.txt", b"base\n"), repository=f"{naming.REPO}/bench-base", tag=tag)
    base = client.images.get(f"{naming.REPO}/bench-base:{tag}")
    made = []
    try:
        for i in range(args.images):
            box = client.containers.create(base.id, "true")
            try:
                box.put_archive("/", _tar(f"train{i}.py", f"VALUE = {i}\n".encode()))
                labels = naming.managed_labels(naming.KIND_EXPERIMENT, **{naming.L_TAG: tag, naming.L_COMMIT: f"{i:040x}",
                                                                          naming.L_SOURCES: base.id})
                image = box.commit(f"{naming.REPO}/{tag}", f"{i:012x}", changes=[f"LABEL {k}={v}" for k, v in labels.items()])
                made.append(image.id)
            finally:
                box.remove()
        filters = naming.managed_filter(naming.KIND_EXPERIMENT, **{naming.L_TAG: tag})

        def before():  # what `runner images` did: the SDK's list, then each image's size and its below's
            return [client.api.inspect_image(i.id)["Size"] - client.images.get(i.labels[naming.L_SOURCES]).attrs["Size"]
                    for i in client.images.list(filters=filters)]

        ways = {"before": before, "experiment_images": lambda: experiment_images(DockerImageStore(client), tag)}
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.reps):
            for name, way in ways.items():
                t0 = time.monotonic()
                found = way()
                times[name].append(time.monotonic() - t0)
                assert len(found) == args.images, (name, len(found))
        old = statistics.median(times["before"])
        print(f"{args.images} experiment images of one tag, {len(client.images.list())} images on the engine, "
              f"median of {args.reps}:")
        for name, ts in times.items():
            print(f"  {name:18} {statistics.median(ts):7.3f} s   ratio to before {statistics.median(ts) / old:.3f}")
    finally:
        for image_id in made:
            client.images.remove(image_id, force=True)
        client.images.remove(base.id, force=True)


if __name__ == "__main__":
    main()
