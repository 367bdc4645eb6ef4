"""TLS for the sockets of a wsgirun isolate, with the interface of the `ssl` module.

Pyodide has no OpenSSL. Here the host does TLS: `SSLContext.wrap_socket`
upgrades the socket's connection in place with Deno's TLS (rustls), which is
what STARTTLS protocols (PostgreSQL, SMTP) and TLS-first ones (MySQL after
its greeting, HTTPS) need.

Differences from CPython's module, because of what Deno's TLS offers:

- The certificate is always verified. The roots are the host's (Mozilla's
  list, or the file named by the server's DENO_CERT setting) plus the CAs
  loaded into the context. CERT_NONE still verifies and logs a warning once;
  check_hostname=False does skip the name check.
- `getpeercert(binary_form=True)` raises SSLError, because the peer
  certificate is not available. `CHANNEL_BINDING_TYPES` is empty for the
  same reason.
- Client certificates (`load_cert_chain`) and server-side TLS are not
  supported.
"""

import base64 as _base64
import enum as _enum
import json as _json
import os as _os
from collections import namedtuple as _namedtuple

import _wsgirun_socket

OPENSSL_VERSION = "rustls (Deno TLS in the wsgirun host)"
OPENSSL_VERSION_INFO = (0, 0, 0, 0, 0)
OPENSSL_VERSION_NUMBER = 0
HAS_SNI = True
HAS_ALPN = True
HAS_NPN = False
HAS_ECDH = True
HAS_NEVER_CHECK_COMMON_NAME = True
HAS_SSLv2 = False
HAS_SSLv3 = False
HAS_TLSv1 = False
HAS_TLSv1_1 = False
HAS_TLSv1_2 = True
HAS_TLSv1_3 = True
HAS_PSK = False
CHANNEL_BINDING_TYPES = []

_DEFAULT_CIPHERS = "DEFAULT"


class _SSLMethod(_enum.IntEnum):
    PROTOCOL_SSLv23 = 2
    PROTOCOL_TLS_CLIENT = 16
    PROTOCOL_TLS_SERVER = 17


PROTOCOL_SSLv23 = PROTOCOL_TLS = _SSLMethod.PROTOCOL_SSLv23
PROTOCOL_TLS_CLIENT = _SSLMethod.PROTOCOL_TLS_CLIENT
PROTOCOL_TLS_SERVER = _SSLMethod.PROTOCOL_TLS_SERVER


class VerifyMode(_enum.IntEnum):
    CERT_NONE = 0
    CERT_OPTIONAL = 1
    CERT_REQUIRED = 2


CERT_NONE = VerifyMode.CERT_NONE
CERT_OPTIONAL = VerifyMode.CERT_OPTIONAL
CERT_REQUIRED = VerifyMode.CERT_REQUIRED


class VerifyFlags(_enum.IntFlag):
    VERIFY_DEFAULT = 0
    VERIFY_CRL_CHECK_LEAF = 0x4
    VERIFY_CRL_CHECK_CHAIN = 0xC
    VERIFY_X509_STRICT = 0x20
    VERIFY_X509_TRUSTED_FIRST = 0x8000
    VERIFY_ALLOW_PROXY_CERTS = 0x40
    VERIFY_X509_PARTIAL_CHAIN = 0x80000


globals().update(VerifyFlags.__members__)


class Options(_enum.IntFlag):
    OP_ALL = 0x80000054
    OP_NO_SSLv2 = 0
    OP_NO_SSLv3 = 0x02000000
    OP_NO_TLSv1 = 0x04000000
    OP_NO_TLSv1_1 = 0x10000000
    OP_NO_TLSv1_2 = 0x08000000
    OP_NO_TLSv1_3 = 0x20000000
    OP_NO_COMPRESSION = 0x20000
    OP_CIPHER_SERVER_PREFERENCE = 0x400000
    OP_SINGLE_DH_USE = 0
    OP_SINGLE_ECDH_USE = 0
    OP_NO_TICKET = 0x4000
    OP_NO_RENEGOTIATION = 0x40000000
    OP_ENABLE_MIDDLEBOX_COMPAT = 0x100000
    OP_IGNORE_UNEXPECTED_EOF = 0x80


globals().update(Options.__members__)


class TLSVersion(_enum.IntEnum):
    MINIMUM_SUPPORTED = -2
    SSLv3 = 0x0300
    TLSv1 = 0x0301
    TLSv1_1 = 0x0302
    TLSv1_2 = 0x0303
    TLSv1_3 = 0x0304
    MAXIMUM_SUPPORTED = -1


class Purpose(_enum.Enum):
    SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
    CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"


class SSLError(OSError):
    """A TLS failure."""

    library = None
    reason = None


class SSLZeroReturnError(SSLError):
    pass


class SSLWantReadError(SSLError):
    pass


class SSLWantWriteError(SSLError):
    pass


class SSLSyscallError(SSLError):
    pass


class SSLEOFError(SSLError):
    pass


class SSLCertVerificationError(SSLError, ValueError):
    verify_code = 1
    verify_message = "certificate verify failed"


CertificateError = SSLCertVerificationError

DefaultVerifyPaths = _namedtuple(
    "DefaultVerifyPaths",
    "cafile capath openssl_cafile_env openssl_cafile openssl_capath_env openssl_capath",
)


def get_default_verify_paths():
    return DefaultVerifyPaths(None, None, "SSL_CERT_FILE", "", "SSL_CERT_DIR", "")


_PEM_HEADER = "-----BEGIN CERTIFICATE-----"
_PEM_FOOTER = "-----END CERTIFICATE-----"


def DER_cert_to_PEM_cert(der_cert_bytes):
    text = _base64.encodebytes(der_cert_bytes).decode("ascii")
    return "%s\n%s%s\n" % (_PEM_HEADER, text, _PEM_FOOTER)


def PEM_cert_to_DER_cert(pem_cert_string):
    text = pem_cert_string.strip()
    if not text.startswith(_PEM_HEADER) or not text.endswith(_PEM_FOOTER):
        raise ValueError("Invalid PEM encoding; must be surrounded by %s and %s" % (_PEM_HEADER, _PEM_FOOTER))
    return _base64.decodebytes(text[len(_PEM_HEADER) : -len(_PEM_FOOTER)].encode("ascii"))


def _pem_blocks(text):
    """Split PEM text into its certificates."""
    blocks = []
    start = text.find(_PEM_HEADER)
    while start >= 0:
        end = text.find(_PEM_FOOTER, start)
        if end < 0:
            break
        blocks.append(text[start : end + len(_PEM_FOOTER)] + "\n")
        start = text.find(_PEM_HEADER, end)
    return blocks


def RAND_bytes(n):
    return _os.urandom(n)


def RAND_status():
    return True


_warned_unverified = set()


def _log(level, message):
    import _wsgirun_compat

    _wsgirun_compat.log(level, message)


class SSLContext:
    """TLS settings; `wrap_socket` upgrades a connected wsgirun socket."""

    sslsocket_class = None

    def __init__(self, protocol=None, *args, **kwargs):
        self._protocol = PROTOCOL_TLS if protocol is None else _SSLMethod(protocol)
        client = self._protocol == PROTOCOL_TLS_CLIENT
        self._check_hostname = client
        self._verify_mode = CERT_REQUIRED if client else CERT_NONE
        self.options = Options.OP_ALL | Options.OP_NO_SSLv3 | Options.OP_NO_COMPRESSION
        self.verify_flags = VerifyFlags.VERIFY_X509_TRUSTED_FIRST
        self.minimum_version = TLSVersion.MINIMUM_SUPPORTED
        self.maximum_version = TLSVersion.MAXIMUM_SUPPORTED
        self.post_handshake_auth = False
        self.hostname_checks_common_name = False
        self.keylog_filename = None
        self.sni_callback = None
        self.security_level = 2
        self._ca_pems = []
        self._alpn_protocols = []
        self._client_certificate = None

    @property
    def protocol(self):
        return self._protocol

    @property
    def check_hostname(self):
        return self._check_hostname

    @check_hostname.setter
    def check_hostname(self, value):
        value = bool(value)
        if value and self._verify_mode == CERT_NONE:
            self._verify_mode = CERT_REQUIRED
        self._check_hostname = value

    @property
    def verify_mode(self):
        return self._verify_mode

    @verify_mode.setter
    def verify_mode(self, value):
        value = VerifyMode(value)
        if value == CERT_NONE and self._check_hostname:
            raise ValueError("Cannot set verify_mode to CERT_NONE when check_hostname is enabled.")
        self._verify_mode = value

    def load_verify_locations(self, cafile=None, capath=None, cadata=None):
        if cafile is None and capath is None and cadata is None:
            raise TypeError("cafile, capath and cadata cannot be all omitted")
        if cafile is not None:
            with open(cafile, encoding="ascii") as file:
                self._add_pem(file.read(), cafile)
        if capath is not None:
            for name in sorted(_os.listdir(capath)):
                path = _os.path.join(capath, name)
                if _os.path.isfile(path):
                    with open(path, encoding="ascii", errors="replace") as file:
                        self._ca_pems.extend(_pem_blocks(file.read()))
        if cadata is not None:
            if isinstance(cadata, str):
                self._add_pem(cadata, "cadata")
            else:
                self._ca_pems.append(DER_cert_to_PEM_cert(bytes(cadata)))

    def _add_pem(self, text, where):
        blocks = _pem_blocks(text)
        if not blocks:
            raise SSLError(136, "no certificate found in %s: expected PEM text (-----BEGIN CERTIFICATE-----)" % where)
        self._ca_pems.extend(blocks)

    def load_default_certs(self, purpose=Purpose.SERVER_AUTH):
        # The host's roots are always trusted.
        pass

    def set_default_verify_paths(self):
        pass

    def load_cert_chain(self, certfile, keyfile=None, password=None):
        self._client_certificate = certfile

    def set_ciphers(self, ciphers):
        # rustls chooses from its own secure cipher suites.
        pass

    def get_ciphers(self):
        return []

    def set_alpn_protocols(self, protocols):
        self._alpn_protocols = [str(protocol) for protocol in protocols]

    def set_npn_protocols(self, protocols):
        pass

    def set_servername_callback(self, callback):
        self.sni_callback = callback

    def set_ecdh_curve(self, name):
        pass

    def load_dh_params(self, path):
        pass

    def get_ca_certs(self, binary_form=False):
        if binary_form:
            return [PEM_cert_to_DER_cert(pem) for pem in self._ca_pems]
        return [{} for _ in self._ca_pems]

    def cert_store_stats(self):
        return {"x509": len(self._ca_pems), "crl": 0, "x509_ca": len(self._ca_pems)}

    def session_stats(self):
        return {}

    def wrap_socket(
        self,
        sock,
        server_side=False,
        do_handshake_on_connect=True,
        suppress_ragged_eofs=True,
        server_hostname=None,
        session=None,
    ):
        if server_side:
            raise SSLError(0, "server-side TLS is not supported in wsgirun isolates")
        if not isinstance(sock, _wsgirun_socket.socket):
            raise TypeError("wrap_socket() needs a socket created by the socket module, not %r" % (sock,))
        if self._check_hostname and not server_hostname:
            raise ValueError("check_hostname requires server_hostname")
        if self._client_certificate is not None:
            raise SSLError(
                0,
                "client certificates (load_cert_chain) are not supported in wsgirun isolates: "
                "Deno's STARTTLS cannot send one",
            )
        if isinstance(server_hostname, bytes):
            server_hostname = server_hostname.decode("idna")
        return SSLSocket._create(sock, self, server_hostname, do_handshake_on_connect)

    def wrap_bio(self, *args, **kwargs):
        raise NotImplementedError("memory BIOs are not supported in wsgirun isolates")

    def _tls_options(self):
        return _json.dumps(
            {
                "caCerts": self._ca_pems,
                "checkHostname": self._check_hostname,
                "alpnProtocols": self._alpn_protocols,
            }
        )


class SSLSocket(_wsgirun_socket.socket):
    """A wsgirun socket whose connection the host has upgraded to TLS."""

    @classmethod
    def _create(cls, sock, context, server_hostname, do_handshake_on_connect):
        self = cls(sock.family, sock.type, sock.proto)
        self._context = context
        self.server_hostname = server_hostname
        self.server_side = False
        self.do_handshake_on_connect = do_handshake_on_connect
        self._alpn = None
        self._handshake_done = False
        connected = sock._id is not None
        sock._move_to(self)
        if connected and do_handshake_on_connect:
            self.do_handshake()
        return self

    @property
    def context(self):
        return self._context

    @property
    def session(self):
        return None

    @property
    def session_reused(self):
        return False

    def connect(self, address):
        super().connect(address)
        if self.do_handshake_on_connect:
            self.do_handshake()

    def do_handshake(self, block=False):
        self._check_connected()
        if self._handshake_done:
            return
        host = self.server_hostname or ""
        if self._context.verify_mode == CERT_NONE and host not in _warned_unverified:
            _warned_unverified.add(host)
            _log(
                "warning",
                "TLS to %r verifies the server certificate although the application turned "
                "verification off (CERT_NONE), because Deno's TLS always verifies" % (host or self._peer[0]),
            )
        timeout = self._timeout if self._timeout else None
        result = _json.loads(_wsgirun_socket._net.starttls(self._id, host, self._context._tls_options(), timeout))
        if not result["ok"]:
            _wsgirun_socket._raise_failure(result)
        self._alpn = result.get("alpn")
        self._handshake_done = True

    def getpeercert(self, binary_form=False):
        self._check_connected()
        if binary_form:
            raise SSLError(
                0,
                "the peer certificate is not available in wsgirun isolates (Deno's TLS does not "
                "expose it); turn off channel binding or certificate pinning",
            )
        # NOTE: the certificate was verified, but its fields are not available.
        return {}

    def selected_alpn_protocol(self):
        return self._alpn

    def selected_npn_protocol(self):
        return None

    def cipher(self):
        return None

    def shared_ciphers(self):
        return None

    def compression(self):
        return None

    def version(self):
        return None

    def get_channel_binding(self, cb_type="tls-unique"):
        raise ValueError("channel binding is not supported in wsgirun isolates")

    def read(self, len=1024, buffer=None):
        if buffer is not None:
            return self.recv_into(buffer, len)
        return self.recv(len)

    def write(self, data):
        return self.send(data)

    def unwrap(self):
        raise NotImplementedError("unwrapping TLS is not supported in wsgirun isolates")

    def verify_client_post_handshake(self):
        raise NotImplementedError("post-handshake authentication is not supported in wsgirun isolates")


SSLContext.sslsocket_class = SSLSocket


def create_default_context(purpose=Purpose.SERVER_AUTH, *, cafile=None, capath=None, cadata=None):
    if purpose == Purpose.CLIENT_AUTH:
        raise SSLError(0, "server-side TLS is not supported in wsgirun isolates")
    context = SSLContext(PROTOCOL_TLS_CLIENT)
    if cafile or capath or cadata:
        context.load_verify_locations(cafile, capath, cadata)
    return context


def _create_unverified_context(
    protocol=None, *, cert_reqs=CERT_NONE, check_hostname=False, purpose=Purpose.SERVER_AUTH,
    certfile=None, keyfile=None, cafile=None, capath=None, cadata=None,
):
    context = SSLContext(PROTOCOL_TLS_CLIENT if protocol is None else protocol)
    context.check_hostname = check_hostname
    context.verify_mode = cert_reqs
    if cafile or capath or cadata:
        context.load_verify_locations(cafile, capath, cadata)
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    return context


_create_default_https_context = create_default_context
_create_stdlib_context = _create_unverified_context


def wrap_socket(
    sock, keyfile=None, certfile=None, server_side=False, cert_reqs=CERT_NONE,
    ssl_version=PROTOCOL_TLS, ca_certs=None, do_handshake_on_connect=True,
    suppress_ragged_eofs=True, ciphers=None,
):
    """The module-level function that Python 3.12 removed; older drivers still call it."""
    context = SSLContext(PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = cert_reqs
    if ca_certs:
        context.load_verify_locations(ca_certs)
    if certfile:
        context.load_cert_chain(certfile, keyfile)
    return context.wrap_socket(sock, server_side, do_handshake_on_connect, suppress_ragged_eofs)


def match_hostname(cert, hostname):
    """Kept for old callers; the host already checked the name during the handshake."""
    return None

