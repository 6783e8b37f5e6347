// The whole client flow against a mosaicd with @grpc/grpc-js and
// @grpc/proto-loader: read the instance identity over TLS pinned to the
// daemon's certificate, create a job, start a local agent for it, watch the
// agent to its end, and complete or fail the job with what the agent did.
//
//   npm install                       # in this directory, or anywhere with NODE_PATH
//   MOSAIC_API_KEY=... node full_flow.js HOST:PORT CERT.pem
//   node full_flow.js HOST:PORT CERT.pem --api-key KEY --agent-type sh \
//       --prompt 'echo hello from node'
//
// The API key needs the `coordinator` and `agents` scopes (`mosaicd apikey
// create --name demo --scope coordinator,agents`); CERT.pem is the daemon's
// certificate (`mosaicd identity cert`, or `<data_dir>/tls/cert.pem`). The agent
// type must be configured on the daemon. The daemon's certificate names
// `localhost`, 127.0.0.1 and ::1; with an IP address Node warns (DEP0123)
// because grpc-js passes the address as TLS server name (grpc/grpc-node#1919):
// harmless, and `localhost:PORT` avoids it.
//
// proto-loader reads proto/ at run time, so nothing generated is committed.
// Progress goes to stderr, one line per step; the summary is one JSON object on
// stdout. Any failed call, or an agent that did not complete, exits non-zero.

'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const CALL_TIMEOUT_MS = 10_000;
const TERMINAL_AGENT_STATES = new Set([
  'AGENT_STATE_COMPLETED',
  'AGENT_STATE_FAILED',
  'AGENT_STATE_KILLED',
  'AGENT_STATE_TIMED_OUT',
]);

/** A step that did not go as it should; the message says which and why. */
class FlowError extends Error {}

function protoFiles(directory) {
  return fs.readdirSync(directory, { withFileTypes: true, recursive: true })
    .filter((entry) => entry.isFile() && entry.name.endsWith('.proto'))
    .map((entry) => path.relative(PROTO_ROOT, path.join(entry.parentPath ?? entry.path, entry.name)));
}

function loadServices() {
  const definition = protoLoader.loadSync(protoFiles(PROTO_ROOT), {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).mosaic;
}

/** The daemon's fingerprint format: SHA-256 of the key, base32 (RFC 4648),
 * first 32 characters, in groups of four. */
function fingerprintOf(spkiDer) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  const digest = crypto.createHash('sha256').update(spkiDer).digest();
  let bits = 0;
  let buffer = 0;
  let encoded = '';
  for (const byte of digest) {
    buffer = ((buffer << 8) | byte) & 0xffff;
    bits += 8;
    while (bits >= 5) {
      bits -= 5;
      encoded += alphabet[(buffer >> bits) & 0x1f];
    }
  }
  return encoded.slice(0, 32).match(/.{4}/g).join('-');
}

function step(message) {
  process.stderr.write(`${message}\n`);
}

/** One unary call as a promise; a failure becomes a FlowError naming the RPC
 * and status. */
function call(name, client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    const options = { deadline: Date.now() + CALL_TIMEOUT_MS };
    client[method](request, metadata ?? new grpc.Metadata(), options, (error, response) => {
      if (error) {
        reject(new FlowError(`${name} failed: ${grpc.status[error.code]}: ${error.details}`));
      } else {
        resolve(response);
      }
    });
  });
}

/** Follows WatchAgent to its end; resolves with the agent in its terminal
 * state and the output lines streamed on the way. */
function watchAgent(agents, agentId, metadata, timeoutMs) {
  return new Promise((resolve, reject) => {
    const streamedLines = [];
    let finalAgent = null;
    const stream = agents.WatchAgent(
      { agent_id: agentId, include_output: true },
      metadata,
      { deadline: Date.now() + timeoutMs },
    );
    stream.on('data', (event) => {
      if (event.event === 'output_line') {
        streamedLines.push(event.output_line.line);
        step(`  agent> ${event.output_line.line}`);
      } else if (event.event === 'state_change') {
        const toState = event.state_change.to_state;
        step(`agent ${agentId} is ${toState}`);
        if (TERMINAL_AGENT_STATES.has(toState)) {
          finalAgent = event.state_change.agent;
        }
      }
    });
    stream.on('error', (error) => {
      reject(new FlowError(`WatchAgent failed: ${grpc.status[error.code]}: ${error.details}`));
    });
    stream.on('end', () => {
      if (finalAgent === null) {
        reject(new FlowError('WatchAgent ended before the agent reached a terminal state'));
      } else {
        resolve({ finalAgent, streamedLines });
      }
    });
  });
}

async function run(options, apiKey) {
  const mosaic = loadServices();
  const certificatePem = fs.readFileSync(options.certificate);
  // The daemon's own certificate is the only trusted root: this is the pin.
  const credentials = grpc.credentials.createSsl(certificatePem);
  // grpc-js shares one connection between clients of the same address.
  const federation = new mosaic.federation.v1.Federation(options.address, credentials);
  const coordinator = new mosaic.coordinator.v1.Coordinator(options.address, credentials);
  const agents = new mosaic.agent.v1.AgentControl(options.address, credentials);
  const auth = new grpc.Metadata();
  auth.set('authorization', `Bearer ${apiKey}`);

  try {
    const { instance } = await call('GetInstance', federation, 'GetInstance', {});
    if (fingerprintOf(instance.public_key) !== instance.fingerprint) {
      throw new FlowError('GetInstance: the fingerprint does not match the public key');
    }
    // The key the instance names is the key of the certificate we pinned.
    const certificateKey = new crypto.X509Certificate(certificatePem).publicKey
      .export({ type: 'spki', format: 'der' });
    if (!certificateKey.equals(instance.public_key)) {
      throw new FlowError('GetInstance: the instance key is not the key of the pinned certificate');
    }
    step(`instance ${instance.instance_id} (${instance.name}), fingerprint ${instance.fingerprint}`);

    let { job } = await call('CreateJob', coordinator, 'CreateJob', {
      job_type: 'node-example',
      payload_json: JSON.stringify({ agent_type: options.agentType, prompt: options.prompt }),
      labels: { client: 'node' },
    }, auth);
    step(`created job ${job.job_id} (${job.state})`);
    await call('UpdateJobStatus', coordinator, 'UpdateJobStatus', {
      job_id: job.job_id, state: 'JOB_STATE_RUNNING', message: 'agent starting',
    }, auth);
    step(`job ${job.job_id} is RUNNING`);

    const { agent } = await call('Spawn', agents, 'Spawn', {
      agent_type: options.agentType,
      prompt: options.prompt,
      task_id: job.job_id,
      labels: { client: 'node' },
    }, auth);
    step(`spawned agent ${agent.agent_id} (${agent.state})`);

    const { finalAgent, streamedLines } = await watchAgent(
      agents, agent.agent_id, auth, options.watchTimeoutMs,
    );
    const finalState = finalAgent.state;
    const output = finalAgent.output_tail;
    if (finalState === 'AGENT_STATE_COMPLETED') {
      ({ job } = await call('CompleteJob', coordinator, 'CompleteJob', {
        job_id: job.job_id,
        result_json: JSON.stringify({ agent_id: finalAgent.agent_id, output }),
      }, auth));
    } else {
      ({ job } = await call('FailJob', coordinator, 'FailJob', {
        job_id: job.job_id,
        error: `agent ${finalAgent.agent_id} ended ${finalState}: ${finalAgent.state_reason}`,
      }, auth));
    }
    step(`job ${job.job_id} is ${job.state}`);

    const summary = {
      instance_id: instance.instance_id,
      fingerprint: instance.fingerprint,
      job_id: job.job_id,
      job_state: job.state,
      agent_id: finalAgent.agent_id,
      agent_state: finalState,
      // proto3 `optional`: set only when the process exited on its own.
      exit_code: finalAgent._exit_code === 'exit_code' ? finalAgent.exit_code : null,
      output,
      streamed_lines: streamedLines,
    };
    process.stdout.write(`${JSON.stringify(summary)}\n`);
    if (finalState !== 'AGENT_STATE_COMPLETED') {
      throw new FlowError(`agent ${finalAgent.agent_id} ended ${finalState}`);
    }
  } finally {
    agents.close();
    coordinator.close();
    federation.close();
  }
}

function parseOptions() {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      'api-key': { type: 'string' },
      'agent-type': { type: 'string', default: 'sh' },
      prompt: { type: 'string', default: 'echo hello from the node client' },
      'watch-timeout': { type: 'string', default: '120' },
    },
  });
  if (positionals.length !== 2) {
    throw new FlowError('usage: node full_flow.js HOST:PORT CERT.pem [--api-key KEY] '
      + '[--agent-type TYPE] [--prompt TEXT] [--watch-timeout SECONDS]');
  }
  const watchTimeoutSeconds = Number(values['watch-timeout']);
  if (!(watchTimeoutSeconds > 0)) {
    throw new FlowError('--watch-timeout must be a positive number of seconds');
  }
  return {
    address: positionals[0],
    certificate: positionals[1],
    apiKey: values['api-key'] ?? process.env.MOSAIC_API_KEY ?? '',
    agentType: values['agent-type'],
    prompt: values.prompt,
    watchTimeoutMs: watchTimeoutSeconds * 1000,
  };
}

async function main() {
  let options;
  try {
    options = parseOptions();
  } catch (error) {
    step(`error: ${error.message}`);
    return 2;
  }
  if (!options.apiKey) {
    step('error: no API key: pass --api-key or set MOSAIC_API_KEY');
    return 2;
  }
  try {
    await run(options, options.apiKey);
    return 0;
  } catch (error) {
    // FlowError says which step failed; anything else (an unreadable
    // certificate file, a proto that does not load) is reported as is.
    step(`error: ${error.message}`);
    return 1;
  }
}

main().then((code) => {
  process.exitCode = code;
});
