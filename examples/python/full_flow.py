"""The whole client flow against a mosaicd, with stubs generated from proto/:
read the instance identity over TLS pinned to the daemon's certificate, create
a job, start a local agent for it, watch the agent to its end, and complete or
fail the job with what the agent did.

    MOSAIC_API_KEY=... python full_flow.py HOST:PORT CERT.pem
    python full_flow.py HOST:PORT CERT.pem --api-key KEY --agent-type sh \
        --prompt 'echo hello from python'

The API key needs the `coordinator` and `agents` scopes (`mosaicd apikey create
--name demo --scope coordinator,agents`); CERT.pem is the daemon's certificate
(`mosaicd identity cert`, or `<data_dir>/tls/cert.pem`). The agent type must be
configured on the daemon, e.g. `[agents.types.sh] command = ["/bin/sh", "-c",
"{prompt}"]`.

Stubs are generated with grpcio-tools into a temporary directory at run time,
so nothing generated is committed. Progress goes to stderr, one line per step;
the summary is one JSON object on stdout. Any failed call, or an agent that did
not complete, exits non-zero.
"""

import argparse
import base64
import hashlib
import importlib
import json
import os
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]
CALL_TIMEOUT_SECONDS = 10
TERMINAL_AGENT_STATES = {
    "AGENT_STATE_COMPLETED",
    "AGENT_STATE_FAILED",
    "AGENT_STATE_KILLED",
    "AGENT_STATE_TIMED_OUT",
}


class FlowError(Exception):
    """A step that did not go as it should; the message says which and why."""


def generate_stubs(out_dir: pathlib.Path) -> None:
    proto_root = ROOT / "proto"
    files = [str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto")]
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    status = protoc.main(
        ["protoc", f"-I{proto_root}", f"-I{well_known}",
         f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    )
    if status != 0:
        raise FlowError(f"protoc failed with status {status}")
    sys.path.insert(0, str(out_dir))


def fingerprint_of(spki_der: bytes) -> str:
    """The daemon's fingerprint format: SHA-256 of the key, base32, first 32
    characters, in groups of four."""
    encoded = base64.b32encode(hashlib.sha256(spki_der).digest()).decode()[:32]
    return "-".join(encoded[i:i + 4] for i in range(0, 32, 4))


def step(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def call(name: str, method, request, metadata):
    """One unary call; a failure becomes a FlowError naming the RPC and status."""
    try:
        return method(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
    except grpc.RpcError as error:
        raise FlowError(f"{name} failed: {error.code().name}: {error.details()}") from None


def run(args: argparse.Namespace, api_key: str) -> dict:
    pb = {
        name: importlib.import_module(f"mosaic.{package}.v1.{name}_pb2")
        for package, name in [("federation", "federation"), ("agent", "agent"),
                              ("coordinator", "coordinator")]
    }
    stubs = {
        name: importlib.import_module(f"mosaic.{package}.v1.{name}_pb2_grpc")
        for package, name in [("federation", "federation"), ("agent", "agent"),
                              ("coordinator", "coordinator")]
    }
    agent_states = pb["agent"].AgentState
    job_states = pb["coordinator"].JobState

    certificate_pem = pathlib.Path(args.certificate).read_bytes()
    # The daemon's own certificate is the only trusted root: this is the pin.
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate_pem)
    auth = [("authorization", f"Bearer {api_key}")]
    with grpc.secure_channel(args.address, credentials) as channel:
        federation = stubs["federation"].FederationStub(channel)
        coordinator = stubs["coordinator"].CoordinatorStub(channel)
        agents = stubs["agent"].AgentControlStub(channel)

        instance = call("GetInstance", federation.GetInstance,
                        pb["federation"].GetInstanceRequest(), None).instance
        if fingerprint_of(instance.public_key) != instance.fingerprint:
            raise FlowError("GetInstance: the fingerprint does not match the public key")
        # The SubjectPublicKeyInfo the instance names appears byte for byte in
        # the certificate we pinned: the identity is the TLS key.
        certificate_der = pem_to_der(certificate_pem)
        if instance.public_key not in certificate_der:
            raise FlowError("GetInstance: the instance key is not the key of the pinned certificate")
        step(f"instance {instance.instance_id} ({instance.name}), "
             f"fingerprint {instance.fingerprint}")

        job = call("CreateJob", coordinator.CreateJob, pb["coordinator"].CreateJobRequest(
            job_type="python-example",
            payload_json=json.dumps({"agent_type": args.agent_type, "prompt": args.prompt}),
            labels={"client": "python"},
        ), auth).job
        step(f"created job {job.job_id} ({job_states.Name(job.state)})")
        call("UpdateJobStatus", coordinator.UpdateJobStatus,
             pb["coordinator"].UpdateJobStatusRequest(
                 job_id=job.job_id, state=job_states.Value("JOB_STATE_RUNNING"),
                 message="agent starting"), auth)
        step(f"job {job.job_id} is RUNNING")

        agent = call("Spawn", agents.Spawn, pb["agent"].SpawnRequest(
            agent_type=args.agent_type, prompt=args.prompt, task_id=job.job_id,
            labels={"client": "python"},
        ), auth).agent
        step(f"spawned agent {agent.agent_id} ({agent_states.Name(agent.state)})")

        final_agent = None
        streamed_lines = []
        try:
            stream = agents.WatchAgent(
                pb["agent"].WatchAgentRequest(agent_id=agent.agent_id, include_output=True),
                metadata=auth, timeout=args.watch_timeout,
            )
            for event in stream:
                if event.HasField("output_line"):
                    streamed_lines.append(event.output_line.line)
                    step(f"  agent> {event.output_line.line}")
                else:
                    change = event.state_change
                    to_state = agent_states.Name(change.to_state)
                    step(f"agent {agent.agent_id} is {to_state}")
                    if to_state in TERMINAL_AGENT_STATES:
                        final_agent = change.agent
        except grpc.RpcError as error:
            raise FlowError(f"WatchAgent failed: {error.code().name}: {error.details()}") from None
        if final_agent is None:
            raise FlowError("WatchAgent ended before the agent reached a terminal state")

        final_state = agent_states.Name(final_agent.state)
        output = list(final_agent.output_tail)
        if final_state == "AGENT_STATE_COMPLETED":
            job = call("CompleteJob", coordinator.CompleteJob, pb["coordinator"].CompleteJobRequest(
                job_id=job.job_id,
                result_json=json.dumps({"agent_id": final_agent.agent_id, "output": output}),
            ), auth).job
        else:
            job = call("FailJob", coordinator.FailJob, pb["coordinator"].FailJobRequest(
                job_id=job.job_id,
                error=f"agent {final_agent.agent_id} ended {final_state}: {final_agent.state_reason}",
            ), auth).job
        step(f"job {job.job_id} is {job_states.Name(job.state)}")

    summary = {
        "instance_id": instance.instance_id,
        "fingerprint": instance.fingerprint,
        "job_id": job.job_id,
        "job_state": job_states.Name(job.state),
        "agent_id": final_agent.agent_id,
        "agent_state": final_state,
        "exit_code": final_agent.exit_code if final_agent.HasField("exit_code") else None,
        "output": output,
        "streamed_lines": streamed_lines,
    }
    if final_state != "AGENT_STATE_COMPLETED":
        print(json.dumps(summary))
        raise FlowError(f"agent {final_agent.agent_id} ended {final_state}")
    return summary


def pem_to_der(pem: bytes) -> bytes:
    """The DER bytes of the first certificate in a PEM file."""
    text = pem.decode("ascii")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    if begin not in text or end not in text:
        raise FlowError("the certificate file holds no PEM certificate")
    body = text.split(begin, 1)[1].split(end, 1)[0]
    return base64.b64decode("".join(body.split()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="HOST:PORT of the daemon")
    parser.add_argument("certificate", help="the daemon's certificate (PEM), pinned as the only root")
    parser.add_argument("--api-key", help="API key with coordinator and agents scopes "
                        "(default: $MOSAIC_API_KEY)")
    parser.add_argument("--agent-type", default="sh", help="a configured agent type (default: sh)")
    parser.add_argument("--prompt", default="echo hello from the python client",
                        help="the agent's prompt")
    parser.add_argument("--watch-timeout", type=float, default=120.0,
                        help="seconds to wait for the agent to end (default: 120)")
    args = parser.parse_args()
    api_key = args.api_key or os.environ.get("MOSAIC_API_KEY", "")
    if not api_key:
        print("error: no API key: pass --api-key or set MOSAIC_API_KEY", file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory() as out_dir:
            generate_stubs(pathlib.Path(out_dir))
            summary = run(args, api_key)
    except (FlowError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
