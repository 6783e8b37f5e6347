"""Calls GetInstance and grpc.health.v1 on a mosaicd over TLS, pinned to its certificate.

Uses gRPC's C-core TLS stack (grpcio), the one most generated stubs in other
languages use. Stubs are generated at run time from proto/ with grpcio-tools, so
nothing generated is committed.

    python check_identity.py HOST:PORT CERT.pem

Prints one JSON object: the instance identity and the health of each service.
"""

import importlib
import json
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICES = [
    "mosaic.federation.v1.Federation",
    "mosaic.agent.v1.AgentControl",
    "mosaic.coordinator.v1.Coordinator",
]


def generate_stubs(out_dir: pathlib.Path) -> None:
    proto_root = ROOT / "proto"
    files = [str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto")]
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        ["protoc", f"-I{proto_root}", f"-I{well_known}",
         f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    sys.path.insert(0, str(out_dir))


def main() -> None:
    address, cert_path = sys.argv[1], sys.argv[2]
    with tempfile.TemporaryDirectory() as out_dir:
        generate_stubs(pathlib.Path(out_dir))
        federation_pb2 = importlib.import_module("mosaic.federation.v1.federation_pb2")
        federation_grpc = importlib.import_module("mosaic.federation.v1.federation_pb2_grpc")
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415 (after sys.path)

        credentials = grpc.ssl_channel_credentials(
            root_certificates=pathlib.Path(cert_path).read_bytes()
        )
        with grpc.secure_channel(address, credentials) as channel:
            federation = federation_grpc.FederationStub(channel)
            instance = federation.GetInstance(
                federation_pb2.GetInstanceRequest(), timeout=10
            ).instance
            health = health_pb2_grpc.HealthStub(channel)
            statuses = {
                name: health_pb2.HealthCheckResponse.ServingStatus.Name(
                    health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
                )
                for name in SERVICES
            }
    print(json.dumps({
        "instance_id": instance.instance_id,
        "name": instance.name,
        "public_key_hex": instance.public_key.hex(),
        "fingerprint": instance.fingerprint,
        "health": statuses,
    }))


if __name__ == "__main__":
    main()
