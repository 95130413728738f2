"""The bus on a 3-node JetStream cluster (deploy/): replicated stream, a node lost, nothing lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from test_bus import progress

from shared.bus import Bus
from shared.config import Nats
from shared.events import STREAM, decode
from shared.nats_server import EmbeddedServer, free_port

NODES = 3


def start_cluster(tmp_path: Path) -> list[EmbeddedServer]:
    routes = [free_port() for _ in range(NODES)]
    route_urls = ",".join(f"nats://127.0.0.1:{port}" for port in routes)
    return [EmbeddedServer(tmp_path / f"node{i}", args=["--server_name", f"node{i}", "--cluster_name", "test",
                                                         "--cluster", f"nats://127.0.0.1:{routes[i]}",
                                                         "--routes", route_urls]).start()
            for i in range(NODES)]


async def retry(action, timeout: float = 30.0):
    """Cluster operations wait for elections: the meta leader at start, a stream leader after a loss."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await action()
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)


async def test_replicated_stream_survives_the_loss_of_a_node(tmp_path: Path):
    nodes = start_cluster(tmp_path)
    try:
        urls = Nats(servers=",".join(node.url for node in nodes)).urls
        bus = await Bus.connect(urls, "test")
        await retry(lambda: bus.ensure_stream(replicas=NODES))
        events = [progress("r1", step) for step in range(20)]
        for event in events[:10]:
            await retry(lambda event=event: bus.publish(event))
        nodes[0].stop()
        for event in events[10:]:
            await bus.publish_until_stored(event)
        info = await retry(lambda: bus.js.stream_info(STREAM))
        assert info.config.num_replicas == NODES and info.state.messages == 20
        replayed = [decode(item.subject, item.data) async for item in bus.replay()]
        assert replayed == events
        await bus.close()
    finally:
        for node in nodes:
            node.stop()
