"""A multi-node Ray test cluster on this machine, run by a child process that a test drives over stdin.

``ray.cluster_utils.Cluster`` starts a head and worker nodes, each its own raylet with its own resources and
object store (all on 127.0.0.1). The process that made the nodes must stay alive to kill one, so the cluster
lives in this script, and tests use :class:`tests.multinode.MultiNodeCluster`, which speaks this protocol:

    add NAME CPUS [GPUS]   start a node with CPUS CPUs, GPUS GPUs and the custom resource {NAME: 1}
    kill NAME              SIGKILL every process of that node (raylet, object store, its workers)
    quit                   stop every node of this cluster, and only those

Every answer is one JSON line; the first line (before any command) describes the head.
"""

from __future__ import annotations

import json
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    from ray.cluster_utils import Cluster

    head_cpus, temp_dir = float(sys.argv[1]), sys.argv[2]
    dashboard = free_port()
    # every fixed default port of a head gets a free one: the test session's own cluster holds the defaults
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "resources": {"head": 1}, "include_dashboard": True, "dashboard_port": dashboard,
        "dashboard_host": "127.0.0.1", "object_store_memory": 200 * 2**20, "temp_dir": temp_dir,
        "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
        "runtime_env_agent_port": free_port()})
    nodes = {"head": cluster.head_node}
    print(json.dumps({"gcs": cluster.address, "dashboard": f"http://127.0.0.1:{dashboard}",
                      "node_id": cluster.head_node.node_id}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        try:
            if cmd[0] == "add":
                name, cpus = cmd[1], float(cmd[2])
                gpus = float(cmd[3]) if len(cmd) > 3 else 0
                node = cluster.add_node(num_cpus=cpus, num_gpus=gpus, resources={name: 1},
                                        object_store_memory=150 * 2**20)
                nodes[name] = node
                answer = {"ok": True, "node_id": node.node_id}
            elif cmd[0] == "kill":
                cluster.remove_node(nodes.pop(cmd[1]), allow_graceful=False)
                answer = {"ok": True}
            elif cmd[0] == "quit":
                break
            else:
                answer = {"ok": False, "error": f"unknown command {cmd[0]!r}"}
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    cluster.shutdown()


if __name__ == "__main__":
    main()
