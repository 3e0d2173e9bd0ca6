"""A Ray that rungwise starts itself listens on 127.0.0.1 only.

Ray's servers (GCS, raylet and object manager, every worker's gRPC server, the dashboard
agent, the runtime-env agent, the metrics servers of the dashboard and the autoscaler) bind to
127.0.0.1 when the node's address is 127.0.0.1, and to every interface otherwise. Ray 2.60 has
no public setting for it: ``ray.init(_node_ip_address="127.0.0.1")`` is turned back into the
machine's address. The node's address is loopback where Ray's constant ``ENABLE_RAY_CLUSTER``
is false, which is Ray's own default on macOS and Windows (where it does not support
multi-node clusters). ``loopback_node`` sets it in the driver for the length of ``ray.init``
only: the processes that ``ray.init`` starts take the address from their arguments, and a
``ray start`` run later (or by a child process) is unaffected. Joining a cluster is untouched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def starts_local_ray(address: str | None) -> bool:
    """``ray.init(address=address)`` starts a new local instance rather than joining one."""
    return address in (None, "local") and not os.environ.get("RAY_ADDRESS")


@contextmanager
def loopback_node(address: str | None) -> Iterator[None]:
    """Around ``ray.init(address=address)``: a new local node gets the address 127.0.0.1."""
    from ray._private import ray_constants

    if not starts_local_ray(address):
        yield
        return
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
