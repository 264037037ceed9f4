"""edgellm-agent: the device daemon (no torch, no edgellm.pipeline; see docs/agent.md).

    config       data-dir layout and AgentConfig (config.json)
    provision    pin the trust root, API token, device key pair + CSR
    slots        A/B slots and the atomic slot pointer (state.json), trial boot counter
    source       verified bundles: TUF online (edgellm.trust.TufClient) and signed envelopes offline
    install      the one install path: unpack -> child-process health check -> atomic switch
    health       the health check (runs as ``python -m agent.health``)
    engine       the single worker that owns the Runtime, bounded queue, hot swap
    schemas      typed, bounded request bodies and the one UpdateRequest
    errors       the agent's exception tree (drawn in its docstring)
    api/         the OpenAI-compatible FastAPI app, one router per area, and its guarded uvicorn server
    daemon       `run`: sockets, uvicorn, update loop, reconcile/hot swap, telemetry bridge
    cli          the `edgellm-agent` command
    telemetry_bridge  the daemon's view of telemetry (a Protocol) and the stand-in that says why it is off
    telemetry/   MQTT telemetry: client (interface), connection (MQTT + outbox pump), commands (registry)

Importing ``agent`` imports nothing heavy.
"""
