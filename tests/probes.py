"""train.py bodies that inspect the sandbox from inside and print what they find as one
`PROBE <json>` line, then a valid summary block. No probe sends a packet anywhere."""

from __future__ import annotations

import json

from conftest import SUMMARY

PROBE = '''\
import json, os, socket

def attempt(fn):
    try:
        fn()
        return "ok"
    except Exception as exc:
        return type(exc).__name__ + ": " + str(exc)

def status_field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return line.split()[1]

def routes():
    with open("/proc/net/route") as f:
        return [l.split()[0] for l in f.read().splitlines()[1:] if l.strip()]

facts = {
    "uid": os.getuid(),
    "gid": os.getgid(),
    "cap_eff": status_field("CapEff"),
    "cap_prm": status_field("CapPrm"),
    "no_new_privs": status_field("NoNewPrivs"),
    "interfaces": sorted(os.listdir("/sys/class/net")),
    "routes": routes(),
    "resolv_conf": open("/etc/resolv.conf").read() if os.path.exists("/etc/resolv.conf") else "",
    "env": dict(os.environ),
    "environ_raw": open("/proc/self/environ", "rb").read().decode(errors="replace"),
    "write_prepare": attempt(lambda: open("prepare.py", "a").write("x")),
    "chmod_prepare": attempt(lambda: os.chmod("prepare.py", 0o777)),
    "write_root": attempt(lambda: open("/evil", "w").write("x")),
    "write_repo_new": attempt(lambda: open("/repo/new.py", "w").write("x")),
    "write_tmp": attempt(lambda: open("/tmp/ok", "w").write("x")),
    "write_out": attempt(lambda: open("/out/ok", "w").write("x")),
    "docker_sock": os.path.exists("/var/run/docker.sock") or os.path.exists("/run/docker.sock"),
    "git_dir": os.path.exists("/repo/.git"),
    "repo_files": sorted(os.listdir("/repo")),
    "prepare_stat": oct(os.stat("prepare.py").st_mode), 
    "prepare_owner": os.stat("prepare.py").st_uid,
    "rlimit_nofile": list(__import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)),
    "rlimit_core": list(__import__("resource").getrlimit(__import__("resource").RLIMIT_CORE)),
    "mounts": {l.split()[1]: l.split()[3].split(",") for l in open("/proc/mounts") if l.split()[1] in ("/tmp", "/out")},
    "pids_max": open("/sys/fs/cgroup/pids/pids.max").read().strip() if os.path.exists("/sys/fs/cgroup/pids/pids.max") else None,
}
print("PROBE " + json.dumps(facts), flush=True)
'''


def probe_train_py(extra: str = "") -> str:
    return PROBE + extra + SUMMARY


def read_probe(log_text: str) -> dict:
    for line in log_text.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE "):])
    raise AssertionError("no PROBE line in the log:\n" + log_text[-2000:])
