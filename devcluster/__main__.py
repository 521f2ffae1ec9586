"""`python -m devcluster build|up|down|status|env|logs|proxy`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

from devcluster import build
from devcluster.cluster import (
    ClusterConfig,
    ClusterError,
    DevCluster,
    _alive,
    default_image_commands,
    named_state_dir,
    with_own_images,
)


def _attach(name: str) -> DevCluster:
    state_dir = named_state_dir(name)
    if not (state_dir / "state.json").exists():
        sys.exit(f"no devcluster named {name!r} is running (start one with `python -m devcluster up`)")
    return DevCluster.attach(state_dir)


def cmd_build(args: argparse.Namespace) -> int:
    build.build_all(lambda m: print(m, flush=True))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = named_state_dir(args.name)
    if (state_dir / "state.json").exists():
        running = DevCluster.attach(state_dir)
        if running.state and all(_alive(pid) for pid in running.state.pids.values()):
            print(f"devcluster {args.name} is already running", file=sys.stderr)
            print(running.env())
            return 0
        running.stop()
    cfg = ClusterConfig(name=args.name, nodes=args.nodes, gpus_per_node=args.gpus)
    if args.image:
        mine: dict[str, list[str]] = {}
        for item in args.image:
            glob, sep, command = item.partition("=")
            if not sep or not glob or not command.strip():
                print(f"--image {item!r}: expected GLOB=COMMAND, e.g. '*my-server*=/usr/bin/my-server --flag'",
                      file=sys.stderr)
                return 2
            mine[glob] = shlex.split(command)
        cfg.image_commands = with_own_images(default_image_commands(), mine)
    cluster = DevCluster(cfg, state_dir, keep_state=True)
    started = time.monotonic()
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"devcluster up failed: {exc}", file=sys.stderr)
        return 1
    print(f"# ready in {time.monotonic() - started:.1f}s", file=sys.stderr)
    print(cluster.env())
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = named_state_dir(args.name)
    if not (state_dir / "state.json").exists():
        print(f"devcluster {args.name} is not running", file=sys.stderr)
        return 0
    cluster = DevCluster.attach(state_dir)
    cluster.keep_state = False
    cluster.stop()
    print(f"devcluster {args.name} stopped", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    missing = build.missing_binaries()
    print(f"binaries: {'all built' if not missing else 'missing ' + ', '.join(missing)}")
    state_dir = named_state_dir(args.name)
    if not (state_dir / "state.json").exists():
        print(f"cluster {args.name}: not running")
        return 1
    cluster = DevCluster.attach(state_dir)
    assert cluster.state is not None
    procs = {name: ("running" if _alive(pid) else "dead") for name, pid in cluster.state.pids.items()}
    print(json.dumps({"cluster": args.name, "server": cluster.server_url, "kubeconfig": str(cluster.kubeconfig),
                      "podCIDR": cluster.state.pod_cidr, "processes": procs}, indent=2))
    return 0 if all(v == "running" for v in procs.values()) else 1


def cmd_env(args: argparse.Namespace) -> int:
    print(_attach(args.name).env())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devcluster", description=__doc__)
    parser.add_argument("--name", default="devcluster", help="cluster name (default: devcluster)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build (or find cached) etcd, kube-*, helm").set_defaults(func=cmd_build)
    up = sub.add_parser("up", help="start a cluster in the background")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per node")
    up.add_argument("--image", action="append", default=[], metavar="GLOB=COMMAND",
                    help="run pods whose image matches GLOB as local processes with COMMAND as the entrypoint "
                         "(repeatable; added to the built-in deepseek-server/deepseek-operator mappings)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the cluster and remove its state").set_defaults(func=cmd_down)
    sub.add_parser("status", help="show the cluster's processes").set_defaults(func=cmd_status)
    sub.add_parser("env", help="print `export KUBECONFIG=...`").set_defaults(func=cmd_env)
    try:
        from devcluster import cli_pods

        cli_pods.register(sub, _attach)
    except ImportError:
        pass
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
