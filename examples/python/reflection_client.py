"""A client that knows only the daemon's address (and its certificate, as
`grpcurl -cacert` does): it discovers the services through server reflection,
builds the message classes from what the server describes, and calls
Federation.GetInstance and grpc.health.v1.Health/Check. No generated code.

    python reflection_client.py HOST:PORT CERT.pem
"""

import json
import pathlib
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def unary(channel, pool, service_name, method_name, request_fields):
    service = pool.FindServiceByName(service_name)
    method = service.FindMethodByName(method_name)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{service_name}/{method_name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    return call(request_class(**request_fields), timeout=10)


def main() -> None:
    address, cert_path = sys.argv[1], sys.argv[2]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pathlib.Path(cert_path).read_bytes()
    )
    with grpc.secure_channel(address, credentials) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        instance = unary(
            channel, pool, "mosaic.federation.v1.Federation", "GetInstance", {}
        ).instance
        health = unary(
            channel, pool, "grpc.health.v1.Health", "Check",
            {"service": "mosaic.federation.v1.Federation"},
        )
        print(json.dumps({
            "services": services,
            "instance": json_format.MessageToDict(instance),
            "health": json_format.MessageToDict(health),
        }))


if __name__ == "__main__":
    main()
