"""Run untrusted (model-written) Python in a bubblewrap sandbox, and judge it with tests it cannot touch.

Isolation. Every sandboxed process is started by Debian's `bwrap` with new user, PID, mount, network, IPC,
UTS and cgroup namespaces (`--unshare-all` plus an explicit `--unshare-user`, `--disable-userns`,
`--die-with-parent`, `--new-session`, `--clearenv`). The file system is built from nothing: `/usr` (the
`/bin`, `/lib`, `/lib64` symlinks) and the interpreter's own prefix read-only, a minimal read-only `/dev`, the
namespace's own `/proc`, and a size-capped private tmpfs as `/tmp` and working directory. The host's /tmp,
$HOME, the repository, sockets under /run: none exist inside. The network namespace has only a loopback of
its own. The interpreter runs with `-I -S`: the standard library only, no site-packages, no environment.

Limits on the whole process tree. Per process (set inside before any untrusted code runs; a process in a
non-initial user namespace cannot raise a hard limit back): RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE,
RLIMIT_NOFILE, RLIMIT_CORE = 0 and RLIMIT_NPROC. The tree is bounded by the process count: since Linux 5.14
RLIMIT_NPROC is counted per (user namespace, uid), i.e. here over this sandbox's processes and threads
alone. The kernel ignores RLIMIT_NPROC for real root, so when the supervisor is root it drops the sandbox to
uid/gid 65534 (`nobody`) before `bwrap`, which then sets up the namespaces unprivileged (and runs the
system's /usr/bin/python3 if nobody cannot reach the supervisor's interpreter, e.g. under /root/.pyenv).
Total memory <= processes x memory + tmpfs size. Why not a cgroup: on this machine only cgroup v1 is
mounted with controllers (/sys/fs/cgroup/unified has none), and elsewhere a v2 sub-tree needs delegation
that a container or a plain user rarely has; the rlimit bound needs nothing and holds everywhere (measured:
a fork bomb stops at the count, see tests/test_sandbox.py). The supervisor's wall-clock limit kills the
outer `bwrap`; its child, PID 1 of the namespace, dies with it (`--die-with-parent`), and the kernel then
kills every process in the namespace.

Failing closed. `ensure_available()` runs a probe inside the sandbox once per process (its own PID 1, no
interface but `lo`, a read-only `/usr`) and raises `SandboxUnavailable` with the reason if bwrap is missing
or the namespaces are refused. Nothing is ever run without the sandbox.

The verdict (`check_program`). The candidate program and the test code never share an interpreter: code
that shares the tests' interpreter can always forge a pass (print the token, `os._exit(0)` after faking
output, `sys.settrace` jumping over asserts, returning an object whose `__eq__` is always True, patching
`check`). So two sandboxes run side by side, joined only by two pipes the supervisor creates:

* the candidate sandbox execs the program, then serves calls: it reads `(name, args)` requests, calls its
  own top-level function of that name, and writes back the result or the exception's text;
* the judge sandbox execs the dataset's test code, where the entry point and every top-level function of
  the program (HumanEval tests call prompt helpers such as `poly`) are proxies that send a request and
  decode the answer. Values cross as a tagged JSON of exact builtin types only (None, bool, int, float,
  str, bytes, list, tuple, dict, set, frozenset; a subclass is refused), so what comes back is inert data
  with builtin `==`; nothing the candidate sends is ever executed.

The supervisor counts a pass only if the judge exits 0 within the wall-clock limit AND the last line of
the judge's stdout is a random per-run nonce that only the judge knows (it reads it from its private
stdin; the candidate sandbox has no path to the judge's stdin, stdout, memory or PID). Whatever the
candidate does (exit early, print anything, crash, hang, answer wrongly, kill everything it can see), the
worst outcome is a wrong answer, a timeout or a broken pipe, each a failure. The candidate's stdout is
redirected to its stderr, kept (capped) only for the failure message. A call's arguments are copied, so a
candidate that mutates an argument in place is not seen by the test (no HumanEval test relies on it: all
164 canonical solutions pass: tests/test_sandbox.py).

    python -m study.measure.sandbox   # probe the sandbox and check a canonical HumanEval solution
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

NOBODY = 65534
MAX_MESSAGE = 16 * 1024**2  # bytes per request/answer line between judge and candidate


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be set up here; nothing was run."""


@dataclass(frozen=True)
class Limits:
    """Limits of one sandbox (each of the two in `check_program` gets them)."""

    wall_s: float = 10.0
    """Wall-clock seconds before the supervisor kills the whole namespace."""
    cpu_s: int = 10
    """RLIMIT_CPU per process (seconds of CPU)."""
    memory_bytes: int = 1024**3
    """RLIMIT_AS per process."""
    processes: int = 4
    """RLIMIT_NPROC: processes and threads in the sandbox's user namespace, bwrap's own PID 1 included."""
    file_bytes: int = 16 * 1024**2
    """RLIMIT_FSIZE: largest file a process may write (also caps what it writes to stdout/stderr)."""
    open_files: int = 64
    """RLIMIT_NOFILE."""
    tmp_bytes: int = 32 * 1024**2
    """Size of the private tmpfs mounted at /tmp (the working directory)."""


# Prepended to every program run in the sandbox: applies the limits, then runs the payload.
_PRELUDE = r"""
import json as _j, os as _o, resource as _r, sys as _s
_L = _j.loads(_s.argv[1])
for _n, _v in (("AS", _L["memory_bytes"]), ("CPU", _L["cpu_s"]), ("FSIZE", _L["file_bytes"]),
               ("NOFILE", _L["open_files"]), ("CORE", 0), ("NPROC", _L["processes"])):
    _r.setrlimit(getattr(_r, "RLIMIT_" + _n), (_v, _v))
del _j, _o, _r, _s, _L, _n, _v
"""

# Both sides of `check_program` encode values with this: exact builtin types only, nothing executable.
_CODEC = r"""
def _enc(x):
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if t is int:
        return {"i": str(x)}
    if t is float:
        return {"f": repr(x)}
    if t is bytes:
        return {"y": x.hex()}
    if t in (list, tuple, set, frozenset):
        return {{list: "l", tuple: "t", set: "s", frozenset: "z"}[t]: [_enc(v) for v in x]}
    if t is dict:
        return {"d": [[_enc(k), _enc(v)] for k, v in x.items()]}
    raise TypeError("cannot pass a value of type " + t.__name__ + " across the sandbox")

def _dec(x):
    if x is None or type(x) in (bool, str):
        return x
    if type(x) is not dict or len(x) != 1:
        raise ValueError("malformed value")
    (k, v), = x.items()
    if k == "i":
        return int(v)
    if k == "f":
        return float(v)
    if k == "y":
        return bytes.fromhex(v)
    if k == "d":
        return {_dec(a): _dec(b) for a, b in v}
    return {"l": list, "t": tuple, "s": set, "z": frozenset}[k](_dec(e) for e in v)
"""

# The candidate sandbox: exec the program, then answer calls on its pipe until EOF.
_CANDIDATE = (
    _CODEC
    + r"""
import json, os, sys, traceback
_inp = os.fdopen(os.dup(0), "rb", buffering=0)
_out = os.fdopen(os.dup(1), "wb", buffering=0)
os.dup2(os.open("/dev/null", os.O_RDONLY), 0)
os.dup2(2, 1)  # the program's prints go to stderr, never into the answers

def _send(msg):
    _out.write(json.dumps(msg).encode() + b"\n")

_g = {"__name__": "__candidate__", "__builtins__": __builtins__}
try:
    exec(compile(open("/sandbox/program.py").read(), "program.py", "exec"), _g)
except BaseException as e:
    _send({"error": "program raised " + "".join(traceback.format_exception_only(e)).strip()[-500:]})
    raise SystemExit(1)
_send({"names": [n for n, v in list(_g.items()) if callable(v) and not n.startswith("__")]})
while True:
    line = _inp.readline()
    if not line:
        break
    req = json.loads(line)
    try:
        value = _g[req["name"]](*_dec(req["args"]), **_dec(req["kwargs"]))
        _send({"value": _enc(value)})
    except BaseException as e:
        _send({"raised": "".join(traceback.format_exception_only(e)).strip()[-500:]})
"""
)

# The judge sandbox: trusted test code, the program's functions as proxies, the nonce on its stdin.
_JUDGE = (
    _CODEC
    + r"""
import json, os, sys
job = json.loads(sys.stdin.read())
_req = os.fdopen(job["req_fd"], "wb", buffering=0)
_ans = os.fdopen(job["ans_fd"], "rb")

class CandidateError(Exception):
    pass

def _recv():
    line = _ans.readline(job["max_message"] + 1)
    if not line.endswith(b"\n"):
        raise CandidateError("no answer from the program (it exited, or the answer is too long)")
    return json.loads(line)

def _proxy(name):
    def call(*args, **kwargs):
        _req.write(json.dumps({"name": name, "args": _enc(args), "kwargs": _enc(kwargs)}).encode() + b"\n")
        msg = _recv()
        if "raised" in msg:
            raise CandidateError(name + " raised " + msg["raised"])
        return _dec(msg["value"])
    call.__name__ = name
    return call

hello = _recv()
if "names" not in hello:
    raise CandidateError(hello.get("error", "the program did not start"))
if job["entry_point"] not in hello["names"]:
    raise CandidateError("the program defines no function " + job["entry_point"])
g = {"__name__": "__judge__"}
g.update({n: _proxy(n) for n in hello["names"]})
exec(compile(job["test"], "test.py", "exec"), g)
g["check"](_proxy(job["entry_point"]))
sys.stdout.write("\n" + job["nonce"] + "\n")
sys.stdout.flush()
"""
)


def _reachable(path: Path) -> bool:
    """Can `nobody` (no group, "other" permission bits) read and traverse down to `path`?"""
    for p in [*reversed(path.parents), path]:
        mode = p.stat().st_mode
        if not mode & 0o001 or (p == path and not mode & 0o004):
            return False
    return True


@lru_cache(maxsize=1)
def _interpreter() -> tuple[Path, Path]:
    """(prefix, executable) of the interpreter run inside: the supervisor's base interpreter (no venv: the
    standard library only), or, if the sandbox user `nobody` cannot reach it (e.g. under /root/.pyenv), the
    system's /usr/bin/python3."""
    candidates = [(Path(sys.base_prefix).resolve(), Path(os.path.realpath(sys.executable)))]
    system = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if system:
        exe = Path(os.path.realpath(system))
        candidates.append((exe.parent.parent, exe))
    for prefix, exe in candidates:
        if exe.is_relative_to(prefix) and (os.geteuid() != 0 or _reachable(exe)):
            return prefix, exe
    raise SandboxUnavailable(
        f"no Python interpreter that the sandbox user can read: tried "
        f"{', '.join(str(e) for _, e in candidates)}"
    )


def _start(
    payload: str,
    limits: Limits,
    *,
    stdin,
    stdout,
    stderr,
    files: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen:
    """Start `python -I -S -c PRELUDE+payload` in a fresh sandbox; `files` = {path inside: text} (read-only)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable(
            "bubblewrap is not installed (Debian: apt-get install bubblewrap); "
            "model-written code is never run without it"
        )
    prefix, exe = _interpreter()
    opened: list[int] = []
    argv = [bwrap, *"--unshare-all --unshare-user --disable-userns --die-with-parent --new-session".split()]
    argv += ["--clearenv", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64"):  # merged /usr: symlinks; otherwise the real folders, read-only
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += [
        "--ro-bind",
        str(prefix),
        str(prefix),
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--remount-ro",
        "/dev",
    ]
    argv += ["--size", str(limits.tmp_bytes), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    for name, value in (("PATH", "/usr/bin:/bin"), ("HOME", "/tmp"), ("LANG", "C.UTF-8")):
        argv += ["--setenv", name, value]
    try:
        for dest, text in (files or {}).items():
            with tempfile.TemporaryFile() as f:  # bwrap copies it in from the fd
                f.write(text.encode())
                f.seek(0)
                opened.append(os.dup(f.fileno()))
            argv += ["--ro-bind-data", str(opened[-1]), dest]
        lim = json.dumps(
            {
                k: getattr(limits, k)
                for k in ("memory_bytes", "cpu_s", "file_bytes", "open_files", "processes")
            }
        )
        argv += ["--", str(exe), "-I", "-S", "-c", _PRELUDE + payload, lim]
        root = os.geteuid() == 0  # real root is exempt from RLIMIT_NPROC: run the sandbox as nobody
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            pass_fds=(*pass_fds, *opened),
            start_new_session=True,
            **({"user": NOBODY, "group": NOBODY, "extra_groups": []} if root else {}),
        )
    finally:
        for fd in opened:
            os.close(fd)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the outer bwrap (its process group); PID 1 of the namespace and everything under it follow."""
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(f, n: int = 2000) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - n))
    return f.read().decode(errors="replace")


@dataclass(frozen=True)
class Outcome:
    """What the supervisor observed of one sandboxed run."""

    returncode: int | None
    """Exit status (negative: killed by that signal; None: killed at the wall-clock limit)."""
    stdout: str
    """The last 64 KiB of stdout."""
    stderr: str
    """The last 2 KiB of stderr."""
    timed_out: bool
    seconds: float


def run_python(source: str, limits: Limits = Limits(), stdin: str = "") -> Outcome:
    """Run one untrusted Python program in the sandbox and report what was observed from outside."""
    ensure_available()
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as inp, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        inp.write(stdin.encode())
        inp.seek(0)
        proc = _start(
            "exec(compile(open('/sandbox/program.py').read(), 'program.py', 'exec'))",
            limits,
            stdin=inp,
            stdout=out,
            stderr=err,
            files={"/sandbox/program.py": source},
        )
        try:
            proc.wait(timeout=limits.wall_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill(proc)
        return Outcome(
            None if timed_out else proc.returncode,
            _tail(out, 65536),
            _tail(err),
            timed_out,
            time.monotonic() - t0,
        )


def check_program(program: str, test: str, entry_point: str, limits: Limits = Limits()) -> dict:
    """HumanEval-style check: `test` defines `check(candidate)`, called with the program's `entry_point`.
    Returns {"passed": bool, "result": "passed" | "timed out" | "failed: <why>", "seconds": float}."""
    ensure_available()
    t0 = time.monotonic()
    nonce = secrets.token_hex(16)
    req_r, req_w = os.pipe()  # judge -> candidate
    ans_r, ans_w = os.pipe()  # candidate -> judge
    with (
        tempfile.TemporaryFile() as job,
        tempfile.TemporaryFile() as cand_err,
        tempfile.TemporaryFile() as judge_out,
        tempfile.TemporaryFile() as judge_err,
    ):
        job.write(
            json.dumps(
                {
                    "test": test,
                    "entry_point": entry_point,
                    "nonce": nonce,
                    "max_message": MAX_MESSAGE,
                    "req_fd": req_w,
                    "ans_fd": ans_r,
                }
            ).encode()
        )
        job.seek(0)
        procs = []
        try:
            procs.append(
                _start(
                    _CANDIDATE,
                    limits,
                    stdin=req_r,
                    stdout=ans_w,
                    stderr=cand_err,
                    files={"/sandbox/program.py": program},
                )
            )
            procs.append(
                _start(_JUDGE, limits, stdin=job, stdout=judge_out, stderr=judge_err, pass_fds=(ans_r, req_w))
            )
        finally:
            for fd in (req_r, req_w, ans_r, ans_w):
                os.close(fd)  # only the two sandboxes hold the pipes now: one dying gives the other EOF
        judge = procs[-1]
        try:
            judge.wait(timeout=max(0.0, limits.wall_s - (time.monotonic() - t0)))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        for p in procs:
            _kill(p)
        judge_out.seek(0)
        lines = judge_out.read().decode(errors="replace").splitlines()
        passed = not timed_out and judge.returncode == 0 and bool(lines) and lines[-1] == nonce
        if passed:
            result = "passed"
        elif timed_out:
            result = "timed out"
        else:
            why = [ln for ln in _tail(judge_err).splitlines() if ln.strip()]
            result = "failed: " + (why[-1] if why else f"judge exited {judge.returncode}")
            cand = _tail(cand_err, 500).strip()
            if "CandidateError" in result and cand:
                result += " | program stderr: " + cand.splitlines()[-1]
    return {"passed": passed, "result": result, "seconds": round(time.monotonic() - t0, 3)}


_PROBE = r"""
import os, socket
assert os.getpid() <= 3, os.getpid()
assert [n for _, n in socket.if_nameindex()] == ["lo"], socket.if_nameindex()
visible = set(os.listdir("/")) - {"usr", "bin", "lib", "lib64", "proc", "dev", "tmp", "sandbox", "ALLOWED"}
assert not visible, "host folders visible: " + str(sorted(visible))
try:
    open("/usr/sandbox-probe", "w")
    raise AssertionError("/usr is writable")
except OSError:
    pass
print("sandbox ok")
"""


@lru_cache(maxsize=1)
def _probe() -> str:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            top = _interpreter()[0].parts[1]  # the interpreter prefix's top folder is bound too
            proc = _start(
                _PROBE.replace("ALLOWED", top), Limits(), stdin=subprocess.DEVNULL, stdout=out, stderr=err
            )
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return "the probe did not finish in 60 s"
        except (OSError, SandboxUnavailable) as e:
            return f"bwrap could not be started: {e}"
        out.seek(0)
        if proc.returncode == 0 and out.read().decode().strip() == "sandbox ok":
            return ""
        return f"exit {proc.returncode}: {_tail(err, 500).strip()}"


def ensure_available() -> None:
    """Raise SandboxUnavailable (saying why) unless the sandbox works here; cached once it does."""
    why = _probe()
    if why:
        _probe.cache_clear()
        raise SandboxUnavailable(
            f"the code sandbox (bubblewrap with user, PID, mount and network "
            f"namespaces) cannot be set up here, so no model code is run: {why}"
        )


if __name__ == "__main__":
    import gzip

    from study.measure.humaneval import problems_file

    ensure_available()
    with gzip.open(problems_file(), "rt") as f:
        p = json.loads(f.readline())
    print(check_program(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]))
    print(check_program(p["prompt"] + "    return True\n", p["test"], p["entry_point"]))
