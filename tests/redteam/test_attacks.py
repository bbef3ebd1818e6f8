"""Hostile and broken train.py files, each run through the real sandbox on the real daemon.

Each attack ends as a recorded outcome (status and reason) and the `attack` fixture checks that
the host is unchanged afterwards. No test sends a packet off this machine.
"""

from __future__ import annotations

import json
import resource
import socket
import textwrap
import threading

import pytest
from conftest import SUMMARY
from servers import bridge_address

pytestmark = pytest.mark.docker


TRY = """
import json, os, shutil, signal, socket, subprocess, sys, time
def attempt(fn):
    try:
        fn()
        return "succeeded"
    except BaseException as exc:
        return type(exc).__name__
"""


def script(body: str, summary: bool = True) -> str:
    """TRY's helpers, then the attack, then (unless told not to) a valid summary block."""
    return TRY + textwrap.dedent(body) + (SUMMARY if summary else "")


def report(run) -> dict:
    for line in run.result.log_path.read_text(errors="replace").splitlines():
        if line.startswith("REPORT "):
            return json.loads(line[7:])
    raise AssertionError(run.result.tail_lines())




def test_tampering_with_the_evaluation_code_fails(attack):
    run = attack(script("""
    r = {
        "append": attempt(lambda: open("prepare.py", "a").write("VAL = 0")),
        "truncate": attempt(lambda: open("prepare.py", "w")),
        "chmod": attempt(lambda: os.chmod("prepare.py", 0o777)),
        "rename": attempt(lambda: os.rename("prepare.py", "/tmp/p.py")),
        "unlink": attempt(lambda: os.unlink("prepare.py")),
        "replace_dir": attempt(lambda: os.rename("/repo", "/tmp/repo")),
        "new_file_in_repo": attempt(lambda: open("/repo/sitecustomize.py", "w")),
        "write_root": attempt(lambda: open("/evil", "w")),
        "write_usr": attempt(lambda: open("/usr/lib/python3/dist-packages/evil.pth", "w")),
        "write_home": attempt(lambda: open(os.path.expanduser("~/.bashrc"), "w")),
        "write_data": attempt(lambda: open(os.path.expanduser("~/.cache/autoresearch/placeholder.txt"), "w")),
    }
    print("REPORT " + json.dumps(r))
    """))
    assert run.outcome.status == "ok"
    assert set(report(run).values()) <= {"PermissionError", "OSError"}, report(run)


def test_network_is_absent_and_a_host_listener_is_unreachable(attack, docker_client):
    # A listener this test starts on the daemon's bridge address: the only host address a
    # container on the default network could reach. The attack must not reach it.
    gateway = bridge_address(docker_client)
    listener = socket.socket()
    listener.bind((gateway, 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        run = attack(script(f"""
        def connect():
            s = socket.socket(); s.settimeout(2); s.connect(("{gateway}", {port}))
        r = {{
            "interfaces": sorted(os.listdir("/sys/class/net")),
            "routes": open("/proc/net/route").read().splitlines()[1:],
            "resolver": open("/etc/resolv.conf").read(),
            "connect_host_listener": attempt(connect),
            "resolve_name": attempt(lambda: socket.getaddrinfo("localhost.localdomain.invalid", 80)),
        }}
        print("REPORT " + json.dumps(r))
        """))
    finally:
        stop.set()
        t.join()
        listener.close()
    r = report(run)
    assert r["interfaces"] == ["lo"] and r["routes"] == [] and r["resolver"] == ""
    assert r["connect_host_listener"] == "OSError"  # ENETUNREACH: no route off loopback
    assert r["resolve_name"] == "gaierror"
    assert accepted == []


def test_secrets_of_the_runner_are_out_of_reach(attack, monkeypatch, tmp_path):
    secret = "sk-ant-redteam-planted-secret"
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    home = tmp_path / "home"
    (home / ".config/anthropic").mkdir(parents=True)
    (home / ".config/anthropic/key").write_text(secret)
    monkeypatch.setenv("HOME", str(home))
    half = len(secret) // 2  # the script must not carry the secret itself
    run = attack(script(f"""
    needle = "{secret[:half]}" + "{secret[half:]}"
    found = []
    for root in ("/proc/self/environ", "/proc/1/environ"):
        try:
            if needle in open(root, "rb").read().decode(errors="replace"):
                found.append(root)
        except OSError:
            pass
    for top in ("/home", "/root", "/tmp", "/repo", "/etc", "{home}"):
        for dirpath, _, files in os.walk(top):
            for f in files:
                try:
                    if needle.encode() in open(os.path.join(dirpath, f), "rb").read(1 << 20):
                        found.append(os.path.join(dirpath, f))
                except OSError:
                    pass
    r = {{"found": found, "env_key": os.environ.get("ANTHROPIC_API_KEY"), "home_exists": os.path.exists("{home}")}}
    print("REPORT " + json.dumps(r))
    """))
    assert report(run) == {"found": [], "env_key": None, "home_exists": False}


def test_fork_storm_hits_the_pids_limit(attack):
    run = attack(script("""
    n = 0
    try:
        while True:
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            n += 1
    except OSError as exc:
        print("REPORT " + json.dumps({"forked": n, "error": type(exc).__name__}), flush=True)
        sys.exit(3)
    """, summary=False))
    assert (run.outcome.status, run.outcome.reason) == ("crash", "exit_code")
    r = report(run)
    assert r["error"] == "BlockingIOError" and r["forked"] < 64


def test_thread_storm_hits_the_pids_limit(attack):
    run = attack(script("""
    import threading
    n = 0
    try:
        while True:
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
            n += 1
    except RuntimeError:
        print("REPORT " + json.dumps({"threads": n}), flush=True)
        os._exit(3)
    """, summary=False))
    assert run.outcome.status == "crash"
    assert report(run)["threads"] < 64


def test_memory_blowup_is_an_oom_crash(attack):
    run = attack(script("""
    hog = []
    while True:
        hog.append(bytearray(32 * 1024 * 1024))
    """, summary=False))
    assert (run.outcome.status, run.outcome.reason) == ("crash", "oom")
    # the kernel's kill at the ceiling is the reported peak; that peaks are measured at all is
    # tests/test_conformance.py::test_peak_memory_is_measured_not_assumed
    assert run.result.peak_mem_bytes == 0.5 * 1024**3 and run.memory_gb == 0.5


def test_filling_tmp_and_out_gets_enospc_inside(attack):
    import shutil as sh
    host_free = sh.disk_usage("/").free
    run = attack(script("""
    r = {}
    for d in ("/tmp", "/out"):
        written = 0
        try:
            with open(d + "/fill", "wb") as f:
                while True:
                    f.write(b"x" * (1 << 20)); f.flush(); written += 1
        except OSError as exc:
            r[d] = [exc.errno, written]
    print("REPORT " + json.dumps(r))
    """))
    assert run.outcome.status == "ok"
    r = report(run)
    assert r["/tmp"][0] == 28 and r["/out"][0] == 28  # ENOSPC
    assert r["/tmp"][1] <= 16 and r["/out"][1] <= 16
    assert abs(sh.disk_usage("/").free - host_free) < 64 * 1024**2


def test_sleeping_past_the_deadline_is_a_timeout(attack):
    run = attack(script("import time\ntime.sleep(600)\n", summary=False), kill_grace_s=2)
    assert (run.outcome.status, run.outcome.reason) == ("timeout", "timeout")
    assert run.result.wall_s < run.limits.deadline_s + 2


def test_ignoring_sigterm_gets_sigkill_after_the_grace(attack):
    run = attack(script("""
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("ignoring SIGTERM", flush=True)
    while True:
        time.sleep(1)
    """, summary=False), kill_grace_s=2)
    assert (run.outcome.status, run.outcome.reason) == ("timeout", "timeout")
    assert run.result.exit_code == 137  # SIGKILL
    deadline = run.limits.deadline_s
    assert deadline + 2 <= run.result.wall_s < deadline + 6


def test_a_daemon_left_behind_is_gone_when_the_run_ends(attack):
    run = attack(script("""
    import os, time
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            open("/tmp/daemon.pid", "w").write(str(os.getpid()))
            while True:
                time.sleep(1)
        os._exit(0)
    time.sleep(0.5)
    """))
    assert run.outcome.status == "ok"  # the fixture then checks no process of the run is left


def _rss_growth_mb(fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn()
    return result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def test_printing_half_a_gigabyte_is_capped_and_still_judged(attack):
    """64 times the log cap (the log keeps its head and tail; the runner's memory does not grow
    with what is printed; the summary at the end still counts)."""
    run, growth_mb = _rss_growth_mb(lambda: attack(script("""
    import sys
    line = ("y" * 1023 + "\\n").encode()
    chunk = line * 1024
    for _ in range(512):
        sys.stdout.buffer.write(chunk)
    sys.stdout.flush()
    """), budget_s=60))
    assert run.result.log_bytes >= 512 * 1024**2
    assert run.result.log_truncated
    assert run.outcome.status == "ok" and run.outcome.val_bpb == pytest.approx(1.234567)
    assert growth_mb < 64, f"runner memory grew {growth_mb:.0f} MB"


def test_one_endless_line_is_capped_and_judged_a_timeout(attack):
    run, growth_mb = _rss_growth_mb(lambda: attack(script("""
    import sys
    chunk = b"z" * (1 << 20)
    while True:
        sys.stdout.buffer.write(chunk)
    """, summary=False)))
    assert (run.outcome.status, run.outcome.reason) == ("timeout", "timeout")
    assert run.result.log_bytes > 10 * 1024**2
    assert growth_mb < 64, f"runner memory grew {growth_mb:.0f} MB"


@pytest.mark.parametrize("body,reason", [
    ("print('trained, but forgot the summary')\n", "no_summary"),
    (SUMMARY + "raise SystemExit(1)\n", "exit_code"),
    (SUMMARY.replace("1.234567", "nan"), "bad_metric"),
])
def test_broken_endings_are_crashes(attack, body, reason):
    run = attack(body)
    assert (run.outcome.status, run.outcome.reason) == ("crash", reason)


def test_privileges_cannot_be_gained(attack):
    run = attack(script("""
    def status(name):
        return next(l.split()[1] for l in open("/proc/self/status") if l.startswith(name + ":"))
    suid = [p for d in ("/bin", "/usr/bin", "/sbin", "/usr/sbin") if os.path.isdir(d)
            for p in (os.path.join(d, f) for f in os.listdir(d)) if os.path.isfile(p) and os.stat(p).st_mode & 0o4000]
    su = subprocess.run(["su", "-c", "id -u", "root"], input="", capture_output=True, text=True) if shutil.which("su") else None
    r = {
        "cap_eff": status("CapEff"), "cap_bnd": status("CapBnd"), "no_new_privs": status("NoNewPrivs"),
        "setuid0": attempt(lambda: os.setuid(0)),
        "suid_binaries": suid,
        "su_rc": None if su is None else su.returncode,
        "mknod": attempt(lambda: os.mknod("/tmp/sda", 0o600 | 0o060000, os.makedev(8, 0))),
        "euid": os.geteuid(),
    }
    print("REPORT " + json.dumps(r))
    """))
    r = report(run)
    assert int(r["cap_eff"], 16) == 0 and int(r["cap_bnd"], 16) == 0 and r["no_new_privs"] == "1"
    assert r["setuid0"] == "PermissionError" and r["mknod"] == "PermissionError" and r["euid"] >= 200_000
    assert r["su_rc"] in (None, 1) or r["su_rc"] != 0


def test_io_uring_is_not_reachable(attack):
    """io_uring has been the kernel's most exploited surface; Docker 20.10's built-in seccomp
    default still allows it. The runner's own profile (the engine's current default) does not."""
    run = attack(script("""
    import ctypes, errno
    libc = ctypes.CDLL(None, use_errno=True)
    params = (ctypes.c_char * 120)()
    fd = libc.syscall(425, 4, params)  # io_uring_setup(4, &params) on x86_64
    print("REPORT " + json.dumps({"fd": fd, "errno": errno.errorcode.get(ctypes.get_errno())}))
    """))
    r = report(run)
    assert r["fd"] == -1 and r["errno"] in ("EPERM", "ENOSYS")


def test_nothing_of_the_host_or_other_runs_is_visible(attack):
    run = attack(script("""
    r = {
        "docker_sock": [p for p in ("/var/run/docker.sock", "/run/docker.sock") if os.path.exists(p)],
        "git": os.path.exists("/repo/.git"),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "pid1": open("/proc/1/cmdline", "rb").read().split(b"\\0")[0].decode(),
        "docker_lib": os.path.exists("/var/lib/docker"),
        "mounts": [l.split()[1] for l in open("/proc/self/mounts")],
    }
    print("REPORT " + json.dumps(r))
    """))
    r = report(run)
    assert r["docker_sock"] == [] and r["git"] is False and r["docker_lib"] is False
    assert r["pid1"].endswith("docker-init") and len(r["pids"]) <= 3
    assert not any(m.startswith(("/var/lib/docker", "/root", "/work")) for m in r["mounts"])


def test_the_host_file_table_and_core_dumps_are_out_of_reach(attack):
    run = attack(script("""
    import resource
    files = []
    def grab():
        while True:
            files.append(open("/dev/null"))
    r = {"open": attempt(grab), "count": len(files), "core": list(resource.getrlimit(resource.RLIMIT_CORE)),
         "raise_core": attempt(lambda: resource.setrlimit(resource.RLIMIT_CORE, (2**30, 2**30)))}
    print("REPORT " + json.dumps(r))
    """))
    r = report(run)
    assert r["open"] == "OSError" and 900 < r["count"] < 1024  # EMFILE at the nofile ulimit (1024)
    assert r["core"] == [0, 0] and r["raise_core"] == "ValueError"  # and it cannot be raised


def test_proxy_credentials_of_the_client_config_never_enter(attack, tmp_path, monkeypatch):
    secret = "proxy-user:s3cret-planted"
    (tmp_path / "docker-config").mkdir()
    (tmp_path / "docker-config" / "config.json").write_text(json.dumps(
        {"proxies": {"default": {"httpProxy": f"http://{secret}@127.0.0.1:3128", "httpsProxy": f"http://{secret}@127.0.0.1:3128"}}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    run = attack(script("""
    print("REPORT " + json.dumps({"environ": open("/proc/self/environ", "rb").read().decode(errors="replace")}))
    """))
    assert "s3cret-planted" not in report(run)["environ"]


def test_the_configured_oci_runtime_is_the_one_used(run_train):
    """runtime: in runner.yaml reaches the engine (gVisor's runsc, Kata); one it lacks is a
    harness error naming it, never a silent fallback to runc."""
    from sandbox.backend import SandboxError

    assert run_train(SUMMARY, runtime="runc").outcome.status == "ok"
    with pytest.raises(SandboxError, match="no-such-runtime"):
        run_train(SUMMARY, runtime="no-such-runtime")
