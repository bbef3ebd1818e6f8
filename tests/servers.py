"""Servers that tests start themselves: a PEP 503 package index and a Hugging Face Hub.

They bind the bridge address of the Docker daemon the tests use (image builds and prepare
containers reach it, and so does the host), never anything off this machine, and stop in the
fixture that started them.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import http.server
import io
import json
import socket
import struct
import threading
import zipfile
from contextlib import contextmanager
from urllib.parse import unquote


def bridge_address(docker_client) -> str:
    """The host's own address on the daemon's default bridge (docker0)."""
    attrs = docker_client.networks.get("bridge").attrs
    gateway = (attrs["IPAM"]["Config"] or [{}])[0].get("Gateway")
    if gateway:
        return gateway
    name = attrs["Options"].get("com.docker.network.bridge.name", "docker0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
    return socket.inet_ntoa(packed[20:24])


@contextmanager
def serving(handler_cls, host: str):
    """Serve `handler_cls` on `host` at a free port for the `with` block; yields the base URL."""
    server = http.server.ThreadingHTTPServer((host, 0), handler_cls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Quiet, and one `serve(head)` for GET and HEAD (clients probe files with HEAD first)."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.serve(head=True)

    def do_GET(self):
        self.serve(head=False)

    def serve(self, head: bool) -> None:
        raise NotImplementedError

    def send(self, code: int, body: bytes, headers: dict, head: bool) -> None:
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(name: str, version: str, source: str) -> tuple[str, bytes]:
    """A pure-Python wheel of one module `name.replace('-', '_')`: (file name, bytes)."""
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": source.encode(),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},{_record_hash(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return f"{module}-{version}-py3-none-any.whl", buf.getvalue()


class PackageIndex:
    """A PEP 503 simple index whose wheels a test adds and removes while it runs."""

    def __init__(self):
        self.wheels: dict[str, dict[str, bytes]] = {}   # project -> file name -> bytes

    def add(self, name: str, version: str, source: str) -> None:
        filename, data = make_wheel(name, version, source)
        self.wheels.setdefault(name, {})[filename] = data

    def remove(self, name: str, version: str) -> None:
        filename, _ = make_wheel(name, version, "")
        self.wheels.get(name, {}).pop(filename, None)

    def handler(self):
        index = self

        class Handler(_Handler):
            def serve(self, head: bool):
                parts = [p for p in unquote(self.path).split("/") if p]
                if len(parts) == 2 and parts[0] == "simple" and parts[1] in index.wheels:
                    links = "".join(
                        f'<a href="/files/{fn}#sha256={hashlib.sha256(data).hexdigest()}">{fn}</a>\n'
                        for fn, data in index.wheels[parts[1]].items()
                    )
                    return self.send(200, f"<html><body>\n{links}</body></html>".encode(), {"Content-Type": "text/html"}, head)
                if len(parts) == 2 and parts[0] == "files":
                    for files in index.wheels.values():
                        if parts[1] in files:
                            return self.send(200, files[parts[1]], {"Content-Type": "application/octet-stream"}, head)
                self.send(404, b"not found", {"Content-Type": "text/plain"}, head)

        return Handler


class FakeHub:
    """Enough of the Hugging Face Hub API for `snapshot_download` and `hf_hub_download`:
    repo info at a revision, and HEAD/GET of `resolve/<revision>/<file>`."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.requests: list[str] = []

    def sha(self, repo_id: str) -> str:
        h = hashlib.sha1(repo_id.encode())
        for path, data in sorted(self.repos[repo_id].items()):
            h.update(path.encode() + data)
        return h.hexdigest()

    def handler(self):
        hub = self

        class Handler(_Handler):
            def serve(self, head: bool):
                path = unquote(self.path.split("?")[0])
                hub.requests.append(f"{self.command} {path}")
                parts = [p for p in path.split("/") if p]
                # /api/models/<org>/<name>/revision/<rev>
                if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "revision":
                    repo_id = f"{parts[2]}/{parts[3]}"
                    if repo_id not in hub.repos:
                        return self.send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
                    info = {"id": repo_id, "modelId": repo_id, "sha": hub.sha(repo_id), "private": False,
                            "siblings": [{"rfilename": f} for f in sorted(hub.repos[repo_id])]}
                    return self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
                # /<org>/<name>/resolve/<rev>/<file...>
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, filename = f"{parts[0]}/{parts[1]}", "/".join(parts[4:])
                    data = hub.repos.get(repo_id, {}).get(filename)
                    if data is None:
                        return self.send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, head)
                    headers = {"X-Repo-Commit": hub.sha(repo_id), "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                               "Content-Type": "application/octet-stream"}
                    return self.send(200, data, headers, head)
                self.send(404, b"not found", {}, head)

        return Handler

