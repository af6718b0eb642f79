"""Helpers of the tests that start their own Ray nodes with `ray start --block`."""

import os
import signal
import socket
import subprocess
from pathlib import Path

from torch.utils.cpp_extension import get_default_build_root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_ray_node(node: subprocess.Popen, grace_s: float = 10) -> None:
    """Stop a `ray start --block` node (started in a session of its own) the way `ray stop` does: SIGTERM to the
    `ray start` process, which stops its raylet first and then the rest (about 3 s), and SIGKILL to its whole
    session after `grace_s`. SIGTERM to the whole session instead killed the GCS under the raylet, which then waited
    about 30 s for it to come back; a head whose cluster had run training jobs also took 32 s to stop alone."""
    if node.poll() is not None:
        return
    node.send_signal(signal.SIGTERM)
    try:
        node.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()


def suite_build_cache() -> dict[str, str]:
    """Environment for a test node or job in an empty HOME: the suite's cache root, where torch keeps DeepSpeed's
    JIT-built CPU op (a minute to build). TORCH_EXTENSIONS_DIR would not do: torch builds into it without the
    `py311_cpu` level it adds under the default root, so the op was built twice per suite."""
    return {"XDG_CACHE_HOME": str(Path(get_default_build_root()).parent)}
