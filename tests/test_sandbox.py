"""Hostile programs against study.measure.sandbox: every one contained, the harness alive, the verdict
"failed" or "timed out", each within its time budget.

Each program is judged as a solution of `add(a, b)` (test: `assert candidate(2, 3) == 5`) and none is a
correct one, so a "passed" verdict would be a forged one. Around each run the test holds host-side bait: a
unix socket, a TCP and a UDP listener on 127.0.0.1, a secret file in a host temp dir, an unrelated sleeper
process; afterwards nothing may have reached the listeners, no file may have appeared outside the sandbox,
the sleeper, this process and its parent must be alive and no process of the sandbox may be left. Controls
show that the bait detects the same attacks run without the sandbox, and that a correct program passes.

    python -m pytest tests/test_sandbox.py -q
    SANDBOX_TABLE=1 python -m pytest tests/test_sandbox.py -q   # also writes results/sandbox_hostile.md
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from study.measure import sandbox
from study.measure.sandbox import Limits, SandboxUnavailable, check_program, run_python

REPO = Path(__file__).resolve().parent.parent
if shutil.which("bwrap") is None and os.geteuid() != 0:
    pytest.skip(
        "SANDBOX TESTS SKIPPED: bubblewrap (`bwrap`) is not installed and this user cannot install it "
        "(as root: apt-get install bubblewrap, or make system-deps); HumanEval will refuse to run",
        allow_module_level=True,
    )

TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
WRONG = "\ndef add(a, b):\n    return a - b\n"
# A marker unique to this session in every sandbox's command line (the limits travel as JSON in argv), so
# leftover sandbox processes can be found.
LIMITS = Limits(wall_s=2.0, cpu_s=2, file_bytes=16 * 1024**2 + os.getpid() % 4096)
SLACK = 3.0  # seconds past the wall-clock limit for start-up and kill, on a loaded 2-core machine

FORK_LOOP = "while True:\n    try:\n        {fork}\n    except OSError:\n        pass\n"
SEND = """
import socket
for fam, kind, addr in [(socket.AF_UNIX, socket.SOCK_STREAM, {unix!r}),
                        (socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", {tcp})),
                        (socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", {udp}))]:
    try:
        s = socket.socket(fam, kind)
        s.settimeout(0.5)
        if kind == socket.SOCK_DGRAM:
            s.sendto(b"leak", addr)
        else:
            s.connect(addr)
            s.sendall(b"leak")
    except OSError:
        pass
"""

# name -> program (formatted with the bait's coordinates); each also defines a wrong `add` or none at all.
HOSTILE = {
    # fork bombs
    "fork bomb: os.fork": "import os\n" + FORK_LOOP.format(fork="os.fork()"),
    "fork bomb: posix.fork": "import posix\n" + FORK_LOOP.format(fork="posix.fork()"),
    "fork bomb: subprocess": "import subprocess, sys\n"
    + FORK_LOOP.format(fork="subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"),
    "fork bomb: multiprocessing": "import multiprocessing as mp, time\n"
    + FORK_LOOP.format(fork="mp.get_context('fork').Process(target=time.sleep, args=(60,)).start()"),
    "fork bomb: ctypes libc.fork": "import ctypes\nlibc = ctypes.CDLL(None)\n"
    + FORK_LOOP.format(fork="libc.fork()"),
    "thread bomb": "import threading, time\n"
    + FORK_LOOP.format(fork="threading.Thread(target=time.sleep, args=(60,), daemon=True).start()").replace(
        "except OSError", "except (OSError, RuntimeError)"
    ),
    # killing
    "kill parent and grandparent": "import os\nfor p in (os.getppid(), {test_pid}, {parent_pid}):\n"
    "    try:\n        os.kill(p, 9)\n    except OSError:\n        pass\n" + WRONG,
    "kill pid 1": "import os, signal\nfor s in (signal.SIGTERM, signal.SIGKILL):\n    try:\n"
    "        os.kill(1, s)\n    except OSError:\n        pass\n" + WRONG,
    "kill every pid in /proc": "import os\nfor p in [int(d) for d in os.listdir('/proc') if d.isdigit()]"
    " + [{sleeper_pid}, {test_pid}, {parent_pid}]:\n    if p != os.getpid():\n        try:\n"
    "            os.kill(p, 9)\n        except OSError:\n            pass\n" + WRONG,
    "os.kill(-1, 9)": "import os\ntry:\n    os.kill(-1, 9)\nexcept OSError:\n    pass\n" + WRONG,
    # files
    "write outside the work dir": "for p in ({host_tmp!r}, '/tmp', {home!r}, {repo!r}, '/usr', '/etc', '/dev/shm',"
    " '/proc'):\n    try:\n        open(p + '/{stamp}', 'w').write('x')\n    except OSError:\n        pass\n"
    + WRONG,
    "read host secrets": "out = []\nfor p in ({secret!r}, '/etc/shadow', {home!r} + '/.bash_history'):\n"
    "    try:\n        out.append(open(p).read())\n    except OSError:\n        pass\n"
    "if out:\n    raise RuntimeError('LEAK ' + repr(out))\n" + WRONG,
    "fill the work dir's disk": "f = open('/tmp/fill', 'wb')\ntry:\n    while True:\n"
    "        f.write(b'x' * (1 << 20))\n        f.flush()\nexcept OSError:\n    pass\n" + WRONG,
    "nested user namespace": "import ctypes\nassert ctypes.CDLL(None).unshare(0x10000000) != 0\n" + WRONG,
    # network
    "unix, TCP and UDP to host listeners": SEND + WRONG,
    # memory
    "20 GB single allocation": "x = bytearray(20 * 2**30)\n" + WRONG,
    "20 GB across forked children": "import os\nfor _ in range(3):\n    if os.fork() == 0:\n"
    "        x = bytearray(7 * 2**30)\n        os._exit(0)\nx = bytearray(7 * 2**30)\n" + WRONG,
    # time and output
    "infinite loop ignoring SIGTERM/SIGINT": "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, "
    "signal.SIGHUP):\n    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n",
    "huge stdout": "import sys\nwhile True:\n    sys.stdout.write('x' * (1 << 20))\n",
    "huge stderr inside the call": "import sys\ndef add(a, b):\n    while True:\n"
    "        sys.stderr.write('y' * (1 << 20))\n",
    # forging the verdict
    "forge: print 'passed' and tokens": "print('passed')\nprint('{{\"names\": [\"add\"]}}')\n"
    "import sys\nsys.stderr.write('passed\\n')\n" + WRONG,
    "forge: os._exit(0) before serving": "import os\nprint('passed')\nos._exit(0)\n" + WRONG,
    "forge: os._exit(0) inside the call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "forge: sys.exit(0) at import": "import sys\nsys.exit(0)\n" + WRONG,
    "forge: sys.exit(0) inside the call": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "forge: raise SystemExit in __del__": "class D:\n    def __del__(self):\n        raise SystemExit(0)\n"
    "def add(a, b):\n    D()\n    return a - b\n",
    "forge: object whose __eq__ is always True": "class T:\n    def __eq__(self, o):\n        return True\n"
    "def add(a, b):\n    return T()\n",
    "forge: int subclass equal to everything": "class I(int):\n    def __eq__(self, o):\n        return True\n"
    "def add(a, b):\n    return I(0)\n",
    "forge: monkeypatch builtins and assert": "import builtins\nbuiltins.AssertionError = type('A', (Exception,),"
    " {{}})\nbuiltins.print = lambda *a, **k: None\nimport sys\nsys.settrace(lambda *a: None)\n" + WRONG,
    "forge: atexit prints 'passed'": "import atexit, os\natexit.register(lambda: (print('passed'), os._exit(0)))\n"
    + WRONG,
    "forge: write fake answers on the pipe": 'import os\nos.write(1, b\'{{"names": ["add"]}}\\n{{"value": '
    '"passed"}}\\n\')\n' + WRONG,
    "forge: write 'passed' into every visible process's fds": "import os\nfor p in os.listdir('/proc'):\n"
    "    for fd in ('0', '1', '2', '3', '4'):\n        try:\n"
    "            open('/proc/' + p + '/fd/' + fd, 'w').write('passed\\n')\n        except Exception:\n"
    "            pass\n" + WRONG,
    "forge: KeyboardInterrupt inside the call": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "forge: answer too deep to encode": "def add(a, b):\n    x = []\n    for _ in range(100000):\n"
    "        x = [x]\n    return x\n",
    "forge: NaN answer": "def add(a, b):\n    return float('nan')\n",
    "no entry point": "def other(a, b):\n    return a + b\n",
    "syntax error": "def add(a, b)\n    return a + b\n",
}
TIMEOUT_OK = {"timed out", "failed"}  # the verdicts a hostile program may get


class Bait:
    """Host-side listeners, files and an unrelated process that a contained program cannot reach."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.received: list[str] = []
        self.secret = folder / "secret.txt"
        self.secret.write_text("hunter2-" + uuid.uuid4().hex)
        self.unix = str(folder / "bait.sock")
        self.socks = []
        for fam, kind, addr in [
            (socket.AF_UNIX, socket.SOCK_STREAM, self.unix),
            (socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", 0)),
            (socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0)),
        ]:
            s = socket.socket(fam, kind)
            s.bind(addr)
            if kind == socket.SOCK_STREAM:
                s.listen(16)
            self.socks.append(s)
            threading.Thread(target=self._serve, args=(s, kind), daemon=True).start()
        self.tcp, self.udp = self.socks[1].getsockname()[1], self.socks[2].getsockname()[1]
        os.chmod(self.unix, 0o777)  # reachable by any uid, were it visible
        os.chmod(folder, 0o755)
        self.sleeper = subprocess.Popen(["sleep", "600"])

    def _serve(self, s, kind):
        while True:
            try:
                if kind == socket.SOCK_DGRAM:
                    self.received.append(f"udp {s.recv(100)!r}")
                else:
                    conn, _ = s.accept()
                    conn.settimeout(1)
                    try:
                        self.received.append(f"{s.family.name} {conn.recv(100)!r}")
                    finally:
                        conn.close()
            except OSError:
                return

    def fields(self, stamp: str) -> dict:
        return {
            "unix": self.unix,
            "tcp": self.tcp,
            "udp": self.udp,
            "secret": str(self.secret),
            "host_tmp": str(self.folder),
            "home": os.path.expanduser("~"),
            "repo": str(REPO),
            "stamp": stamp,
            "test_pid": os.getpid(),
            "parent_pid": os.getppid(),
            "sleeper_pid": self.sleeper.pid,
        }

    def stray_files(self, stamp: str) -> list[str]:
        places = [
            self.folder,
            Path("/tmp"),
            Path(os.path.expanduser("~")),
            REPO,
            Path("/usr"),
            Path("/etc"),
            Path("/dev/shm"),
        ]
        return [str(p / stamp) for p in places if (p / stamp).exists()]

    def close(self):
        for s in self.socks:
            s.close()
        self.sleeper.kill()
        self.sleeper.wait()


@pytest.fixture(scope="module")
def bait(tmp_path_factory):
    b = Bait(tmp_path_factory.mktemp("bait"))
    yield b
    b.close()


def leftover_sandbox_processes(file_bytes: int = LIMITS.file_bytes) -> list[int]:
    marker = f'"file_bytes": {file_bytes}'.encode()
    out = []
    for d in os.listdir("/proc"):
        try:
            if d.isdigit() and marker in Path(f"/proc/{d}/cmdline").read_bytes():
                out.append(int(d))
        except OSError:
            pass
    return out


ROWS: list[tuple] = []


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained(name, bait):
    stamp = f"pwned-{uuid.uuid4().hex[:8]}"
    program = HOSTILE[name].format(**bait.fields(stamp))
    parent = os.getppid()
    secret = bait.secret.read_text()
    t0 = time.monotonic()
    r = check_program(program, TEST, "add", LIMITS)
    seconds = time.monotonic() - t0
    time.sleep(0.2)  # let a datagram or connection that did get out arrive
    leftovers = leftover_sandbox_processes()
    stray = bait.stray_files(stamp)
    problems = {
        "listeners got data": bait.received[:],
        "files written outside": stray,
        "secret changed or leaked": bait.secret.read_text() != secret or secret in r["result"],
        "sleeper died": bait.sleeper.poll() is not None,
        "parent died": os.getppid() != parent,
        "sandbox processes left": leftovers,
    }
    contained = not any(problems.values())
    verdict = r["result"].split(":")[0]
    ROWS.append((name, contained, bait.sleeper.poll() is None and os.getppid() == parent, verdict, seconds))
    for pid in leftovers:  # clean up before failing, so one failure does not cascade
        os.kill(pid, signal.SIGKILL)
    bait.received.clear()
    assert contained, {k: v for k, v in problems.items() if v}
    assert not r["passed"] and verdict in TIMEOUT_OK, r
    assert seconds < LIMITS.wall_s + SLACK, seconds


def test_correct_program_passes():
    """Control: the judge can say "passed" (else every hostile verdict above would be vacuous)."""
    r = check_program("def add(a, b):\n    return a + b\n", TEST, "add", LIMITS)
    assert r["passed"] and r["result"] == "passed", r
    helper = "def twice(x):\n    return 2 * x\ndef add(a, b):\n    return a + b\n"
    r = check_program(
        helper, "def check(candidate):\n    assert twice(candidate(1, 2)) == 6\n", "add", LIMITS
    )
    assert r["passed"], r  # the test reaches the program's other functions (HumanEval's prompt helpers)


def test_every_humaneval_canonical_solution_passes():
    """The judge reaches programs only through plain values: all 164 canonical solutions still pass."""
    import gzip
    import json

    from study.measure.humaneval import problems_file

    with gzip.open(problems_file(), "rt") as f:
        problems = [json.loads(line) for line in f]
    failed = []
    for p in problems:
        r = check_program(
            p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"], Limits(wall_s=20)
        )
        if not r["passed"]:
            failed.append((p["task_id"], r["result"]))
    assert len(problems) == 164 and not failed, failed


def test_bait_detects_the_same_attacks_unsandboxed(bait):
    """Control: the same sends and writes from an ordinary process do reach the bait."""
    stamp = f"pwned-{uuid.uuid4().hex[:8]}"
    code = (SEND + "open({host_tmp!r} + '/{stamp}', 'w').write('x')\n").format(**bait.fields(stamp))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    time.sleep(0.3)
    got = sorted(m.split()[0] for m in bait.received)
    bait.received.clear()
    assert got == ["AF_INET", "AF_UNIX", "udp"] and bait.stray_files(stamp)
    (bait.folder / stamp).unlink()


def test_sandbox_dies_with_its_supervisor():
    """SIGKILL of the harness (in a run: `study run`) takes both sandboxes with it (--die-with-parent)."""
    limits = Limits(wall_s=60, cpu_s=60, file_bytes=LIMITS.file_bytes + 4096)
    code = (
        f"from study.measure.sandbox import check_program, Limits\n"
        f"check_program('while True: pass', 'def check(c): pass', 'add', Limits(**{limits.__dict__!r}))"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)

    def sandboxed():
        return leftover_sandbox_processes(limits.file_bytes)

    deadline = time.monotonic() + 30
    while len(sandboxed()) < 4 and time.monotonic() < deadline:  # 2 x (outer bwrap, PID 1, python)
        time.sleep(0.1)
    assert len(sandboxed()) >= 4, "the sandboxes did not start"
    supervisor.kill()
    supervisor.wait()
    deadline = time.monotonic() + 5
    while sandboxed() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not sandboxed()


def test_limits_hold_inside():
    """The process-count and memory limits, measured from inside the sandbox."""
    fork = (
        "import os, time\nn = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n"
        "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    n += 1\nprint(n)\n"
    )
    out = run_python(fork, LIMITS)
    assert out.returncode == 0 and int(out.stdout) == LIMITS.processes - 2, out  # bwrap's PID 1 + this one
    mem = "try:\n    x = bytearray({n})\n    print('allocated')\nexcept MemoryError:\n    print('refused')\n"
    assert run_python(mem.format(n=LIMITS.memory_bytes // 2), LIMITS).stdout.strip() == "allocated"
    assert run_python(mem.format(n=LIMITS.memory_bytes), LIMITS).stdout.strip() == "refused"
    out = run_python("import os, socket\nprint(os.getpid(), socket.if_nameindex(), os.listdir('/'))", LIMITS)
    pid, rest = out.stdout.split(" ", 1)
    assert int(pid) <= 3 and "'eth" not in rest and "'work'" not in rest and "'root'" not in rest, out


def test_fails_closed_without_bwrap(monkeypatch):
    """No bwrap, or a bwrap whose namespaces are refused: SandboxUnavailable, and nothing runs."""
    sandbox._probe.cache_clear()
    monkeypatch.setattr(
        sandbox.shutil, "which", lambda name, **kw: None if name == "bwrap" else shutil.which(name, **kw)
    )
    with pytest.raises(SandboxUnavailable, match="bubblewrap is not installed"):
        check_program(WRONG, TEST, "add", LIMITS)
    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # the sandbox user (nobody, under root) can reach it
    folder.chmod(0o755)
    refusing = folder / "bwrap"
    refusing.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setattr(
        sandbox.shutil, "which", lambda name, **kw: str(refusing) if name == "bwrap" else None
    )
    from study.measure import humaneval

    with pytest.raises(SandboxUnavailable, match="No permissions to create new namespace"):
        humaneval.check_programs([({"prompt": "", "test": TEST, "entry_point": "add"}, WRONG)], 1.0)
    monkeypatch.undo()
    shutil.rmtree(folder)
    sandbox._probe.cache_clear()
    sandbox.ensure_available()


def test_write_table():
    """SANDBOX_TABLE=1: the hostile-program table as markdown under results/ (after the runs above)."""
    if not os.environ.get("SANDBOX_TABLE"):
        pytest.skip("set SANDBOX_TABLE=1 to write results/sandbox_hostile.md")
    assert len(ROWS) == len(HOSTILE), "run the whole file"
    lines = ["| program | contained? | harness alive | verdict | seconds |", "|---|---|---|---|---|"]
    lines += [
        f"| {n} | {'yes' if c else 'NO'} | {'yes' if a else 'NO'} | {v} | {s:.2f} |" for n, c, a, v, s in ROWS
    ]
    out = REPO / "results" / "sandbox_hostile.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        f"Hostile programs vs study.measure.sandbox (wall limit {LIMITS.wall_s} s, "
        f"{LIMITS.processes} processes, {LIMITS.memory_bytes >> 20} MiB each)\n\n" + "\n".join(lines) + "\n"
    )
