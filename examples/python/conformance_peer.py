"""A minimal third-party federation peer for mosaicd, built only from proto/ and
docs/PROTOCOL.md (no code of the daemon): it connects to a daemon as the
requester of a connection, is accepted, sends it signed commands and believes
nothing it has not verified.

    python conformance_peer.py https://HOST:PORT [--workspace W]
        [--agent-type sh] [--prompt 'sleep 60'] [--listen-host 127.0.0.1]

What it does, with the sections of docs/PROTOCOL.md it follows:

1. Makes an ECDSA P-256 key (its instance key), a self-signed certificate for
   it and a random instance id (sections 2 and 4).
2. Learns the daemon's identity through the protocol only: reads the daemon's
   server certificate with a plain TLS handshake, then calls GetInstance over
   a gRPC channel that trusts that certificate alone, without a client
   certificate, and checks that the key GetInstance names is the
   certificate's, in the one accepted encoding (section 10, step 1).
3. Serves NotifyConnection and Ping at its own URL over mutual TLS, checking
   every notice and ping as a receiver does and answering with signed replies
   (sections 7 and 11).
4. Sends a signed RequestConnection over mutual TLS asking for `agent.spawn`,
   `agent.status` and `agent.kill`, verifies the signed reply (section 8),
   and waits for the daemon's operator to accept: the ACCEPTED notice.
5. Sends `agent.spawn` (then the same signed envelope again, the same payload
   under a new signature, and other bytes under the same message id: two
   stored replies and ALREADY_EXISTS, section 9), `agent.status`,
   `agent.kill`, and `agent.status` until the agent has ended. Every reply is
   verified: the daemon's key and signature over the received bytes, the
   header (sender, recipient, workspace) and the message id it answers. Each
   signature check has a control: the same envelope with a payload bit or a
   signature bit flipped must fail it, else the check is broken.
6. Waits for a ping from the daemon and answers it.

Needs grpcio, grpcio-tools (stubs are generated from proto/ into a temporary
directory at run time) and cryptography. The daemon must have the agent type
configured, and its operator must accept the request (`mosaicd peer list`,
`mosaicd peer accept ID --grant agent.spawn,agent.status,agent.kill`) within
--accept-timeout seconds. This peer follows no key rotation of the daemon.

Progress goes to stderr, one line per step. Stdout gets two JSON lines: once
the request is stored, the daemon's id for it (`pending_connection_id`, what
its operator accepts) and this peer's instance id; at the end, the summary.
Any check that fails exits 1 with `error: ...` on stderr.
"""

import argparse
import base64
import datetime
import hashlib
import importlib
import ipaddress
import json
import pathlib
import socket
import ssl
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from concurrent import futures

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import ExtensionOID, NameOID
from google.protobuf.message import DecodeError
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Section 4: an accepted key is exactly this 26-byte SubjectPublicKeyInfo
# prefix (id-ecPublicKey, prime256v1, a BIT STRING), 0x04 and x and y.
P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
SPKI_LENGTH = 91
SIGNATURE_LENGTH = 64
# Section 5: the signed bytes start with this prefix.
DOMAIN_PREFIX = b"mosaic-federation-v1"
# Section 6: the clock window and the lifetime mosaicd gives its messages.
CLOCK_WINDOW_MS = 300_000
MESSAGE_LIFETIME_MS = 300_000
CALL_TIMEOUT_SECONDS = 10
# Section 12: the commands this peer sends, each its own capability.
CAPABILITIES = ["agent.spawn", "agent.status", "agent.kill"]
TERMINAL_AGENT_STATES = {
    "AGENT_STATE_COMPLETED",
    "AGENT_STATE_FAILED",
    "AGENT_STATE_KILLED",
    "AGENT_STATE_TIMED_OUT",
}
# Section 6: characters a workspace (and a name or reason) may not hold.
INVISIBLE_RANGES = [
    (0x0000, 0x001F), (0x007F, 0x009F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x2064), (0x2066, 0x2069), (0xFEFF, 0xFEFF),
]

# The generated modules, filled in by load_stubs().
pb = None
envelope_pb = None
agent_pb = None
federation_grpc = None


class PeerError(Exception):
    """A step that did not go as the protocol says; the message says which and why."""


def step(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- stubs


def load_stubs(out_dir: pathlib.Path) -> None:
    global pb, envelope_pb, agent_pb, federation_grpc
    proto_root = ROOT / "proto"
    files = [str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto")]
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        ["protoc", f"-I{proto_root}", f"-I{well_known}",
         f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    )
    if status != 0:
        raise PeerError(f"protoc failed with status {status}")
    sys.path.insert(0, str(out_dir))
    pb = importlib.import_module("mosaic.federation.v1.federation_pb2")
    envelope_pb = importlib.import_module("mosaic.federation.v1.envelope_pb2")
    agent_pb = importlib.import_module("mosaic.agent.v1.agent_pb2")
    federation_grpc = importlib.import_module("mosaic.federation.v1.federation_pb2_grpc")


# ---------------------------------------------------------------- keys (section 4)


def accepted_key(spki: bytes) -> bool:
    """The one accepted encoding: a 91-byte uncompressed P-256 SPKI."""
    return (
        len(spki) == SPKI_LENGTH
        and spki.startswith(P256_SPKI_PREFIX)
        and spki[len(P256_SPKI_PREFIX)] == 0x04
    )


def key_id_of(spki: bytes) -> str:
    return hashlib.sha256(spki).digest()[:16].hex()


def fingerprint_of(spki: bytes) -> str:
    encoded = base64.b32encode(hashlib.sha256(spki).digest()).decode("ascii")[:32]
    return "-".join(encoded[index:index + 4] for index in range(0, 32, 4))


def spki_of_certificate(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_as_sent(certificate_der: bytes) -> bytes:
    """The certificate's SubjectPublicKeyInfo, which must appear in it byte for
    byte in the accepted encoding (a key object re-encodes a compressed point
    as uncompressed, which would hide it)."""
    spki = spki_of_certificate(x509.load_der_x509_certificate(certificate_der))
    if not accepted_key(spki) or spki not in certificate_der:
        raise PeerError("a certificate's key is not an uncompressed P-256 SPKI (section 4)")
    return spki


# ---------------------------------------------------------------- signing (section 5)


def signed_bytes(kind: str, payload: bytes) -> bytes:
    return DOMAIN_PREFIX + b"\x00" + kind.encode("ascii") + b"\x00" + payload


def verifies(spki: bytes, kind: str, payload: bytes, signature: bytes) -> bool:
    """ECDSA P-256 SHA-256 over the signed bytes built from the received
    payload, the signature as r || s."""
    if len(signature) != SIGNATURE_LENGTH:
        return False
    public_key = serialization.load_der_public_key(spki)
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), signed_bytes(kind, payload),
                          ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def flip_bit(data: bytes) -> bytes:
    """`data` with the lowest bit of its middle byte flipped."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1:]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def timestamp(ms: int):
    value = importlib.import_module("google.protobuf.timestamp_pb2").Timestamp()
    value.FromMilliseconds(ms)
    return value


class LocalIdentity:
    """This peer: its instance id, name, key, certificate and URL."""

    def __init__(self, name: str, host: str):
        self.instance_id = str(uuid.uuid4())
        self.name = name
        self.private_key = ec.generate_private_key(ec.SECP256R1())
        self.spki = self.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if not accepted_key(self.spki):
            raise PeerError("our own key is not in the accepted encoding")
        self.key_id = key_id_of(self.spki)
        self.fingerprint = fingerprint_of(self.spki)
        self.created_at_ms = now_ms()
        self.private_key_pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.certificate_pem = self._self_signed_certificate(host)
        self.url = ""

    def _self_signed_certificate(self, host: str) -> bytes:
        # Section 2: names and the certificate's own signature are not
        # checked; the key is. Valid from an hour ago, as mosaicd's are.
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        try:
            alternative = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            alternative = x509.DNSName(host)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
            .sign(self.private_key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, kind: str, payload: bytes) -> bytes:
        r, s = decode_dss_signature(
            self.private_key.sign(signed_bytes(kind, payload), ec.ECDSA(hashes.SHA256()))
        )
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def seal(self, kind: str, message):
        payload = message.SerializeToString()
        return envelope_pb.SignedEnvelope(
            payload=payload, signature=self.sign(kind, payload), key_id=self.key_id
        )

    def instance(self):
        """This peer as its GetInstance would describe it (section 10, step 2)."""
        return envelope_pb.Instance(
            instance_id=self.instance_id,
            name=self.name,
            url=self.url,
            public_key=self.spki,
            fingerprint=self.fingerprint,
            key_id=self.key_id,
            capabilities=[],
            created_at=timestamp(self.created_at_ms),
        )


class RemotePeer:
    """The daemon, as learnt through the protocol."""

    def __init__(self, url: str):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "https" or not parsed.hostname:
            raise PeerError(f"{url}: a peer URL is https://HOST[:PORT] (section 2)")
        if parsed.username or parsed.password or parsed.query or parsed.path not in ("", "/"):
            raise PeerError(f"{url}: no user info, path or query (section 2)")
        self.url = url
        self.host = parsed.hostname
        self.port = parsed.port or 443
        bracketed = f"[{self.host}]" if ":" in self.host else self.host
        self.target = f"{bracketed}:{self.port}"
        self.certificate_pem = b""
        self.spki = b""
        self.key_id = ""
        self.instance_id = ""
        self.channel_options = []

    def read_certificate(self) -> None:
        """The server certificate, from a TLS handshake without a client
        certificate: gRPC's C-core stack does not show the certificate it
        received, so it is read here and then trusted as the only root of the
        gRPC channels (section 2: a peer is its key)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        server_name = None if is_ip_address(self.host) else self.host
        try:
            with socket.create_connection((self.host, self.port),
                                          timeout=CALL_TIMEOUT_SECONDS) as raw:
                with context.wrap_socket(raw, server_hostname=server_name) as tls:
                    der = tls.getpeercert(binary_form=True)
                    alpn = tls.selected_alpn_protocol()
        except OSError as error:
            raise PeerError(f"no TLS handshake with {self.url}: {error}") from None
        if alpn != "h2":
            raise PeerError("the daemon did not select ALPN h2 (section 2)")
        if not der:
            raise PeerError("the daemon presented no certificate")
        certificate = x509.load_der_x509_certificate(der)
        now = datetime.datetime.now(datetime.timezone.utc)
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise PeerError("the daemon's certificate is outside its validity dates")
        self.spki = spki_as_sent(der)
        if not accepted_key(self.spki):
            raise PeerError("the daemon's certificate key is not an accepted P-256 key")
        self.key_id = key_id_of(self.spki)
        self.certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
        # gRPC's C-core always checks the server's name against the
        # certificate; names mean nothing here, so when the URL's host is not
        # among them, the channel is told to expect one the certificate has.
        names = certificate_names(certificate)
        if self.host not in names:
            dns = [name for name in names if not is_ip_address(name)]
            if not dns:
                raise PeerError("the daemon's certificate names no DNS name to check it by")
            self.channel_options = [("grpc.ssl_target_name_override", dns[0])]

    def channel(self, identity: "LocalIdentity | None"):
        """A channel pinned to the daemon's certificate; with `identity`, it
        presents this peer's certificate (mutual TLS)."""
        if identity is None:
            credentials = grpc.ssl_channel_credentials(root_certificates=self.certificate_pem)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.certificate_pem,
                private_key=identity.private_key_pem,
                certificate_chain=identity.certificate_pem,
            )
        return grpc.secure_channel(self.target, credentials, options=self.channel_options)


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def certificate_names(certificate: x509.Certificate) -> list:
    try:
        extension = certificate.extensions.get_extension_for_oid(
            ExtensionOID.SUBJECT_ALTERNATIVE_NAME
        ).value
    except x509.ExtensionNotFound:
        return []
    return ([str(name) for name in extension.get_values_for_type(x509.DNSName)]
            + [str(address) for address in extension.get_values_for_type(x509.IPAddress)])


# ---------------------------------------------------------------- header rules (section 6)


def printable(text: str) -> bool:
    return not any(low <= ord(char) <= high for char in text for low, high in INVISIBLE_RANGES)


def header_problem(header, envelope_key_id: str):
    """What breaks the header rules of section 6, without the clock; None if nothing."""
    for field, limit in [("message_id", 64), ("sender_instance_id", 64),
                         ("recipient_instance_id", 64), ("key_id", 64)]:
        if not 1 <= len(getattr(header, field)) <= limit:
            return f"header.{field} is not 1 to {limit} characters"
    if not 1 <= len(header.workspace) <= 128 or not printable(header.workspace):
        return "header.workspace is not 1 to 128 printable characters"
    if not header.HasField("issued_at") or not header.HasField("expires_at"):
        return "header.issued_at or header.expires_at is missing"
    if header.expires_at.ToMilliseconds() < header.issued_at.ToMilliseconds():
        return "header.expires_at is before header.issued_at"
    if header.key_id != envelope_key_id:
        return "header.key_id is not SignedEnvelope.key_id"
    return None


def capability_list_problem(field: str, names) -> "str | None":
    if len(names) > 32 or any(not 1 <= len(name) <= 64 or not printable(name) for name in names):
        return f"{field}: at most 32 names of 1 to 64 characters without control characters"
    return None


# ---------------------------------------------------------------- the peer


class Refused(Exception):
    """A message this peer refuses, with the status the protocol gives it."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class ConformancePeer:
    """The requester's side of one connection with the daemon, in one workspace."""

    def __init__(self, me: LocalIdentity, daemon: RemotePeer, workspace: str):
        self.me = me
        self.daemon = daemon
        self.workspace = workspace
        self.changed = threading.Condition()
        self.state = None  # this side's record: None until the request is sent
        self.granted = []
        self.seen = {}  # message id -> (payload SHA-256, stored reply or None)
        self.notices = []
        self.pings_answered = 0
        self.refusals = []
        self.replies_verified = 0
        self.tampered_refused = 0

    # -------------------------------------------------- as a sender

    def new_header(self, recipient: str):
        issued = now_ms()
        return envelope_pb.EnvelopeHeader(
            message_id=str(uuid.uuid4()),
            sender_instance_id=self.me.instance_id,
            recipient_instance_id=recipient,
            workspace=self.workspace,
            issued_at=timestamp(issued),
            expires_at=timestamp(issued + MESSAGE_LIFETIME_MS),
            key_id=self.me.key_id,
        )

    def open_reply(self, sealed, message_class, kind: str, request_header, what: str):
        """A reply, believed only when section 8 holds; else PeerError."""
        if sealed is None or not sealed.payload:
            raise PeerError(f"{what}: the reply has no envelope")
        if len(sealed.signature) != SIGNATURE_LENGTH:
            raise PeerError(f"{what}: the reply's signature is not 64 bytes")
        try:
            payload = message_class.FromString(sealed.payload)
        except DecodeError:
            raise PeerError(f"{what}: the reply does not decode as "
                            f"{message_class.__name__}") from None
        if not payload.HasField("header"):
            raise PeerError(f"{what}: the reply has no header")
        header = payload.header
        problem = header_problem(header, sealed.key_id)
        if problem:
            raise PeerError(f"{what}: the reply breaks a header rule: {problem}")
        if header.recipient_instance_id != self.me.instance_id:
            raise PeerError(f"{what}: the reply is addressed to {header.recipient_instance_id!r}")
        if header.sender_instance_id != self.daemon.instance_id:
            raise PeerError(f"{what}: the reply is from {header.sender_instance_id!r}")
        if header.workspace != request_header.workspace:
            raise PeerError(f"{what}: the reply is for workspace {header.workspace!r}")
        if header.message_id == request_header.message_id:
            raise PeerError(f"{what}: the reply reuses the request's message id")
        if sealed.key_id != self.daemon.key_id:
            raise PeerError(f"{what}: the reply is signed by key {sealed.key_id!r}, "
                            f"not the daemon's {self.daemon.key_id}")
        if not self.signature_holds(kind, sealed):
            raise PeerError(f"{what}: the reply's signature does not verify with the daemon's key")
        self.replies_verified += 1
        return payload

    def signature_holds(self, kind: str, sealed) -> bool:
        """Whether the daemon's key signed the received payload as `kind`. The
        check comes with its control: the same envelope with one bit of the
        payload or of the signature flipped must not verify, else the check
        itself is broken and nothing it passed can be believed."""
        for payload, signature in [(flip_bit(sealed.payload), sealed.signature),
                                   (sealed.payload, flip_bit(sealed.signature))]:
            if verifies(self.daemon.spki, kind, payload, signature):
                raise PeerError("the signature check accepts a tampered envelope")
            self.tampered_refused += 1
        return verifies(self.daemon.spki, kind, sealed.payload, sealed.signature)

    def call(self, what: str, method, request):
        try:
            return method(request, timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            raise PeerError(f"{what} failed: {error.code().name}: {error.details()}") from None

    def get_instance(self) -> None:
        self.daemon.read_certificate()
        with self.daemon.channel(None) as channel:
            stub = federation_grpc.FederationStub(channel)
            instance = self.call("GetInstance", stub.GetInstance, pb.GetInstanceRequest()).instance
        if instance.public_key != self.daemon.spki:
            raise PeerError("GetInstance names a key that is not the key of the server certificate")
        if not 1 <= len(instance.instance_id) <= 64 or instance.instance_id == self.me.instance_id:
            raise PeerError(f"GetInstance: unusable instance id {instance.instance_id!r}")
        self.daemon.instance_id = instance.instance_id
        missing = [name for name in CAPABILITIES if name not in instance.capabilities]
        if missing:
            raise PeerError(f"GetInstance: the daemon cannot grant {missing}")
        # The key id and fingerprint are recomputed, never taken as sent.
        step(f"daemon {instance.instance_id} ({instance.name}), key id {self.daemon.key_id}, "
             f"fingerprint {fingerprint_of(self.daemon.spki)}")

    def request_connection(self, stub) -> str:
        payload = envelope_pb.ConnectionRequestPayload(
            header=self.new_header(self.daemon.instance_id),
            sender=self.me.instance(),
            requested_capabilities=CAPABILITIES,
            offered_capabilities=[],
        )
        sealed = self.me.seal("connection-request", payload)
        # Ready for notices before the reply: the ACCEPTED notice may come
        # as soon as the daemon has stored the request.
        with self.changed:
            self.state = "CONNECTION_STATE_PENDING"
        response = self.call("RequestConnection", stub.RequestConnection,
                             pb.RequestConnectionRequest(envelope=sealed))
        reply = self.open_reply(response.envelope, envelope_pb.ConnectionReplyPayload,
                                "connection-reply", payload.header, "RequestConnection")
        if reply.request_message_id != payload.header.message_id:
            raise PeerError("RequestConnection: the reply answers another request")
        state = envelope_pb.ConnectionState.Name(reply.state)
        if state not in ("CONNECTION_STATE_PENDING", "CONNECTION_STATE_ACTIVE",
                         "CONNECTION_STATE_REJECTED"):
            raise PeerError(f"RequestConnection: the reply's state is {state}")
        with self.changed:
            # A notice that overtook the reply wins.
            if self.state == "CONNECTION_STATE_PENDING" and state != "CONNECTION_STATE_PENDING":
                self.state = state
                self.granted = list(reply.granted_capabilities)
            self.changed.notify_all()
        step(f"connection requested: the daemon's record {reply.connection_id} is {state}")
        return reply.connection_id

    def wait_until_accepted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.state == "CONNECTION_STATE_PENDING":
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"not accepted within {timeout:g} s "
                                    f"(accept it with `mosaicd peer accept`)")
                self.changed.wait(left)
            if self.state != "CONNECTION_STATE_ACTIVE":
                raise PeerError(f"the connection became {self.state}, not ACTIVE")
            missing = [name for name in CAPABILITIES if name not in self.granted]
        if missing:
            raise PeerError(f"accepted without {missing}: grant {', '.join(CAPABILITIES)}")
        step(f"accepted: granted {', '.join(self.granted)}")

    def execute(self, stub, what: str, sealed, request_header):
        """Sends one signed command; returns the reply envelope and its verified result."""
        response = self.call(what, stub.ExecuteCommand, pb.ExecuteCommandRequest(envelope=sealed))
        result = self.open_reply(response.envelope, envelope_pb.CommandResultPayload,
                                 "command-result", request_header, what)
        if result.command_message_id != request_header.message_id:
            raise PeerError(f"{what}: the result answers command {result.command_message_id!r}")
        return response.envelope, result

    def command(self, **command):
        payload = envelope_pb.CommandPayload(header=self.new_header(self.daemon.instance_id),
                                             **command)
        return payload, self.me.seal("command", payload)

    def agent_of(self, result, what: str):
        outcome = result.WhichOneof("outcome")
        if outcome == "error":
            raise PeerError(f"{what}: the daemon answered a CommandError, code "
                            f"{result.error.code}: {result.error.message}")
        if outcome != "agent":
            raise PeerError(f"{what}: the result's outcome is {outcome}, not agent")
        agent = result.agent
        origin = agent.origin
        if (agent_pb.AgentOriginKind.Name(origin.kind) != "AGENT_ORIGIN_KIND_PEER"
                or origin.instance_id != self.me.instance_id
                or origin.workspace != self.workspace):
            raise PeerError(f"{what}: the agent is not recorded as spawned by this peer "
                            f"in {self.workspace!r}")
        return agent

    def run_commands(self, stub, agent_type: str, prompt: str, end_timeout: float) -> dict:
        report = {}
        spawn = envelope_pb.AgentSpawnCommand(
            spawn=agent_pb.SpawnRequest(agent_type=agent_type, prompt=prompt,
                                        labels={"client": "python-conformance-peer"})
        )
        payload, sealed = self.command(agent_spawn=spawn)
        first_reply, result = self.execute(stub, "agent.spawn", sealed, payload.header)
        agent = self.agent_of(result, "agent.spawn")
        agent_id = agent.agent_id
        report["spawn"] = payload.header.message_id
        step(f"agent.spawn: agent {agent_id} is {agent_pb.AgentState.Name(agent.state)}")

        # Section 9: an identical retry gets the stored reply, and the command
        # does not run again; so does the same payload under a new signature
        # ("same bytes" are the payload's); other bytes are ALREADY_EXISTS.
        again, _ = self.execute(stub, "agent.spawn (identical retry)", sealed, payload.header)
        resigned = envelope_pb.SignedEnvelope(
            payload=sealed.payload, signature=self.me.sign("command", sealed.payload),
            key_id=sealed.key_id,
        )
        if resigned.signature == sealed.signature:
            raise PeerError("two ECDSA signatures came out equal")
        again_resigned, _ = self.execute(stub, "agent.spawn (re-signed retry)", resigned,
                                         payload.header)
        for name, reply in [("identical", again), ("re-signed", again_resigned)]:
            if reply.payload != first_reply.payload:
                raise PeerError(f"agent.spawn ({name} retry): not the stored reply")
        other = envelope_pb.CommandPayload()
        other.CopyFrom(payload)
        other.agent_spawn.spawn.prompt = prompt + " "
        try:
            stub.ExecuteCommand(pb.ExecuteCommandRequest(envelope=self.me.seal("command", other)),
                                timeout=CALL_TIMEOUT_SECONDS)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise PeerError(f"agent.spawn (other bytes, same id): {error.code().name}, "
                                f"not ALREADY_EXISTS") from None
        else:
            raise PeerError("agent.spawn (other bytes, same id) was accepted")
        report["reused_with_other_bytes"] = payload.header.message_id
        step("agent.spawn retried: the stored reply twice, then ALREADY_EXISTS for other bytes")

        payload, sealed = self.command(
            agent_status=envelope_pb.AgentStatusCommand(agent_id=agent_id))
        _, result = self.execute(stub, "agent.status", sealed, payload.header)
        agent = self.agent_of(result, "agent.status")
        if agent.agent_id != agent_id:
            raise PeerError(f"agent.status: answered for agent {agent.agent_id!r}")
        report["status"] = payload.header.message_id
        step(f"agent.status: agent {agent_id} is {agent_pb.AgentState.Name(agent.state)}")

        payload, sealed = self.command(agent_kill=envelope_pb.AgentKillCommand(
            agent_id=agent_id, reason="conformance peer done"))
        _, result = self.execute(stub, "agent.kill", sealed, payload.header)
        agent = self.agent_of(result, "agent.kill")
        if agent.agent_id != agent_id:
            raise PeerError(f"agent.kill: answered for agent {agent.agent_id!r}")
        report["kill"] = payload.header.message_id
        step(f"agent.kill: agent {agent_id} is {agent_pb.AgentState.Name(agent.state)}")

        # The kill may answer while the process stops: read until it has ended.
        deadline = time.monotonic() + end_timeout
        reads = []
        while agent_pb.AgentState.Name(agent.state) not in TERMINAL_AGENT_STATES:
            if time.monotonic() > deadline:
                raise PeerError(f"agent {agent_id} did not end within {end_timeout:g} s "
                                f"of the kill")
            time.sleep(0.2)
            payload, sealed = self.command(
                agent_status=envelope_pb.AgentStatusCommand(agent_id=agent_id))
            _, result = self.execute(stub, "agent.status", sealed, payload.header)
            agent = self.agent_of(result, "agent.status")
            reads.append(payload.header.message_id)
        report["status_after_kill"] = reads
        report["agent_id"] = agent_id
        report["agent_state"] = agent_pb.AgentState.Name(agent.state)
        step(f"agent {agent_id} ended {report['agent_state']}")
        return report

    def wait_for_ping(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while self.pings_answered == 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"the daemon sent no ping within {timeout:g} s")
                self.changed.wait(left)
        step("answered a ping from the daemon")

    # -------------------------------------------------- as a receiver (section 7)

    def receive(self, context, request, message_class, kind: str):
        """Steps 1 to 10 for a notice or a ping. Returns the verified payload
        and, for an identical retry, the stored reply; raises Refused."""
        tls_spki = client_certificate_key(context)
        if tls_spki is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "no client certificate")
        sealed = request.envelope if request.HasField("envelope") else None
        if sealed is None or not sealed.payload:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "no envelope, or an empty payload")
        if len(sealed.signature) != SIGNATURE_LENGTH:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the signature is not 64 bytes")
        try:
            payload = message_class.FromString(sealed.payload)
        except DecodeError:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the payload does not decode") from None
        if not payload.HasField("header"):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "the payload has no header")
        header = payload.header
        problem = header_problem(header, sealed.key_id)
        if problem is None and kind == "connection-notice":
            problem = notice_problem(payload)
        if problem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if header.recipient_instance_id != self.me.instance_id:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, "the message is for another instance")
        open_states = ("CONNECTION_STATE_PENDING", "CONNECTION_STATE_ACTIVE",
                       "CONNECTION_STATE_SUSPENDED")
        if (header.sender_instance_id != self.daemon.instance_id
                or header.workspace != self.workspace or self.state not in open_states):
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          "no open connection with the sender in that workspace")
        expected_tls = self.daemon.spki
        if kind == "connection-notice" and payload.kind == envelope_pb.NOTICE_KIND_KEY_ROTATED:
            expected_tls = payload.new_key.public_key
        if header.key_id != self.daemon.key_id or tls_spki != expected_tls:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "not signed by the connection's key")
        now = now_ms()
        if abs(header.issued_at.ToMilliseconds() - now) > CLOCK_WINDOW_MS:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                          "issued_at is outside the clock window")
        if header.expires_at.ToMilliseconds() <= now:
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED, "the message has expired")
        if not self.signature_holds(kind, sealed):
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "the signature does not verify")
        digest = hashlib.sha256(sealed.payload).digest()
        seen = self.seen.get(header.message_id)
        if seen is not None:
            stored_digest, stored_reply = seen
            if stored_reply is not None and stored_digest == digest:
                return payload, stored_reply
            raise Refused(grpc.StatusCode.ALREADY_EXISTS, "this message id was used before")
        return payload, None

    def reply_header(self, request_header):
        header = self.new_header(request_header.sender_instance_id)
        header.workspace = request_header.workspace
        return header

    def on_notice(self, request, context):
        with self.changed:
            try:
                notice, stored = self.receive(context, request, envelope_pb.ConnectionNoticePayload,
                                              "connection-notice")
                if stored is not None:
                    return pb.NotifyConnectionResponse(envelope=stored)
                self.apply_notice(notice)
            except Refused as refused:
                self.refusals.append(f"NotifyConnection: {refused.code.name}: {refused}")
                context.abort(refused.code, str(refused))
            ack = envelope_pb.NoticeAckPayload(
                header=self.reply_header(notice.header),
                notice_message_id=notice.header.message_id,
                state=envelope_pb.ConnectionState.Value(self.state),
            )
            sealed = self.me.seal("notice-ack", ack)
            self.seen[notice.header.message_id] = (
                hashlib.sha256(request.envelope.payload).digest(), sealed)
            self.changed.notify_all()
        return pb.NotifyConnectionResponse(envelope=sealed)

    def apply_notice(self, notice) -> None:
        """Section 10's table, on this side's record; FAILED_PRECONDITION when
        the notice does not apply."""
        kind = envelope_pb.NoticeKind.Name(notice.kind)
        moves = {
            "NOTICE_KIND_ACCEPTED": (["CONNECTION_STATE_PENDING"], "CONNECTION_STATE_ACTIVE"),
            "NOTICE_KIND_REJECTED": (["CONNECTION_STATE_PENDING"], "CONNECTION_STATE_REJECTED"),
            "NOTICE_KIND_SUSPENDED": (["CONNECTION_STATE_ACTIVE"], "CONNECTION_STATE_SUSPENDED"),
            "NOTICE_KIND_RESUMED": (["CONNECTION_STATE_SUSPENDED"], "CONNECTION_STATE_ACTIVE"),
            "NOTICE_KIND_DISCONNECTED": (
                ["CONNECTION_STATE_PENDING", "CONNECTION_STATE_ACTIVE",
                 "CONNECTION_STATE_SUSPENDED"], "CONNECTION_STATE_DISCONNECTED"),
        }
        if kind not in moves:
            # KEY_ROTATED: this minimal peer pins the daemon's first key.
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"{kind} is not followed here")
        if not printable(notice.reason):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "reason is not printable")
        applies_to, becomes = moves[kind]
        if self.state not in applies_to:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{kind} does not apply to a connection that is {self.state}")
        self.state = becomes
        if kind == "NOTICE_KIND_ACCEPTED":
            self.granted = list(notice.granted_capabilities)
        self.notices.append(kind)
        step(f"notice {kind} from the daemon: this side is {becomes}")

    def on_ping(self, request, context):
        with self.changed:
            try:
                ping, _ = self.receive(context, request, envelope_pb.PingPayload, "ping")
            except Refused as refused:
                self.refusals.append(f"Ping: {refused.code.name}: {refused}")
                context.abort(refused.code, str(refused))
            if ping.header.message_id in self.seen:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, "a ping's message id is used once")
            self.seen[ping.header.message_id] = (b"", None)
            sealed = self.me.seal("ping", envelope_pb.PingPayload(
                header=self.reply_header(ping.header)))
            self.pings_answered += 1
            self.changed.notify_all()
        return pb.PingResponse(envelope=sealed)


def notice_problem(notice) -> "str | None":
    if notice.kind not in envelope_pb.NoticeKind.values() or notice.kind == 0:
        return "kind is not set or not known"
    if notice.kind == envelope_pb.NOTICE_KIND_KEY_ROTATED and (
            not notice.HasField("new_key") or not accepted_key(notice.new_key.public_key)
            or not notice.HasField("previous_key_valid_until")):
        return "KEY_ROTATED without an accepted new_key and previous_key_valid_until"
    return capability_list_problem("granted_capabilities", notice.granted_capabilities)


def client_certificate_key(context) -> "bytes | None":
    """The SPKI of the caller's TLS client certificate, as gRPC reports it."""
    certificates = context.auth_context().get("x509_pem_cert") or []
    if not certificates:
        return None
    certificate = x509.load_pem_x509_certificate(certificates[0])
    return spki_as_sent(certificate.public_bytes(serialization.Encoding.DER))


def serve(peer: ConformancePeer, host: str):
    """NotifyConnection and Ping at this peer's URL (section 11), over TLS
    with this peer's certificate. gRPC's C-core can require a client
    certificate but cannot merely ask for one, so the daemon's certificate is
    the one client root: the daemon presents it on every call it makes."""

    class Requester(federation_grpc.FederationServicer):
        def NotifyConnection(self, request, context):  # noqa: N802 (generated name)
            return peer.on_notice(request, context)

        def Ping(self, request, context):  # noqa: N802 (generated name)
            return peer.on_ping(request, context)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    federation_grpc.add_FederationServicer_to_server(Requester(), server)
    credentials = grpc.ssl_server_credentials(
        [(peer.me.private_key_pem, peer.me.certificate_pem)],
        root_certificates=peer.daemon.certificate_pem,
        require_client_auth=True,
    )
    address = f"[{host}]:0" if ":" in host else f"{host}:0"
    port = server.add_secure_port(address, credentials)
    if port == 0:
        raise PeerError(f"cannot listen on {host}")
    server.start()
    peer.me.url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    return server


def run(args: argparse.Namespace) -> dict:
    started = time.monotonic()
    daemon = RemotePeer(args.daemon_url)
    me = LocalIdentity(args.name, args.listen_host)
    peer = ConformancePeer(me, daemon, args.workspace)
    step(f"this peer: instance {me.instance_id}, key id {me.key_id}, "
         f"fingerprint {me.fingerprint}")
    peer.get_instance()
    server = serve(peer, args.listen_host)
    try:
        step(f"serving NotifyConnection and Ping at {me.url}")
        with daemon.channel(me) as channel:
            stub = federation_grpc.FederationStub(channel)
            connection_id = peer.request_connection(stub)
            # The test (or an operator) reads this line to accept the request.
            print(json.dumps({"pending_connection_id": connection_id,
                              "instance_id": me.instance_id}), flush=True)
            peer.wait_until_accepted(args.accept_timeout)
            commands = peer.run_commands(stub, args.agent_type, args.prompt, args.end_timeout)
        peer.wait_for_ping(args.ping_timeout)
    finally:
        server.stop(grace=1).wait()
    if peer.refusals:
        raise PeerError(f"refused messages from the daemon: {peer.refusals}")
    return {
        "instance_id": me.instance_id,
        "fingerprint": me.fingerprint,
        "url": me.url,
        "daemon_instance_id": daemon.instance_id,
        "daemon_key_id": daemon.key_id,
        "workspace": args.workspace,
        "connection_state": peer.state,
        "granted": peer.granted,
        "notices": peer.notices,
        "pings_answered": peer.pings_answered,
        "replies_verified": peer.replies_verified,
        "tampered_refused": peer.tampered_refused,
        "commands": commands,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("daemon_url", help="the daemon's URL, https://HOST[:PORT]")
    parser.add_argument("--workspace", default="conformance", help="workspace to connect in")
    parser.add_argument("--name", default="python-conformance-peer", help="this peer's name")
    parser.add_argument("--listen-host", default="127.0.0.1",
                        help="address to serve on; the daemon calls https://HOST:PORT there")
    parser.add_argument("--agent-type", default="sh", help="an agent type of the daemon")
    parser.add_argument("--prompt", default="sleep 60", help="the agent's prompt")
    parser.add_argument("--accept-timeout", type=float, default=300.0,
                        help="seconds to wait for the daemon's operator to accept")
    parser.add_argument("--end-timeout", type=float, default=30.0,
                        help="seconds to wait for the agent to end after the kill")
    parser.add_argument("--ping-timeout", type=float, default=120.0,
                        help="seconds to wait for a ping (the daemon pings every 60 s)")
    args = parser.parse_args()
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            load_stubs(pathlib.Path(out_dir))
            summary = run(args)
    except (PeerError, OSError, ssl.SSLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
