"""What a local Flower deployment is made of (:mod:`fedmeta.simulations.deploy` runs one): the flwr-version switch
(:func:`transport_for`), TLS certificates, the command lines of SuperLink, SuperNode, SuperExec and ``flwr run``,
their environment, and the processes started from them."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from fedmeta import config as C

if TYPE_CHECKING:
    from fedmeta.simulations.deploy import LocalDeployment


PROJECT_DIR = Path(__file__).resolve().parents[1]
"""The Flower app project (``pyproject.toml`` with ``[tool.flwr.app]``) that :meth:`LocalDeployment.run` submits."""
HOST = "127.0.0.1"
"""Every process binds to and connects over the loopback interface only."""
CONNECTION = "fedmeta-local"
"""Name of the SuperLink connection written to the CLI's ``$FLWR_HOME/config.toml``."""
MEMORY_DIR = C.MEMORY_DIR
"""Node-config key of the directory where a client keeps its personalized model on disk."""
DATA_ENV = "FEDMETA_DATA"
"""A SuperNode's data directory travels in this environment variable, which its ClientApp
processes inherit (``fedmeta.data`` reads it when the run config leaves ``data-dir`` empty)."""
NODE_READY = "SuperNode ID:"
"""Log line with which a SuperNode (1.39 and 1.41) reports that the SuperLink registered it."""
NODE_FAILED = "Failed to initialize the connection to the SuperLink"
"""Log line with which a SuperNode gives up connecting (after ``--max-wait-time``)."""
ISOLATIONS = ("subprocess", "process")
"""SuperNode ``--isolation`` modes: ``subprocess`` (the SuperNode starts its own ``flower-superexec``) or
``process`` (a ``flower-superexec`` run as a process of its own, started and stopped beside the SuperNode).
Either way Flower runs every message in a fresh ``flwr-clientapp`` process (docs/deployment.md, "Where a
deployed round's time goes")."""
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
"""Seconds between a ``flower-superexec``'s polls of its SuperNode for a new message (Flower's default: 1 s)."""
TASK_POLL_INTERVAL = 0.05
"""The launcher's poll interval (:data:`TASK_POLL_ENV`): a message waits 25 ms on average for its ClientApp
process instead of 500 ms, for 20 local HTTP requests per second per idle SuperNode."""


class DeploymentError(RuntimeError):
    """A process did not start, a run failed, or processes did not stop."""


# --- the flwr-version switch ---------------------------------------------------------------------


@dataclass(frozen=True)
class Transport:
    """How SuperLink and SuperNodes of one flwr release talk: the only version-dependent part."""

    name: str
    """``grpc-rere`` or ``http``."""
    fleet_port_of_its_own: bool
    """The SuperLink serves the Fleet API on its own port (``--fleet-api-address``)."""
    supernode_flags: tuple[str, ...]
    """Extra SuperNode flags selecting the transport."""


GRPC_RERE = Transport("grpc-rere", fleet_port_of_its_own=True, supernode_flags=("--grpc-rere",))
HTTP = Transport("http", fleet_port_of_its_own=False, supernode_flags=())
LAST_GRPC_RELEASE = (1, 39)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"1.41.0"`` -> ``(1, 41, 0)``; a pre-release suffix is dropped (``"1.40.0rc1"`` -> ``(1, 40, 0)``)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version.strip())
    if match is None:
        raise ValueError(f"cannot parse the flwr version {version!r}")
    return tuple(int(g) for g in match.groups() if g is not None)


def transport_for(version: str) -> Transport:
    """gRPC for flwr <= 1.39, HTTP(S) on one port from 1.40 (see the module docstring)."""
    return GRPC_RERE if version_tuple(version)[:2] <= LAST_GRPC_RELEASE else HTTP


def flwr_version(bin_dir: str | Path) -> str:
    """The flwr version installed in the environment whose executables are in ``bin_dir``."""
    python = Path(bin_dir) / "python"
    code = "import importlib.metadata as m; print(m.version('flwr'))"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, check=True, env=clean_environ())
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        raise DeploymentError(f"cannot read the flwr version of {python}: {detail}") from None
    return out.stdout.strip()


# --- TLS -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files: the CA that signs the SuperLink's certificate, the certificate and its key."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(directory: str | Path, hosts: Sequence[str] = (HOST, "localhost"), days: int = 30) -> Certificates:
    """A self-signed CA and a server certificate for ``hosts`` signed by it (``cryptography``).

    Writes ``ca.pem``, ``server.pem`` and ``server.key`` (EC P-256; the key is readable by the owner
    only). docs/deployment.md shows the equivalent ``openssl`` commands.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmeta local CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    out = Certificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    out.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(out.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem_key)
    return out


# --- commands ------------------------------------------------------------------------------------


def _exe(bin_dir: Path | None, name: str) -> str:
    return str(bin_dir / name) if bin_dir is not None else name


def toml_value(value: Any) -> str:
    """A value as flwr's ``key=value`` config parser reads it (TOML literals)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if '"' in text or "\n" in text:
        raise ValueError(f"config string values cannot contain double quotes or newlines: {text!r}")
    return f'"{text}"'


def config_arg(values: Mapping[str, Any]) -> str:
    """``{"partition-id": 0, "memory-dir": "/m"}`` -> ``partition-id=0 memory-dir="/m"``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def superlink_command(
    transport: Transport,
    *,
    port: int,
    fleet_port: int | None = None,
    tls: Certificates | None = None,
    bin_dir: Path | None = None,
) -> list[str]:
    """``flower-superlink`` on ``127.0.0.1:port`` (HTTP Control/Runtime API; with HTTP also Fleet).

    With gRPC (flwr <= 1.39) the Fleet API listens on ``127.0.0.1:fleet_port``.
    """
    cmd = [_exe(bin_dir, "flower-superlink")]
    cmd += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key), "--ssl-ca-certfile", str(tls.ca)] if tls else ["--insecure"]
    if transport.fleet_port_of_its_own:
        if fleet_port is None:
            raise ValueError(f"the {transport.name} transport needs a fleet port")
        cmd += ["--fleet-api-address", f"{HOST}:{fleet_port}"]
    cmd += ["--host", HOST, "--port", str(port), "--disable-runtime-dependency-installation"]
    return cmd


def supernode_command(
    transport: Transport,
    *,
    superlink: str,
    port: int,
    node_config: Mapping[str, Any],
    tls: Certificates | None = None,
    max_wait_time: float | None = 60.0,
    bin_dir: Path | None = None,
    isolation: str = "subprocess",
) -> list[str]:
    """``flower-supernode`` connecting to the SuperLink's fleet address ``superlink`` (host:port).

    ``port`` is the SuperNode's own Runtime API port (its ClientApp processes talk to it), bound to
    127.0.0.1. ``max_wait_time`` bounds how long it keeps retrying an unreachable SuperLink before it
    exits; ``None`` retries forever (Flower's default). ``isolation="process"`` adds ``--isolation process``:
    the SuperNode then waits for a separately run :func:`superexec_command`.
    """
    cmd = [_exe(bin_dir, "flower-supernode")]
    cmd += ["--root-certificates", str(tls.ca)] if tls else ["--insecure"]
    cmd += [*transport.supernode_flags, "--superlink", superlink, "--host", HOST, "--port", str(port)]
    if isolation == "process":
        cmd += ["--isolation", "process"]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", f"{max_wait_time:g}"]
    cmd += ["--node-config", config_arg(node_config)]
    return cmd


def superexec_command(runtime_port: int, *, bin_dir: Path | None = None) -> list[str]:
    """``flower-superexec`` serving the SuperNode whose Runtime API listens on ``127.0.0.1:runtime_port`` (a
    SuperNode started with ``--isolation process``). The Runtime API is plain HTTP on the loopback interface,
    so the executor connects ``--insecure`` also when the SuperNode reaches its SuperLink over TLS."""
    return [_exe(bin_dir, "flower-superexec"), "--insecure", "--runtime-api-address", f"{HOST}:{runtime_port}"]


def connection_toml(address: str, tls: Certificates | None = None, name: str = CONNECTION) -> str:
    """A ``$FLWR_HOME/config.toml`` naming the SuperLink's Control API as connection ``name``."""
    auth = f'root-certificates = "{tls.ca}"' if tls else "insecure = true"
    return f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{auth}\n'


def flwr_run_command(
    project_dir: str | Path, run_config: Mapping[str, Any], *, connection: str = CONNECTION, bin_dir: Path | None = None
) -> list[str]:
    """``flwr run <project> <connection> --stream --run-config '...'`` (blocks until the run ends)."""
    cmd = [_exe(bin_dir, "flwr"), "run", str(project_dir), connection, "--stream"]
    if run_config:
        cmd += ["--run-config", config_arg(run_config)]
    return cmd


ISOLATING_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONNOUSERSITE", "VIRTUAL_ENV")
"""Variables that would make a started process import another environment's packages (e.g. flwr
1.41 from the launcher's venv inside a flwr 1.39 SuperNode): dropped from every child's environment."""


def clean_environ() -> dict[str, str]:
    """The launcher's environment without :data:`ISOLATING_VARS`."""
    return {k: v for k, v in os.environ.items() if k not in ISOLATING_VARS}


def shell_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The command as one shell line (``VAR=value cmd 'arg with spaces'``), as docs/deployment.md shows it."""
    prefix = [f"{k}={shlex.quote(str(v))}" for k, v in (env or {}).items()]
    return " ".join(prefix + [shlex.quote(a) for a in argv])


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def app_config(project_dir: str | Path = PROJECT_DIR) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the project: the run config before ``--run-config`` overrides."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with (Path(project_dir) / "pyproject.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"].get("config", {}))


@dataclass
class Process:
    """One long-running process this launcher started."""

    name: str
    argv: list[str]
    env: dict[str, str]
    """The environment variables set on top of the launcher's own (FLWR_HOME, PATH, ...)."""
    log: Path
    popen: subprocess.Popen
    log_offset: int = 0
    """Size of the log file when the process started (logs of restarts are appended)."""

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class FlwrRun:
    """A ``flwr run --stream`` in progress (:meth:`LocalDeployment.start_run`)."""

    deployment: LocalDeployment
    process: Process
    run_config: dict[str, Any]
    results_dir: Path
    started: float
    seconds: float | None = None
    """Wall time of ``flwr run`` (submission, ServerApp, all rounds, results), once finished."""
    results_path: Path | None = None

    def wait(self, timeout: float | None = 1800.0) -> dict[str, Any]:
        """Block until ``flwr run`` exits; return the results JSON the ServerApp wrote."""
        return self.deployment._finish(self, timeout)

    def output(self) -> str:
        return self.process.log.read_text(errors="replace")


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])
