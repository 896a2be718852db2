"""--workers / --ray-address, the same on every command that can spread its work over Ray."""

from __future__ import annotations

import argparse


def add_ray_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """`what`: the work that goes to the workers, as the help text says it ("build the sensitivity table")."""
    p.add_argument("--workers", type=int, default=1, help=f"{what} on this many Ray workers of one torch thread "
                   "each (the distributed extra: pip install -e \".[distributed]\")")
    p.add_argument("--ray-address", default=None, help="send that work to this Ray cluster (default: a local Ray "
                   "started in-process with --workers CPUs)")


def check_ray_args(args: argparse.Namespace) -> None:
    """A bad worker count or a missing Ray extra fails before any model is built."""
    from hyfx.ray_workers import check_workers, require_ray

    check_workers(args.workers)
    if args.workers > 1 or args.ray_address:
        require_ray()
