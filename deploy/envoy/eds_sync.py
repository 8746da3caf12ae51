"""Sidecar of the Envoy router: the telemetry tasks from Cloud Map's API into Envoy's EDS file.

    python eds_sync.py --namespace restartix.local --service telemetry \
        --out /etc/envoy/eds/telemetry.json

Every ``--interval`` seconds it calls ``servicediscovery:DiscoverInstances`` (the API,
not DNS: no 8-record multivalue cap; up to 1,000 instances per call) and, when the set
of addresses changed, replaces the EDS file atomically (write a temporary file in the
same directory, then rename it over the old one): Envoy watches the directory and
reloads the cluster. Envoy keys its ring by address, so replicas that read the same
set agree on every session whatever order the API lists them in.

An address missing from one answer is kept for ``--hold`` seconds (a hiccup of the API
must not move sessions); Envoy's own health checks on ``/v1/readyz`` are what take a
draining task off the ring. If the API fails, the file is left as it is.

Standard library and boto3 only (the telemetry image has both): run it as a second
container of the router task from the telemetry image (deploy/aws/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CLA_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"


def eds_document(cluster: str, addresses: Iterable[tuple[str, int]]) -> dict[str, Any]:
    """An xDS DiscoveryResponse with one ClusterLoadAssignment holding ``addresses``."""
    hosts = sorted(set(addresses))
    return {
        "version_info": ",".join(f"{a}:{p}" for a, p in hosts),
        "resources": [{
            "@type": CLA_TYPE,
            "cluster_name": cluster,
            "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": a, "port_value": p}}}}
                for a, p in hosts
            ]}],
        }],
    }


def write_atomically(path: Path, document: Mapping[str, Any]) -> None:
    """Replace ``path`` by ``document`` so that a reader sees the old or the new file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def addresses_of(instances: Iterable[Mapping[str, Any]], default_port: int) -> set[tuple[str, int]]:
    """(IPv4, port) of each instance in a DiscoverInstances answer."""
    out = set()
    for inst in instances:
        attrs = inst.get("Attributes", {})
        ip = attrs.get("AWS_INSTANCE_IPV4")
        if ip:
            out.add((ip, int(attrs.get("AWS_INSTANCE_PORT", default_port))))
    return out


class Hold:
    """The addresses to publish: each one seen within the last ``hold_s`` seconds."""

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.last_seen: dict[tuple[str, int], float] = {}

    def update(self, seen: Iterable[tuple[str, int]], now: float) -> set[tuple[str, int]]:
        for addr in seen:
            self.last_seen[addr] = now
        self.last_seen = {a: t for a, t in self.last_seen.items() if now - t <= self.hold_s}
        return set(self.last_seen)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--namespace", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--cluster", default="telemetry")
    p.add_argument("--port", type=int, default=8080, help="if an instance names none")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--hold", type=float, default=30.0)
    args = p.parse_args(argv)

    import boto3  # imported here: the functions above are tested without it

    client = boto3.client("servicediscovery")
    hold = Hold(args.hold)
    published: set[tuple[str, int]] | None = None
    while True:
        try:
            answer = client.discover_instances(
                NamespaceName=args.namespace, ServiceName=args.service,
                HealthStatus="HEALTHY_OR_ELSE_ALL", MaxResults=1000)
            hosts = hold.update(addresses_of(answer["Instances"], args.port), time.monotonic())
            if hosts != published:
                write_atomically(args.out, eds_document(args.cluster, hosts))
                print(f"eds_sync: {len(hosts)} hosts", file=sys.stderr, flush=True)
                published = hosts
        except Exception as e:  # noqa: BLE001 - keep the last good file, try again
            print(f"eds_sync: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
