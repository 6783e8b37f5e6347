"""Checks the federation protocol's test vectors with another crypto library.

Reads tests/vectors/envelopes.json (see docs/PROTOCOL.md) and checks, without
any of the daemon's code: the key id and fingerprint recomputed from the public
key with hashlib; which public key encodings a key field accepts; how a typed
fingerprint matches; each payload decoded with stubs generated from proto/ at
run time (grpcio-tools) and compared with the fields the vector lists; the
signed bytes rebuilt from the documented layout; every signature verified with
the `cryptography` package (ECDSA P-256 SHA-256 on OpenSSL, after turning the
64-byte r || s into the DER form OpenSSL takes); and every altered envelope
refused or accepted as the vector says. Then it signs each vector's signed
bytes with the test-only key, for the Rust test to verify with ring.

    python check_vectors.py [VECTORS_DIR]

Prints one JSON report on stdout; any mismatch is listed on stderr and exits 1.
"""

import base64
import hashlib
import importlib
import json
import pathlib
import sys
import tempfile

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from google.protobuf import json_format
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
# SubjectPublicKeyInfo DER up to the point: SEQUENCE { SEQUENCE { id-ecPublicKey,
# prime256v1 }, BIT STRING with 0 unused bits }. An accepted key is these 26
# bytes, then 0x04 and the 64 bytes of x and y: 91 bytes in all.
P256_SPKI_PREFIX = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
SPKI_LENGTH = 91
SIGNATURE_LENGTH = 64
FINGERPRINT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def generate_stubs(out_dir: pathlib.Path) -> None:
    proto_root = ROOT / "proto"
    files = [str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto")]
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        ["protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out_dir}", *files]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    sys.path.insert(0, str(out_dir))


def key_id(spki: bytes) -> str:
    """The first 16 bytes of SHA-256 over the SubjectPublicKeyInfo DER, lowercase hex."""
    return hashlib.sha256(spki).digest()[:16].hex()


def fingerprint(spki: bytes) -> str:
    """SHA-256 over the SPKI DER, base32 (RFC 4648), the first 32 characters in
    eight dash-separated groups of four."""
    encoded = base64.b32encode(hashlib.sha256(spki).digest()).decode("ascii")[:32]
    return "-".join(encoded[index:index + 4] for index in range(0, 32, 4))


def normalize_fingerprint(typed: str):
    """What an operator typed, without case, dashes, spaces or colons; None if it
    cannot be a fingerprint."""
    compact = "".join(c for c in typed if c not in "- :").upper()
    if len(compact) != 32 or any(c not in FINGERPRINT_ALPHABET for c in compact):
        return None
    return compact


def key_field_accepts(encoded: bytes) -> bool:
    """Whether a public_key field takes these bytes: the uncompressed P-256 SPKI only."""
    return (
        len(encoded) == SPKI_LENGTH
        and encoded.startswith(P256_SPKI_PREFIX)
        and encoded[len(P256_SPKI_PREFIX)] == 0x04
    )


def signed_bytes(prefix: str, kind: str, payload: bytes) -> bytes:
    return prefix.encode("ascii") + b"\x00" + kind.encode("ascii") + b"\x00" + payload


def verifies(public_key, message: bytes, signature: bytes) -> bool:
    """ECDSA P-256 SHA-256 over message, with the signature as 64 bytes r || s.
    Any other length is refused before verifying (the daemon: INVALID_ARGUMENT)."""
    if len(signature) != SIGNATURE_LENGTH:
        return False
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def sign(private_key, message: bytes) -> bytes:
    """A signature in the wire form: r || s, 32 big-endian bytes each."""
    r, s = decode_dss_signature(private_key.sign(message, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def load_private_key(path: pathlib.Path):
    """The PEM block of the test-only key file (the warning above it is skipped)."""
    text = path.read_text()
    block = text[text.index("-----BEGIN PRIVATE KEY-----"):]
    return serialization.load_pem_private_key(block.encode("ascii"), password=None)


def main() -> None:
    vectors_dir = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "vectors"
    vectors = json.loads((vectors_dir / "envelopes.json").read_text())
    failures = []

    def check(condition: bool, what: str) -> None:
        if not condition:
            failures.append(what)

    with tempfile.TemporaryDirectory() as out_dir:
        generate_stubs(pathlib.Path(out_dir))
        envelope_pb2 = importlib.import_module("mosaic.federation.v1.envelope_pb2")

        def message_class(full_name: str):
            package, _, name = full_name.rpartition(".")
            if package != "mosaic.federation.v1":
                raise SystemExit(f"unexpected message {full_name}")
            return getattr(envelope_pb2, name)

        key = vectors["key"]
        spki = bytes.fromhex(key["spki_der_hex"])
        check(base64.b64decode(key["spki_der_base64"]) == spki, "key: base64 and hex differ")
        check(hashlib.sha256(spki).hexdigest() == key["spki_sha256_hex"], "key: SHA-256 of the SPKI")
        check(key_id(spki) == key["key_id"], f"key: key id {key_id(spki)} != {key['key_id']}")
        check(
            fingerprint(spki) == key["fingerprint"],
            f"key: fingerprint {fingerprint(spki)} != {key['fingerprint']}",
        )
        check(key_field_accepts(spki), "key: the vector's own SPKI is not accepted")
        public_key = serialization.load_der_public_key(spki)
        check(isinstance(public_key.curve, ec.SECP256R1), "key: not a P-256 key")
        private_key = load_private_key(vectors_dir / key["private_key_file"])
        check(
            private_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            == spki,
            "key: the test-only private key is not the key of the vectors",
        )
        point = public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )

        for encoding in vectors["key_encodings"]:
            encoded = bytes.fromhex(encoding["bytes_hex"])
            name = encoding["name"]
            check(
                key_field_accepts(encoded) == encoding["accepted"],
                f"key encoding {name}: accepted should be {encoding['accepted']}",
            )
            # Accepted or not, each is the same key: only the form is refused.
            if name == "raw-uncompressed-point":
                same = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), encoded)
            else:
                same = serialization.load_der_public_key(encoded)
            check(
                same.public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                )
                == point,
                f"key encoding {name}: not the vectors' key",
            )

        for spelling in vectors["fingerprint_spellings"]:
            typed = normalize_fingerprint(spelling["typed"])
            matches = typed is not None and typed == normalize_fingerprint(fingerprint(spki))
            check(
                matches == spelling["matches"],
                f"fingerprint spelling {spelling['typed']!r}: matches should be {spelling['matches']}",
            )

        prefix = vectors["domain_prefix"]
        check(prefix == "mosaic-federation-v1", f"domain prefix {prefix!r}")
        verified, signatures = [], []
        for vector in vectors["envelopes"]:
            name = vector["name"]
            payload = bytes.fromhex(vector["payload_hex"])
            signed = signed_bytes(prefix, vector["kind"], payload)
            check(signed.hex() == vector["signed_bytes_hex"], f"{name}: signed bytes")
            signature = bytes.fromhex(vector["signature_hex"])
            valid = verifies(public_key, signed, signature)
            check(valid == vector["valid"], f"{name}: verifies should be {vector['valid']}")
            # Decoded from the exact bytes (never re-encoded): the fields listed.
            message = message_class(vector["message"]).FromString(payload)
            decoded = json_format.MessageToDict(message, preserving_proto_field_name=True)
            check(
                decoded == vector["fields"],
                f"{name}: decoded fields differ:\n{json.dumps(decoded, indent=1)}",
            )
            check(message.header.key_id == key["key_id"], f"{name}: header.key_id")
            check(vector["key_id"] == message.header.key_id, f"{name}: envelope key_id")
            if valid:
                verified.append(name)
            fresh = sign(private_key, signed)
            check(verifies(public_key, signed, fresh), f"{name}: own signature")
            signatures.append({"name": name, "signature_hex": fresh.hex()})

        refused, accepted = [], []
        for altered in vectors["altered_envelopes"]:
            name = altered["name"]
            payload = bytes.fromhex(altered["payload_hex"])
            signature = bytes.fromhex(altered["signature_hex"])
            # The altered payload still decodes as the message named.
            message_class(altered["message"]).FromString(payload)
            valid = verifies(public_key, signed_bytes(prefix, altered["kind"], payload), signature)
            check(valid == altered["valid"], f"{name}: verifies should be {altered['valid']}")
            (accepted if valid else refused).append(name)

    if failures:
        print("\n".join(failures), file=sys.stderr)
        raise SystemExit(1)
    print(json.dumps({
        "key_id": key_id(spki),
        "fingerprint": fingerprint(spki),
        "envelopes_verified": verified,
        "altered_refused": refused,
        "altered_accepted": accepted,
        "key_encodings_checked": len(vectors["key_encodings"]),
        "fingerprint_spellings_checked": len(vectors["fingerprint_spellings"]),
        "signatures": signatures,
    }))


if __name__ == "__main__":
    main()
