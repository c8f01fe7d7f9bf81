"""A facility's Tango database, private to a test: MariaDB and Debian's ``DataBaseds`` (package
``tango-db``), and Debian's ``Starter`` (package ``tango-starter``).

The embedded database (pytango's Python DataBaseds on SQLite) is what the demo and most tests use;
this is what a beamline runs, so that the deployment files in ``deploy/`` are tried against it:

* :class:`FacilityTangoDatabase`: a MariaDB server with its own data folder, unix socket and free
  TCP port on 127.0.0.1 (``mariadb-install-db``, ``mariadbd``), the Tango schema loaded from the
  SQL script Debian's ``tango-db`` runs at installation (through dbconfig-common), a ``tango`` SQL
  user, and ``DataBaseds 2`` on a free port of 127.0.0.1 reaching MariaDB through the ``MYSQL_*``
  environment variables it reads;
* :class:`TangoStarter`: ``Starter <instance>`` against that database, its CORBA end point on
  127.0.0.1 for itself and, inherited through the environment, for every server it starts.

Everything lives in a temporary folder that :meth:`FacilityTangoDatabase.stop` removes.
:func:`missing_debian_parts` says what is not installed, for a test's skip reason. Like the rest of
this package, nothing here imports the product.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import tango

#: Debian's paths (bookworm: tango-db / tango-starter 9.3.4, mariadb 10.11).
DATABASEDS = Path("/usr/lib/tango/DataBaseds")
STARTER = Path("/usr/lib/tango/Starter")
#: What dbconfig-common runs for tango-db at installation: the tables, the stored procedures and
#: the database's own devices (sys/database/2, ...), by absolute paths to /usr/share/tango-db.
TANGO_SCHEMA = Path("/usr/share/dbconfig-common/data/tango-db/install/mysql")
MARIADB_PROGRAMS = ("mariadbd", "mariadb-install-db", "mariadb")
#: Where each missing part comes from, for the skip reason.
_PACKAGE_OF = {"mariadbd": "mariadb-server-core", "mariadb-install-db": "mariadb-server-core",
               "mariadb": "mariadb-client", str(DATABASEDS): "tango-db", str(TANGO_SCHEMA): "tango-db",
               str(STARTER): "tango-starter"}
_SBIN = "/usr/sbin:/sbin"
_DATABASEDS_READY = re.compile(r"Ready to accept request")
_SQL_USER = "tango"
_SQL_DATABASE = "tango"


class StartupError(RuntimeError):
    """A process did not come up; the message carries the end of its log."""


def _which(program: str) -> str | None:
    """``program`` on PATH or in /usr/sbin (where Debian puts mariadbd, not on a user's PATH)."""
    return shutil.which(program) or shutil.which(program, path=_SBIN)


def missing_debian_parts(starter: bool = True) -> list[str]:
    """``'path-or-program (package)'`` for each piece of the facility set-up that is not installed."""
    missing = [program for program in MARIADB_PROGRAMS if _which(program) is None]
    files = [DATABASEDS, TANGO_SCHEMA] + ([STARTER] if starter else [])
    missing += [str(path) for path in files if not path.exists()]
    return [f"{part} ({_PACKAGE_OF[part]})" for part in missing]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (programs that need the number before they start)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log: {path} was not written)"
    return text[-chars:]


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
    """Ask ``proc`` to end with ``sig``; kill it if it is still there after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_until(ready: Callable[[], bool], proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    """Poll ``ready()`` until true; StartupError with ``log``'s tail when ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise StartupError(f"{what} exited with code {proc.returncode}:\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise StartupError(f"{what} not ready after {timeout:.0f} s:\n{_log_tail(log)}")
        time.sleep(0.1)


class FacilityTangoDatabase:
    """MariaDB + Debian's DataBaseds on 127.0.0.1, free ports, in a temporary folder.

    ``with FacilityTangoDatabase() as db:`` starts both; ``db.tango_host`` is the TANGO_HOST of
    the clients and servers of the test. The SQL user ``tango`` owns the ``tango`` schema, with a
    password made up for this run (:attr:`sql_password`); root connects through the unix socket.
    """

    def __init__(self, host: str = "127.0.0.1", workdir: Path | None = None) -> None:
        self.host = host
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="tango-facility-db-")) if workdir is None else Path(workdir)
        self.sql_port: int | None = None
        self.port: int | None = None  # DataBaseds
        self.sql_password = secrets.token_hex(12)
        self._mariadb: subprocess.Popen | None = None
        self._databaseds: subprocess.Popen | None = None

    # -- addresses ---------------------------------------------------------------------------

    @property
    def tango_host(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "mysqld.sock"

    @property
    def databaseds_log(self) -> Path:
        return self.workdir / "databaseds.log"

    @property
    def mariadb_log(self) -> Path:
        return self.workdir / "mariadb.err"

    def database(self) -> tango.Database:
        """A client of this database (whatever TANGO_HOST this process has)."""
        return tango.Database(self.host, self.port)

    def environment(self, **extra: str) -> dict[str, str]:
        """This process's environment with TANGO_HOST pointing here: for clients and servers started
        as subprocesses."""
        return dict(os.environ, TANGO_HOST=self.tango_host, **extra)

    # -- start and stop ----------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> FacilityTangoDatabase:
        missing = missing_debian_parts(starter=False)
        if missing:
            raise StartupError(f"not installed: {', '.join(missing)}")
        try:
            self._start_mariadb(timeout)
            self._load_tango_schema()
            self._start_databaseds(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_mariadb(self, timeout: float) -> None:
        datadir = self.workdir / "mysql-data"
        install_log = self.workdir / "mariadb-install-db.log"
        # --no-defaults: nothing from /etc/mysql (the system's socket, port or data folder);
        # --user=root: this runs as root in CI, and mariadbd refuses root unless told so.
        with open(install_log, "wb") as log:
            done = subprocess.run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={datadir}",
                                   "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db",
                                   "--innodb-log-file-size=8M"], stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout, check=False)
        if done.returncode != 0:
            raise StartupError(f"mariadb-install-db failed with code {done.returncode}:\n{_log_tail(install_log)}")
        self.sql_port = free_port(self.host)
        command = [_which("mariadbd"), "--no-defaults", f"--datadir={datadir}", f"--socket={self.socket_path}",
                   f"--port={self.sql_port}", f"--bind-address={self.host}", "--user=root", "--skip-name-resolve",
                   f"--pid-file={self.workdir / 'mysqld.pid'}", f"--log-error={self.mariadb_log}",
                   "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M"]
        self._mariadb = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            return self.sql("SELECT 1", check=False).returncode == 0

        _wait_until(answers, self._mariadb, self.mariadb_log, "mariadbd", timeout)

    def sql(self, statements: str, database: str = "", check: bool = True,
            stdin: Path | None = None) -> subprocess.CompletedProcess:
        """Run SQL as MariaDB's root through the unix socket (tab-separated output, no headers)."""
        command = [_which("mariadb"), "--no-defaults", f"--socket={self.socket_path}", "--user=root", "--batch",
                   "--skip-column-names"]
        if statements:
            command += ["--execute", statements]
        if database:
            command.append(database)
        if stdin is None:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        else:
            with open(stdin, "rb") as script:
                done = subprocess.run(command, stdin=script, capture_output=True, text=True, timeout=120,
                                      check=False)
        if check and done.returncode != 0:
            raise StartupError(f"SQL failed ({' '.join(command[4:])}):\n{done.stderr}")
        return done

    def _load_tango_schema(self) -> None:
        # The SQL user DataBaseds connects as, from 127.0.0.1 (TCP: DataBaseds cannot be given a socket).
        self.sql(f"CREATE DATABASE {_SQL_DATABASE};"
                 f"CREATE USER '{_SQL_USER}'@'{self.host}' IDENTIFIED BY '{self.sql_password}';"
                 f"GRANT ALL PRIVILEGES ON {_SQL_DATABASE}.* TO '{_SQL_USER}'@'{self.host}';")
        self.sql("", database=_SQL_DATABASE, stdin=TANGO_SCHEMA)

    def _start_databaseds(self, timeout: float) -> None:
        self.port = free_port(self.host)
        # What DataBaseds reads (TangoDatabase's create_connection_pool): MYSQL_HOST as host:port,
        # MYSQL_USER, MYSQL_PASSWORD, MYSQL_DATABASE; it also reads the [client] group of the MySQL
        # option files, so HOME is the work folder (no ~/.my.cnf of whoever runs the tests).
        env = self.environment(MYSQL_HOST=f"{self.host}:{self.sql_port}", MYSQL_USER=_SQL_USER,
                               MYSQL_PASSWORD=self.sql_password, MYSQL_DATABASE=_SQL_DATABASE,
                               HOME=str(self.workdir))
        with open(self.databaseds_log, "wb") as log:
            self._databaseds = subprocess.Popen(
                [str(DATABASEDS), "2", "-ORBendPoint", f"giop:tcp:{self.host}:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir)

        def ready() -> bool:
            if not _DATABASEDS_READY.search(self.databaseds_log.read_text(errors="replace")):
                return False
            try:
                self.database().get_info()
                return True
            except tango.DevFailed:
                return False

        _wait_until(ready, self._databaseds, self.databaseds_log, "DataBaseds", timeout)

    def stop(self) -> None:
        """DataBaseds, then MariaDB (a clean shutdown), then the folder (if this object made it)."""
        _stop(self._databaseds)
        self._databaseds = None
        _stop(self._mariadb, timeout=60.0)
        self._mariadb = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> FacilityTangoDatabase:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def short_host_name() -> str:
    """The name Debian's Starter must be registered under on this machine: ``tango/admin/<this>``.

    Its check_host() compares the device's member with the host name, lower-cased, up to the first
    dot; the init script of tango-starter registers ``Starter/`hostname```, the same name."""
    return socket.gethostname().lower().split(".")[0]


class TangoStarter:
    """Debian's ``Starter <instance>`` (device ``tango/admin/<instance>``, registered beforehand)
    against ``database``; what it prints goes to :attr:`log_path` (the servers' own logs go where
    its LogFileHome property says, /var/tmp/ds.log by default).

    ``endpoint_host``: the address of the CORBA end point, passed as omniORB's ``ORBendPoint``
    environment variable so that the servers the Starter starts (which inherit its environment)
    listen there too. ``debug``: the Starter's own DEBUG mode (``DEBUG=true``), where
    AutoRestartDuration counts seconds instead of minutes (and check_host() is skipped).
    """

    def __init__(self, database: FacilityTangoDatabase, instance: str, endpoint_host: str = "127.0.0.1",
                 debug: bool = False) -> None:
        self.database = database
        self.instance = instance
        self.endpoint_host = endpoint_host
        self.debug = debug
        self.log_path = database.workdir / f"starter-{instance}.out"
        self._proc: subprocess.Popen | None = None

    @property
    def device_name(self) -> str:
        return f"tango/admin/{self.instance}"

    def proxy(self) -> tango.DeviceProxy:
        return tango.DeviceProxy(f"tango://{self.database.tango_host}/{self.device_name}")

    def start(self, timeout: float = 60.0) -> TangoStarter:
        if not STARTER.exists():
            raise StartupError(f"not installed: {STARTER} (tango-starter)")
        extra = {"ORBendPoint": f"giop:tcp:{self.endpoint_host}:"}
        if self.debug:
            extra["DEBUG"] = "true"
        env = self.database.environment(**extra)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen([str(STARTER), self.instance], stdout=log, stderr=subprocess.STDOUT,
                                          env=env, cwd=self.database.workdir)

        def answers() -> bool:
            try:
                self.proxy().ping()
                return True
            except tango.DevFailed:
                return False

        try:
            _wait_until(answers, self._proc, self.log_path, f"Starter {self.instance}", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        return _log_tail(self.log_path)

    def stop(self) -> None:
        """The Starter only: the servers it started run on (as they do when a Starter restarts);
        stop them with :func:`stop_exported_server`."""
        _stop(self._proc)
        self._proc = None

    def __enter__(self) -> TangoStarter:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def exported_server_pid(database: tango.Database, server: str) -> int | None:
    """The process id the server ``Name/instance`` gave the database when it last started
    (``dserver/Name/instance``'s export information); None if it never did."""
    info = database.get_device_info(f"dserver/{server}")
    return info.pid if info.pid > 0 else None


def stop_exported_server(database: tango.Database, server: str, timeout: float = 20.0) -> None:
    """End a server started by someone else (a Starter, which detaches its children) as the Starter's
    DevStop does: the Kill command of its admin device; then, by the pid it exported and only if
    that pid still runs that server, SIGKILL for it and its children if they are still there.

    Not SIGTERM: a server started by Debian's Starter inherits a signal mask that blocks it."""
    pid = exported_server_pid(database, server)
    if pid is None:
        return
    name, instance = server.split("/", 1)
    try:
        process = psutil.Process(pid)
        command = process.cmdline()
        children = process.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    if not any(Path(arg).name == name for arg in command) or instance not in command:
        return  # the pid has been reused by another program
    try:
        tango.DeviceProxy(f"tango://{database.get_db_host()}:{database.get_db_port()}/dserver/{server}"
                          ).command_inout("Kill")
    except tango.DevFailed:
        pass  # not answering: the SIGKILL below
    _, alive = psutil.wait_procs([process, *children], timeout=timeout)
    for leftover in alive:
        try:
            leftover.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)
