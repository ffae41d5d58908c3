"""Real peers for the user directories: private OpenLDAP slapd, Dovecot auth, PostgreSQL.

``Slapd`` is OpenLDAP's server from Debian with its own slapd.conf-style configuration,
an mdb database seeded by ``slapadd`` and, optionally, a self-signed certificate for
StartTLS, all under a fresh temporary directory, listening only on 127.0.0.1:``port``.
``DovecotAuthServer`` is a Dovecot that runs only its ``auth`` service (no protocols),
with a passwd-file passdb and two client listeners: a unix socket in its directory and
127.0.0.1:``port``. ``PostgresServer`` is a PostgreSQL cluster made by ``initdb`` in its
directory, listening on a unix socket there and on 127.0.0.1:``port``. Each waits for
its listener with a deadline and shows the tail of its log when it fails; each class
docstring lists what was learnt making it work.
(:mod:`peers` has the mail peers; the classes here build on its :class:`~peers.PrivateDaemon`
and :class:`~peers.DovecotDaemon`.)
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import psycopg
from psycopg.conninfo import make_conninfo

from harness import TIMEOUT, free_port, which_peer
from peers import DovecotDaemon, PrivateDaemon, listening, stop_process, tail, unix_listening

SCHEMAS = ("core", "cosine", "nis", "inetorgperson")


@dataclass(frozen=True)
class LdapUser:
    """An inetOrgPerson ``uid=<uid>,ou=<ou>,<suffix>`` with ``password`` (stored as
    ``{SSHA}``; None: no userPassword at all) and ``mail`` values."""

    password: str | None
    mail: tuple[str, ...] = ()
    ou: str = "people"


def ssha(password: str) -> str:
    """An OpenLDAP ``{SSHA}`` userPassword value (SHA-1 of password + salt, salted)."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


@dataclass
class Slapd(PrivateDaemon):
    """A private slapd: ``with Slapd({"alice": LdapUser("pw", ("alice@x.test",))}) as ldap``.

    The tree is ``suffix`` (``dc=example,dc=test``) with ``ou=people`` and ``ou=staff``;
    :attr:`admin_dn` is the rootdn (password :attr:`admin_password`), :attr:`reader_dn` a
    service account that may search and read ``mail``. ACLs: userPassword is usable
    for binds only (``by anonymous auth``); anonymous clients see nothing unless
    ``anonymous_search``. ``tls``: StartTLS with a self-signed certificate for 127.0.0.1
    (:attr:`ca_path` is what clients must trust).

    What was found to work here (OpenLDAP 2.5.13, Debian 12, as root):

    - ``slapd -f slapd.conf`` still reads the old-style config file (no cn=config
      needed); ``slaptest -u`` checks it, ``slapadd -f`` loads the seed LDIF into the
      mdb directory before slapd starts (no rootdn bind needed to fill it).
    - ``-d 0`` keeps slapd in the foreground (a child the fixture can SIGTERM) without
      debug output; ``-h ldap://127.0.0.1:PORT/`` is the only listener (no ldapi://).
      ``pidfile`` and ``argsfile`` must be set, or it writes them under /var/run/slapd.
    - ``moduleload back_mdb`` with ``modulepath /usr/lib/ldap``: Debian builds the
      backends as modules; ``maxsize`` keeps the mdb map small (10 MiB).
    - With anonymous search denied, a search for an entry answers 32 noSuchObject, not
      an empty result: the base itself is invisible.
    - Debian's slapd uses GnuTLS: ``TLSCertificateFile``/``TLSCertificateKeyFile`` take
      PEM files made by ``openssl req -x509``; a self-signed certificate with
      ``subjectAltName=IP:127.0.0.1`` is its own CA for the client.
    """

    users: dict[str, LdapUser] = field(default_factory=dict)
    suffix: str = "dc=example,dc=test"
    extra_ldif: str = ""
    anonymous_search: bool = False
    tls: bool = False
    port: int = 0
    admin_password: str = "admin-secret"
    reader_password: str = "reader-secret"

    label: ClassVar[str] = "slapd"

    def __post_init__(self) -> None:
        which_peer("slapd")
        which_peer("slapadd")
        self.root = Path(tempfile.mkdtemp(prefix="tayori-slapd-"))

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def admin_dn(self) -> str:
        return f"cn=admin,{self.suffix}"

    @property
    def reader_dn(self) -> str:
        return f"cn=reader,{self.suffix}"

    @property
    def ca_path(self) -> Path:
        return self.root / "cert.pem"

    @property
    def config_path(self) -> Path:
        return self.root / "slapd.conf"

    def dn(self, uid: str, ou: str = "people") -> str:
        return f"uid={uid},ou={ou},{self.suffix}"

    def config_text(self) -> str:
        root = self.root
        anonymous = "by anonymous read " if self.anonymous_search else ""
        lines = [*(f"include /etc/ldap/schema/{name}.schema" for name in SCHEMAS),
                 "modulepath /usr/lib/ldap", "moduleload back_mdb",
                 f"pidfile {root}/slapd.pid", f"argsfile {root}/slapd.args"]
        if self.tls:
            lines += [f"TLSCACertificateFile {self.ca_path}",
                      f"TLSCertificateFile {self.ca_path}",
                      f"TLSCertificateKeyFile {root}/key.pem"]
        return "\n".join([
            *lines,
            "database mdb", "maxsize 10485760", f'suffix "{self.suffix}"',
            f'rootdn "{self.admin_dn}"', f"rootpw {self.admin_password}",
            f"directory {root}/db",
            "access to attrs=userPassword by anonymous auth by * none",
            f'access to * by dn.exact="{self.reader_dn}" read by self read {anonymous}'
            "by * none",
            "",
        ])

    def seed_ldif(self) -> str:
        domain = self.suffix.split(",")[0].split("=")[1]
        entries = [
            f"dn: {self.suffix}\nobjectClass: dcObject\nobjectClass: organization\n"
            f"dc: {domain}\no: {domain}\n",
            f"dn: ou=people,{self.suffix}\nobjectClass: organizationalUnit\nou: people\n",
            f"dn: ou=staff,{self.suffix}\nobjectClass: organizationalUnit\nou: staff\n",
            f"dn: {self.reader_dn}\nobjectClass: organizationalRole\n"
            f"objectClass: simpleSecurityObject\ncn: reader\n"
            f"userPassword: {ssha(self.reader_password)}\n",
        ]
        for uid, user in self.users.items():
            lines = [f"dn: {self.dn(uid, user.ou)}", "objectClass: inetOrgPerson",
                     f"uid: {uid}", f"cn: {uid}", f"sn: {uid}",
                     *(f"mail: {address}" for address in user.mail)]
            if user.password is not None:
                lines.append(f"userPassword: {ssha(user.password)}")
            entries.append("\n".join(lines) + "\n")
        return "\n".join(entries) + ("\n" + self.extra_ldif if self.extra_ldif else "")

    def configure(self) -> None:
        (self.root / "db").mkdir(exist_ok=True)
        if not self.port:
            self.port = free_port()
        if self.tls:
            self._make_certificate()
        self.config_path.write_text(self.config_text())
        (self.root / "seed.ldif").write_text(self.seed_ldif())
        self._run("slaptest", "-u", "-f", str(self.config_path))
        self._run("slapadd", "-f", str(self.config_path), "-l", str(self.root / "seed.ldif"))

    def _make_certificate(self) -> None:
        self._run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                  "-keyout", str(self.root / "key.pem"), "-out", str(self.ca_path),
                  "-days", "2", "-subj", "/CN=127.0.0.1",
                  "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost")

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run([which_peer(program), *args], capture_output=True,
                                text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise AssertionError(f"{program} {' '.join(args)} exited {result.returncode}: "
                                 f"{result.stdout}{result.stderr}")

    def start(self) -> Self:
        self.configure()
        self.spawn([which_peer("slapd"), "-d", "0", "-h", f"ldap://127.0.0.1:{self.port}/",
                    "-f", str(self.config_path)], what=f"slapd to listen on {self.port}")
        return self

    def ready(self) -> bool:
        return listening("127.0.0.1", self.port)


@dataclass
class DovecotAuthServer(DovecotDaemon):
    """A private Dovecot running only its auth service:
    ``with DovecotAuthServer({"u@x.test": "{SHA512-CRYPT}$6$..."}) as dovecot``.

    ``users`` maps each login to its stored password (any scheme Dovecot knows, with
    its ``{SCHEME}`` prefix) in a passwd-file passdb. Clients connect to the unix socket
    :attr:`socket_path` or to 127.0.0.1:``port`` (0: a free one). ``tempfail``: the
    passdb is a checkpassword script that exits 111, so every login is a temporary
    failure. ``settings`` are extra top-level dovecot.conf lines.

    What was found to work here (Dovecot 2.3.19, Debian 12, as root):

    - ``protocols =`` (empty) starts Dovecot with its auth service only ("starting up
      without any protocols"); nothing else listens.
    - ``service auth { unix_listener PATH }`` with an absolute path puts the socket
      there. Both listeners here (that socket, named ``auth-client``, and an
      ``inet_listener`` named ``auth-inet``) speak the auth-client protocol.
    - Without ``no-penalty`` in the AUTH request and without ``rip=``, Dovecot counts
      the failures of every client together (anvil's auth penalty) and starts delaying
      all later requests, also good ones, by seconds: tayori's client sends it.
    - Failed logins still take about 0.5 s with ``auth_failure_delay = 0``.
    - A missing passwd-file is an unknown user (FAIL without ``temp``), not a temporary
      failure; a checkpassword passdb whose script exits 111 gives
      ``FAIL <id> user=... code=temp_fail``.
    - A userdb is required even for password checks only; a ``static`` one will do.
    - The master takes about a second to exit after SIGTERM; a new instance in the same
      directory before that refuses to start ("already running").
    """

    users: dict[str, str] = field(default_factory=dict)
    port: int = 0
    tempfail: bool = False

    def __post_init__(self) -> None:
        which_peer("dovecot")
        if not Path("/usr/lib/dovecot/auth").exists():
            import pytest

            pytest.skip("dovecot's auth service (/usr/lib/dovecot/auth) is not installed")
        self.root = Path(tempfile.mkdtemp(prefix="tayori-dovecot-auth-"))

    @property
    def socket_path(self) -> Path:
        return self.root / "auth-client"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def passdb(self) -> str:
        if self.tempfail:
            return f"passdb {{\n  driver = checkpassword\n  args = {self.root}/tempfail\n}}\n"
        return f"passdb {{\n  driver = passwd-file\n  args = {self.root}/users\n}}\n"

    def config_text(self) -> str:
        root = self.root
        settings = self.config_lines({"protocols": "", "auth_mechanisms": "plain login",
                                      "auth_failure_delay": "0"})
        return settings + "\n" + self.passdb() + f"""userdb {{
  driver = static
  args = uid=mail gid=mail home={root}/home/%u
}}
service auth {{
  unix_listener {self.socket_path} {{
    mode = 0666
  }}
  inet_listener auth-inet {{
    address = 127.0.0.1
    port = {self.port}
  }}
}}
"""

    def configure(self) -> None:
        self.root.chmod(0o755)
        if not self.port:
            self.port = free_port()
        users = "".join(f"{login}:{stored}\n" for login, stored in self.users.items())
        (self.root / "users").write_text(users)
        (self.root / "tempfail").write_text("#!/bin/sh\nexit 111\n")
        (self.root / "tempfail").chmod(0o755)
        self.config_path.write_text(self.config_text())

    def start(self) -> Self:
        self.configure()
        self.run("dovecot auth to listen")
        return self

    def ready(self) -> bool:
        return unix_listening(self.socket_path) and listening("127.0.0.1", self.port)


def postgres_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/VERSION/bin`` with ``postgres`` and ``initdb``
    (Debian keeps them off PATH), or skip the test."""
    found = [path.parent for path in Path("/usr/lib/postgresql").glob("*/bin/postgres")
             if (path.parent / "initdb").exists() and path.parent.parent.name.isdigit()]
    if not found:
        import pytest

        pytest.skip("PostgreSQL's server is not installed (no /usr/lib/postgresql/*/bin/"
                    "postgres and initdb; scripts/install-peers installs postgresql)")
    return max(found, key=lambda path: int(path.parent.name))


@dataclass
class PostgresServer(PrivateDaemon):
    """A private PostgreSQL cluster: ``with PostgresServer() as pg: pg.execute("...")``.

    ``initdb`` makes the cluster in ``<root>/data``; the server listens on a unix socket
    in :attr:`root` (``.s.PGSQL.<port>``) and on 127.0.0.1:``port`` (0: a free one). The
    superuser is ``postgres``, trusted over the unix socket only; TCP logins need a
    password (scram-sha-256). :meth:`execute` runs SQL as the superuser;
    :meth:`conninfo` is a connection string for a client. :meth:`halt` stops the server
    and keeps the cluster (:meth:`start` runs it again, same port); :meth:`stop` also
    removes the directory unless ``keep``. ``settings`` are extra ``-c`` options.

    What was found to work here (PostgreSQL 15.18, Debian 12, as root):

    - postgres refuses to run as root: as root, initdb and the server run as the
      ``postgres`` user that Debian's package creates (``nobody`` without it), owner of
      the temporary directory (mkdtemp makes it 0700; the root client still reaches the
      socket in it). ``Popen(user=, group=, extra_groups=[])`` drops root's groups too.
    - The binaries are in ``/usr/lib/postgresql/15/bin``, not on PATH; Debian's
      ``pg_ctlcluster`` wrappers are only for the system clusters (never used here).
    - ``initdb --no-sync -E UTF8 --locale=C`` takes about 0.5 s; ``fsync=off`` and
      friends make the server's own writes cheap. ``-k DIR`` puts the socket in DIR,
      ``-h 127.0.0.1`` is the only TCP listener.
    - Readiness without a client: line 8 of ``data/postmaster.pid`` reads ``ready``
      once it accepts connections (what ``pg_ctl -w`` polls).
    - SIGTERM is a "smart" shutdown that waits for every client to leave (a pooled
      connection keeps it up forever): :meth:`halt` sends SIGINT, the "fast" shutdown,
      which ends the sessions; clients then get ``AdminShutdown``.
    """

    port: int = 0
    settings: dict[str, str] = field(default_factory=dict)
    superuser: str = "postgres"
    bindir: Path = field(init=False)

    label: ClassVar[str] = "postgres"

    def __post_init__(self) -> None:
        self.bindir = postgres_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="tayori-pg-"))
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                account = pwd.getpwnam("nobody")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as: dict[str, Any] = {"user": account.pw_uid, "group": account.pw_gid,
                                        "extra_groups": []}
        else:
            self._as = {}

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def conninfo(self, user: str = "", password: str = "", dbname: str = "postgres",
                 over: str = "unix", **extra: Any) -> str:
        """A libpq connection string to this server: over ``"unix"`` (its socket) or
        ``"tcp"`` (127.0.0.1:port)."""
        host = str(self.root) if over == "unix" else "127.0.0.1"
        params = {"host": host, "port": self.port, "dbname": dbname,
                  "user": user or self.superuser, **extra}
        if password:
            params["password"] = password
        return make_conninfo(**params)

    def execute(self, sql: str, params: Any = None, dbname: str = "postgres",
                many: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run ``sql`` as the superuser (``many``: once per parameter set); its rows."""
        with psycopg.connect(self.conninfo(dbname=dbname), autocommit=True,
                             connect_timeout=5) as connection, connection.cursor() as cursor:
            if many is not None:
                cursor.executemany(sql, many)
                return []
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def initdb(self) -> None:
        result = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.superuser,
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            cwd=self.root, capture_output=True, text=True, timeout=60, check=False,
            **self._as)
        if result.returncode != 0:
            raise AssertionError(f"initdb exited {result.returncode}: "
                                 f"{result.stdout}{result.stderr}")

    def start(self) -> Self:
        """initdb (the first time), then the server; returns when it accepts clients."""
        if not (self.data / "PG_VERSION").exists():
            self.initdb()
        if not self.port:
            self.port = free_port()
        settings = {"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off",
                    "max_connections": "40", "logging_collector": "off", **self.settings}
        options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        self.spawn([str(self.bindir / "postgres"), "-D", str(self.data), "-k", str(self.root),
                    "-h", "127.0.0.1", "-p", str(self.port), *options],
                   what=f"postgres to accept connections on {self.port}",
                   output=self.log_path, cwd=self.root, **self._as)
        return self

    def ready(self) -> bool:
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (len(lines) > 7 and lines[7].strip() == "ready"
                and listening("127.0.0.1", self.port))

    def log(self) -> str:
        return tail(self.log_path)

    def halt(self) -> None:
        """Stop the server (SIGINT: fast shutdown, clients are cut off); the cluster
        stays for :meth:`start`."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_process(self.process)
        self.process = None


def doveadm_pw(scheme: str, password: str) -> str:
    """A hash made by Dovecot's own ``doveadm pw -s SCHEME`` (with its prefix)."""
    result = subprocess.run([which_peer("doveadm"), "pw", "-s", scheme, "-p", password],
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()
