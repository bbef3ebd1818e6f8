"""Collecting the export hook's files. train.py shares the container, the uid and /out with the
hook and can lay /out/verify out as it likes after the hook wrote it: the runner copies regular
files only, streamed, capped at what /out holds and cut at a deadline. Anything else leaves the
run uncollected (so `unverified`), with nothing of it on the host and the runner's memory flat."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest
from conftest import SUMMARY

import runner.engine  # noqa: F401  imported before any measurement: its imports are not the runner's growth
import sandbox.docker_backend
from sandbox.collect import COLLECT_TIMEOUT_S, Refused, receive_regular_files
from sandbox.spec import EXPORT_DIR, EXPORT_FILES, EXPORT_MARK

pytestmark = pytest.mark.docker

MiB = 1024**2
MODEL = "model.pt2"
assert MODEL in EXPORT_FILES

# The hook's files, honest: regular files of known bytes. `{hostile}` then rearranges them.
TRAIN = f'''\
import os, shutil, signal, threading, time
OUT, NAMES, MiB = {EXPORT_DIR!r}, {EXPORT_FILES!r}, {MiB}
M = os.path.join(OUT, {MODEL!r})

def content(name, size):
    return (name.encode() + bytes(range(256))) * (size // (len(name) + 256))

def write(path, data):
    with open(path, "wb") as f:
        f.write(data)

os.makedirs(OUT, exist_ok=True)
for name in NAMES:
    write(os.path.join(OUT, name), content(name, 64 * 1024))
{{hostile}}
print({EXPORT_MARK!r}, flush=True)
for _ in range(100):  # as the hook waits at exit: the runner has the files
    if os.path.exists(os.path.join(OUT, ".collected")):
        print("SAW_COLLECTED", flush=True)
        break
    time.sleep(0.05)
time.sleep({{linger_s}})
''' + SUMMARY


def content(name: str, size: int) -> bytes:
    """What TRAIN writes as `name`: the host's copy must be this, byte for byte."""
    return (name.encode() + bytes(range(256))) * (size // (len(name) + 256))


# /out/verify rearranged, each way a hostile train.py can
HOSTILE = {
    # a link to a file in /tmp, larger than /out may hold
    "link_to_a_big_file": "write('/tmp/big', b'x' * (400 * MiB)); os.remove(M); os.symlink('/tmp/big', M)",
    # the directory itself a link (tar follows that one) to a regular file too big for /out
    "directory_link_to_a_big_file": "shutil.copytree(OUT, '/tmp/v'); write(M.replace(OUT, '/tmp/v'), b'x' * (400 * MiB)); "
                                    "shutil.rmtree(OUT); os.symlink('/tmp/v', OUT)",
    # each file below the cap, all of them together above it
    "more_than_the_cap_in_all": "os.makedirs('/tmp/v'); [write('/tmp/v/' + n, b'x' * (12 * MiB)) for n in NAMES]; "
                                "shutil.rmtree(OUT); os.symlink('/tmp/v', OUT)",
    "link_to_dev_zero": "os.remove(M); os.symlink('/dev/zero', M)",
    "fifo": "os.remove(M); os.mkfifo(M)",
    "directory": "os.remove(M); os.makedirs(os.path.join(M, 'x'))",
    "hard_link": "os.remove(M); os.link(os.path.join(OUT, NAMES[-1]), M)",
}


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS


def peak_rss_bytes() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def collect_dir(run) -> Path:
    return run.result.log_path.with_suffix(".verify")


@pytest.mark.parametrize("layout", list(HOSTILE))
def test_a_hostile_layout_is_not_collected(attack, layout):
    # /tmp holds the big files and the container's memory their pages; /out stays at 16 MiB
    train = TRAIN.format(hostile=HOSTILE[layout], linger_s=1)
    reset_peak_rss()
    before, t0 = peak_rss_bytes(), time.monotonic()
    run = attack(train, tmp_mb=512, memory_gb=1, startup_grace_s=10)
    elapsed_s, grown = time.monotonic() - t0, peak_rss_bytes() - before

    assert run.result.exit_code == 0, run.result.tail_lines()  # it got as far as the marker and past it
    assert "Traceback" not in run.result.output_tail
    assert not run.result.collected
    folder = collect_dir(run)
    assert not folder.exists() or list(folder.iterdir()) == []  # nothing of it on the host
    assert "SAW_COLLECTED" not in run.result.output_tail  # the hook is never told the files came
    assert elapsed_s < COLLECT_TIMEOUT_S  # the run ends with its process, never held up by the stream
    assert grown < 100 * MiB, f"the runner grew by {grown / MiB:.0f} MiB"  # the big files: 400 MiB, /dev/zero: endless


def test_an_honest_layout_is_collected_byte_for_byte(attack):
    big = f"write(M, content({MODEL!r}, 12 * MiB))"
    run = attack(TRAIN.format(hostile=big, linger_s=0))

    assert run.result.exit_code == 0 and run.result.collected, run.result.tail_lines()
    folder = collect_dir(run)
    assert sorted(p.name for p in folder.iterdir()) == sorted(EXPORT_FILES)
    for name in EXPORT_FILES:
        want = content(name, 12 * MiB if name == MODEL else 64 * 1024)
        assert (folder / name).read_bytes() == want, name
    assert "SAW_COLLECTED" in run.result.output_tail  # the hook, waiting at exit, is let go


# Stops the runner's tar as soon as it starts, lets it go again after `held_s`.
STOP_TAR = '''
def stop_tar(held_s=6):
    while True:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == "tar":
                        os.kill(int(pid), signal.SIGSTOP)
                        print("STOPPED_TAR", flush=True)
                        time.sleep(held_s)
                        os.kill(int(pid), signal.SIGCONT)
                        return
            except OSError:
                pass
threading.Thread(target=stop_tar, daemon=True).start()
'''


def test_a_stalled_stream_is_cut_at_the_deadline(attack, monkeypatch):
    # tar is stopped from inside for 6 s and then finishes: a runner that waited would collect
    monkeypatch.setattr(sandbox.docker_backend, "COLLECT_TIMEOUT_S", 2.0)
    big = f"write(M, content({MODEL!r}, 60 * MiB))" + STOP_TAR
    run = attack(TRAIN.format(hostile=big, linger_s=8), out_mb=64, memory_gb=1, startup_grace_s=30)

    assert run.result.exit_code == 0, run.result.tail_lines()
    assert "STOPPED_TAR" in run.result.output_tail  # the attack took place
    assert not run.result.collected
    folder = collect_dir(run)
    assert not folder.exists() or list(folder.iterdir()) == []


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT, **pax) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(data), dict(pax)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _bad_checksum(data: bytes) -> bytes:
    return data[:148] + b"0000000\0" + data[156:]


HONEST = [(name, content(name, 100_000)) for name in EXPORT_FILES]
FORGED = {
    "extended_header": _tar(HONEST, tarfile.PAX_FORMAT, comment="x" * 1000),
    "gnu_long_name": _tar([(MODEL + "/" * 200, b"x")] + HONEST, tarfile.GNU_FORMAT),
    "bad_checksum": _bad_checksum(_tar(HONEST)),
    "truncated": _tar(HONEST)[:-20_000],
    "sent_twice": _tar(HONEST[:1] + HONEST),
    "end_before_all": _tar(HONEST[:1]),
}


@pytest.mark.parametrize("how", list(FORGED))
def test_a_forged_tar_stream_is_refused_and_leaves_nothing(tmp_path, how):
    """The stream itself, whatever tar or whoever stopped it sent: parsed without the engine."""
    chunks = (FORGED[how][i:i + 7777] for i in range(0, len(FORGED[how]), 7777))
    with pytest.raises(Refused):
        receive_regular_files(chunks, EXPORT_FILES, tmp_path / "collect", tmp_path, cap_bytes=10 * MiB)
    assert not (tmp_path / "collect").exists() or list((tmp_path / "collect").iterdir()) == []


def test_an_honest_tar_stream_in_any_pieces_is_received_within_the_cap(tmp_path):
    data = _tar(HONEST)
    receive_regular_files((data[i:i + 7] for i in range(0, len(data), 7)), EXPORT_FILES, tmp_path / "c", tmp_path,
                          cap_bytes=10 * MiB)
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == dict(HONEST)
    with pytest.raises(Refused):  # each file within the cap, all of them above it
        receive_regular_files((data[i:i + 7] for i in range(0, len(data), 7)), EXPORT_FILES, tmp_path / "d", tmp_path,
                              cap_bytes=150_000)
    assert list((tmp_path / "d").iterdir()) == []
