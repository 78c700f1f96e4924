"""A real single-node SLURM cluster for the executor's tests: Debian's `slurm-wlm` and `munge`, a private
munged (its own key and socket), slurmctld + slurmd on this host with every state/spool/log path in a temp
folder, one CPU partition `cpu`. Started once per test session, torn down after it.

    python tests/slurm_cluster.py        # start one by hand, print `export SLURM_CONF=...`, Ctrl-C stops it

Nothing here is mocked: `sbatch`, `squeue`, `scontrol requeue` and `scancel` talk to the daemons. The
packages are installed with apt-get when missing and we are root (scripts/system-deps.sh does the same);
when the cluster cannot start, `start()` raises `ClusterUnavailable` with the reason and the daemons' logs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "scancel")


class ClusterUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ensure_packages() -> None:
    if all(shutil.which(d) or Path(f"/usr/sbin/{d}").exists() for d in DAEMONS):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurm-wlm/munge are not installed and we are not root to apt-get them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"],
    ):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _node_memory_mb() -> int:
    """slurmd -C's RealMemory (what slurmd will report), less a margin so the node is never drained for
    having less memory than configured."""
    out = subprocess.run([_sbin("slurmd"), "-C"], capture_output=True, text=True).stdout
    for tok in out.split():
        if tok.startswith("RealMemory="):
            return max(int(tok.split("=")[1]) - 256, 512)
    return 1024


class Cluster:
    def __init__(self, root: Path, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.pids: list[int] = []

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        self.munge_socket = r / "munge" / "munge.socket"
        self.conf.write_text(f"""\
ClusterName=studytest
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job waits cred_expire seconds before it may start again (default 120): short for the tests
AuthInfo=socket={self.munge_socket},cred_expire=5
# and the backfill scheduler looks every 2 s for jobs whose begin time has come (default: every 30 s)
SchedulerParameters=bf_interval=2
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobRequeue=1
KillWait=1
MinJobAge=600
InactiveLimit=0
NodeName={self.host} CPUs={self.cpus} RealMemory={_node_memory_mb()} State=UNKNOWN
PartitionName=cpu Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def start(self, timeout: float = 60) -> Cluster:
        _ensure_packages()
        self._write_conf()
        r = self.root
        logs = r / "log"
        munged = subprocess.Popen(
            [
                _sbin("munged"),
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={r / 'munge' / 'munge.key'}",
                f"--pid-file={r / 'munge' / 'munged.pid'}",
                f"--log-file={logs / 'munged.log'}",
                f"--seed-file={r / 'munge' / 'munged.seed'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(logs / "munged.err").open("w"),
        )
        self.procs.append(munged)
        self._wait(lambda: self.munge_socket.exists(), 15, "munged did not create its socket")
        for daemon in ("slurmctld", "slurmd"):
            # -D: foreground, so that we own the process and stop it by its pid
            p = subprocess.Popen(
                [_sbin(daemon), "-D", "-f", str(self.conf)],
                env=self.env,
                stdout=(logs / f"{daemon}.out").open("w"),
                stderr=subprocess.STDOUT,
            )
            self.procs.append(p)
            if daemon == "slurmctld":
                self._wait(
                    lambda: self._ok(["scontrol", "ping"]) and "UP" in self._out(["scontrol", "ping"]),
                    timeout,
                    "slurmctld does not answer `scontrol ping`",
                )
        self._wait(
            lambda: self._out(["sinfo", "-h", "-o", "%t"]).strip() in ("idle", "mix", "alloc"),
            timeout,
            "the node never became idle",
        )
        return self

    def _ok(self, cmd) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def _out(self, cmd) -> str:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True).stdout

    def _wait(self, cond, timeout: float, what: str) -> None:
        t = time.time()
        while time.time() - t < timeout:
            if any(p.poll() is not None for p in self.procs):
                break
            if cond():
                return
            time.sleep(0.5)
        dead = [f"{p.args[0]} exited {p.returncode}" for p in self.procs if p.poll() is not None]
        self.stop()
        raise ClusterUnavailable(f"{what} ({'; '.join(dead) or 'timeout'}).\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace")[-1500:]
            out.append(f"--- {f.name}\n{text}")
        return "\n".join(out)

    def stop(self) -> None:
        # jobs first (their processes are children of slurmd's slurmstepd), then the daemons in reverse
        if self.procs and self.procs[-1].poll() is None:
            subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()


if __name__ == "__main__":
    import tempfile

    c = Cluster(Path(tempfile.mkdtemp(prefix="slurm-"))).start()
    print(f"export SLURM_CONF={c.conf}")
    try:
        signal.pause()
    finally:
        c.stop()
