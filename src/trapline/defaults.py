"""Default ports of the five services on one machine (each overridable with TRAPLINE_<SERVICE>_PORT)."""

PORTS: dict[str, int] = {
    "orchestrator": 50050,
    "detector": 50051,
    "embedder": 50052,
    "selector": 50053,
    "trainer": 50054,
}
