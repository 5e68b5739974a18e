"""A real single-node Slurm on localhost for tests: munged, slurmctld and slurmd started in the
foreground from a temporary folder (config, state, spool, pid, log and socket files all there),
on free ports, so that nothing outside that folder is used and several can run side by side.

:func:`slurm_cluster` is a context manager that yields a :class:`SlurmCluster` once ``sinfo``
shows the node idle, and stops only the daemons it started, by PID, however the block ends.
The client commands (sbatch, squeue, scontrol, scancel) reach it through ``SLURM_CONF``, which
:attr:`SlurmCluster.env` sets.

Needs Debian's ``slurm-wlm`` and ``munge`` (``apt-get install slurm-wlm munge``) and root (the
daemons run as root, ``SlurmUser=root``); :func:`missing` says what is lacking.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol",
            "scancel", "sinfo", "srun")
START_TIMEOUT_S = 60


def _which(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/sbin")
                                       if (p := Path(d) / name).exists()), None)


def missing() -> str | None:
    """Why a cluster cannot be started here (None: it can)."""
    absent = [b for b in BINARIES if _which(b) is None]
    if absent:
        return (f"{', '.join(absent)} not found: apt-get install slurm-wlm munge "
                "(.ci/run does this)")
    if os.geteuid() != 0:
        return "the test Slurm cluster runs its daemons as root (SlurmUser=root)"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _conf(d: Path, host: str, ports: list[int]) -> str:
    cpus = os.cpu_count() or 1
    return f"""\
ClusterName=kdbenchtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={d}/munge.socket,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


@dataclass
class SlurmCluster:
    dir: Path
    node: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """This process's environment with SLURM_CONF naming this cluster's configuration."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def cmd(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """A Slurm client command against this cluster; its stdout."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld still knows (finished ones too, for MinJobAge), as
        ``scontrol show job -o``'s KEY=VALUE fields."""
        out = self.cmd("scontrol", "show", "job", "-o", check=False)
        jobs = []
        for line in out.splitlines():
            if "JobId=" not in line:
                continue
            fields = {}
            for token in line.split():
                key, sep, value = token.partition("=")
                if sep:
                    fields[key] = value
            jobs.append(fields)
        return jobs

    def logs(self) -> str:
        """The tails of the daemons' logs (for a failing test's message)."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the daemons this cluster started (by their PIDs; slurmd first), waiting for each."""
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _start(cluster: SlurmCluster, name: str, args: list[str]) -> None:
    out = open(cluster.dir / f"{name}.out", "ab")
    cluster.procs[name] = subprocess.Popen([_which(args[0]), *args[1:]], stdin=subprocess.DEVNULL,
                                           stdout=out, stderr=subprocess.STDOUT, env=cluster.env,
                                           start_new_session=True)
    out.close()


def _wait(cluster: SlurmCluster, what: str, ready) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} while waiting for "
                                   f"{what}:\n{(cluster.dir / (name + '.out')).read_text(errors='replace')}"
                                   f"\n{cluster.logs()}")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}\n{cluster.logs()}")


@contextlib.contextmanager
def slurm_cluster(base: Path | None = None):
    """Start munged, slurmctld and slurmd in a new folder under ``base`` (default: the system's
    temporary folder); yield the cluster once its node is idle; stop them whatever happens."""
    why = missing()
    if why:
        raise RuntimeError(why)
    d = Path(tempfile.mkdtemp(prefix="slurm-", dir=base))
    d.chmod(0o700)  # munged refuses a key or socket in a folder others can write to
    for sub in ("state", "spool"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    (d / "slurm.conf").write_text(_conf(d, host, _free_ports(2)))
    cluster = SlurmCluster(d, host)
    try:
        subprocess.run([_which("mungekey"), "--create", "--keyfile", str(d / "munge.key")],
                       check=True, capture_output=True)
        _start(cluster, "munged", ["munged", "--foreground", "--force", f"--socket={d}/munge.socket",
                                   f"--key-file={d}/munge.key", f"--pid-file={d}/munged.pid",
                                   f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"])
        _wait(cluster, "munged's socket", lambda: (d / "munge.socket").exists())
        _start(cluster, "slurmctld", ["slurmctld", "-D", "-f", str(cluster.conf)])
        _wait(cluster, "slurmctld", lambda: cluster.cmd("sinfo", "-h", check=False) != "")
        _start(cluster, "slurmd", ["slurmd", "-D", "-f", str(cluster.conf), "-N", host])
        _wait(cluster, "the node to be idle",
              lambda: cluster.cmd("sinfo", "-h", "-N", "-o", "%T", check=False).strip() == "idle")
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(d, ignore_errors=True)
