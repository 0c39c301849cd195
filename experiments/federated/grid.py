"""An in-process Flower ``Grid``: each message goes straight to a ``ClientApp``, one at a time.

Flower's own ``run_simulation`` runs the ``ClientApp`` objects in Ray actors, and ``flwr
run`` starts a SuperLink that keeps running; on a shared two-core machine both cost more
than the clients' training and neither is deterministic in its order. This grid implements
Flower's ``Grid`` interface (``flwr.serverapp.Grid``), so the same ``ServerApp``,
``ClientApp`` and strategies (Flower's, and ``ClairStrategy``) run unchanged; the clients run
sequentially in the calling process, in node order, with a ``Context`` per node that lives
for the whole run.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import count

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    """Nodes ``1..n_nodes``, each running ``client_app`` in this process."""

    def __init__(self, client_app: ClientApp, n_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            node: Context(run_id=run_id, node_id=node, node_config={}, state=RecordDict(), run_config={})
            for node in range(1, n_nodes + 1)
        }
        self._ids = count(1)
        self._replies: dict[str, Message] = {}
        # The identity of the ServerApp's process, as Flower's own runtimes set it (messages read it).
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            msg_id = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = msg_id
            node = msg.metadata.dst_node_id
            if node not in self.contexts:
                raise ValueError(f"no node {node} in this grid")
            reply = self.client_app(msg, self.contexts[node])
            reply.metadata.__dict__["_message_id"] = f"r{msg_id}"
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
