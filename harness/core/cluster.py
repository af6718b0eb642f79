"""The Ray cluster: joining it (or starting a local one), and checking that every node sees the paths it is given."""

from __future__ import annotations

import os

from harness.core.errors import ConfigError
from harness.core.storage import is_uri

PROBE_TIMEOUT_S = 120
CONNECT_TIMEOUT_ENV = "HARNESS_CONNECT_TIMEOUT_S"
CONNECT_TIMEOUT_S = 10.0  # how long a cluster address may take to answer before the command stops


def connect_timeout() -> float:
    """Seconds a cluster address may take to answer: `$HARNESS_CONNECT_TIMEOUT_S`, else 10."""
    value = os.environ.get(CONNECT_TIMEOUT_ENV, "")
    try:
        timeout = float(value) if value else CONNECT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{CONNECT_TIMEOUT_ENV}={value}: expected a number of seconds") from None
    if timeout <= 0:
        raise ConfigError(f"{CONNECT_TIMEOUT_ENV}={value}: must be above 0")
    return timeout


def _unanswered(address: str, timeout: float, client: bool) -> str | None:
    """Why no Ray cluster answers at `address` (`HOST:PORT`) within `timeout` seconds, or None when one does. A GCS
    is asked for its cluster id (an answer refusing the missing token counts: it is Ray); a Ray Client server
    (`client`) only for a connection."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return "not HOST:PORT"
    with grpc.insecure_channel(address) as channel:
        if client:
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout)
            except grpc.FutureTimeoutError:
                return f"nothing answers there within {timeout:g} s"
            return None
        ask = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId
        try:
            ask(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return f"nothing answers there within {timeout:g} s"
            if code == grpc.StatusCode.UNAVAILABLE:  # the details end with the reason: "Connection refused"
                return f"nothing answers there ({(exc.details() or 'unavailable').rsplit(': ', 1)[-1]})"
            return f"something answers there, but not a Ray cluster ({code.name.lower()})"
    return None


def connect(address: str | None = None, env_vars: dict[str, str] | None = None) -> None:
    """Join the cluster at `address` (a config's or `--address`), else at `$RAY_ADDRESS`, else start a local one,
    unless this process is connected already; `env_vars` reach every worker of this job.

    An address is checked before `ray.init`, which would wait minutes for a cluster that is not there: nothing
    answering within `connect_timeout()` seconds is one ConfigError line naming the address and where it came from.
    """
    import ray

    if ray.is_initialized():
        return
    source, given = ("address", address) if address else ("RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))
    if given and given not in ("auto", "local"):
        where = f"{source} {given}"
        if given.startswith(("http://", "https://")):
            raise ConfigError(
                f"{where}: that is a dashboard (job API) address, for `ray job submit`; the harness joins a cluster "
                "at its GCS address (HOST:6379), or starts a local one when RAY_ADDRESS is unset"
            )
        timeout = connect_timeout()
        problem = _unanswered(given.removeprefix("ray://"), timeout, client=given.startswith("ray://"))
        if problem:
            raise ConfigError(
                f"{where}: no Ray cluster: {problem}; start one with `ray start --head`, give the address of a "
                f"running one, or unset RAY_ADDRESS to start a local cluster (waited {timeout:g} s; "
                f"${CONNECT_TIMEOUT_ENV} sets how long)"
            )
    try:
        ray.init(address=given or None, runtime_env={"env_vars": env_vars} if env_vars else None)
    except ConnectionError as error:
        if given and _refused_for_token(error):
            raise ConfigError(
                f"{source} {given}: the cluster requires token authentication: set RAY_AUTH_MODE=token, with the "
                "cluster's token in ~/.ray/auth_token or $RAY_AUTH_TOKEN (docs/clusters.md)"
            ) from None
        raise


def _refused_for_token(error: BaseException | None) -> bool:
    """Whether Ray's connection error (or one it was raised from) is a cluster refusing a client without its token."""
    while error is not None:
        if "InvalidAuthToken" in str(error) or "Authentication token is missing" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _missing(paths: list[str]) -> list[str]:
    return [path for path in paths if not os.path.exists(path)]


def check_reachable(paths: dict[str, str | None]) -> None:
    """On a cluster of more than one node, refuse a local path that a node cannot see, before any worker or
    actor starts: storage, data and models must be storage URIs (`s3://...`) or on a file system every node
    mounts. Each path that exists here is looked up on every alive node by a zero-CPU task pinned to it (Ray
    Train checks its storage path the same way, but only once its workers run). `paths` maps config keys to
    paths; URIs, hub ids and None are skipped."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    local = {key: path for key, path in paths.items() if path and not is_uri(path) and os.path.exists(path)}
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2 or not local:
        return
    probe = ray.remote(num_cpus=0)(_missing)
    wanted = sorted(set(local.values()))
    lookups = []
    for node in nodes:
        pinned = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        lookups.append((node, probe.options(scheduling_strategy=pinned).remote(wanted)))
    for node, lookup in lookups:
        missing = ray.get(lookup, timeout=PROBE_TIMEOUT_S)
        if missing:
            key = next(key for key, path in local.items() if path == missing[0])
            where = f"{node['NodeManagerAddress']} (node {node['NodeID'][:8]})"
            raise ConfigError(
                f"{key}: {missing[0]}: not found on {where}, one of this cluster's {len(nodes)} nodes; use a storage "
                "URI (s3://...) or a path on a file system that every node mounts"
            )
