"""Who a process is on the wire: a per-run certificate authority, one certificate per
process, and the mutual-TLS contexts the transport uses.

    python -m testbed.container credentials     (writes them where CREDENTIALS_DIR says)

:func:`make_credentials` writes, for the names it is given (``coordinator``,
``party-0`` ...)::

    ca.crt                 the run's CA certificate (public; every process trusts it)
    <name>.crt <name>.key  that process's certificate (CN and DNS name = the name) and key

The CA's private key is discarded once the certificates are signed, so nobody -- not a
process of the run, not a reader of the credentials directory -- can mint another
identity for the run.  Keys are ECDSA P-256 and written with mode 0600.

An :class:`Identity` is one process's view: its name, its certificate and key, the CA.
Both its contexts demand TLS 1.3 and a certificate from the peer signed by the run's CA;
the client context also checks that the peer's certificate names the process it meant
to reach (``server_hostname`` = the peer's name), so a party cannot stand in for the
coordinator.  The identity of a connection is its peer certificate's common name
(:func:`peer_name`).
"""
import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import TransportError

CA_FILE = "ca.crt"
VALID_DAYS = 30


def _write(path, data, mode):
    """Atomically: a process waiting for the file never reads half of it."""
    tmp = Path(f"{path}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)   # O_CREAT's mode does not apply to a file that existed
    os.replace(tmp, path)


def make_credentials(directory, names, days=VALID_DAYS):
    """Write a fresh CA certificate and one certificate + key per name into ``directory``
    (created with mode 0700). Returns the directory."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)   # tolerate clock skew
    until = now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "testbed run CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (directory / CA_FILE).unlink(missing_ok=True)
    for name in names:   # the CA certificate is written last: its presence means all are there
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(until)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
                                                      x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(directory / f"{name}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), 0o600)
    _write(directory / CA_FILE, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    return directory


def has_credentials(directory, names):
    """True when ``directory`` holds the CA and a certificate and key for every name."""
    d = Path(directory)
    return (d / CA_FILE).is_file() and all(
        (d / f"{n}.crt").is_file() and (d / f"{n}.key").is_file() for n in names)


@dataclass
class Identity:
    """One process's credentials; builds its server and client TLS contexts."""

    name: str
    ca_file: str
    cert_file: str
    key_file: str

    @classmethod
    def wait_for(cls, directory, name, timeout):
        """:meth:`from_dir` once the files are there (another process may be making them)."""
        import time
        deadline = time.monotonic() + timeout
        while not has_credentials(directory, [name]) and time.monotonic() < deadline:
            time.sleep(0.5)
        return cls.from_dir(directory, name)

    @classmethod
    def from_dir(cls, directory, name):
        """The identity ``name`` from a credentials directory; a clear error when a file is missing."""
        d = Path(directory)
        files = {"ca_file": d / CA_FILE, "cert_file": d / f"{name}.crt", "key_file": d / f"{name}.key"}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise TransportError(f"credentials of {name!r}: missing {', '.join(missing)} "
                                 "(CREDENTIALS_DIR; `up` and the compose `credentials` service write them)")
        return cls(name, **{k: str(v) for k, v in files.items()})

    def _context(self, purpose):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == "server" else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            ctx.load_verify_locations(self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"credentials of {self.name!r} ({self.cert_file}): {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self):
        return self._context("server")

    def client_context(self):
        ctx = self._context("client")
        ctx.check_hostname = True
        return ctx


def peer_name(tls_sock):
    """The common name of the (CA-verified) certificate the peer presented."""
    cert = tls_sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    raise TransportError("peer certificate has no common name")
