"""Test-only, for the Ray processes tests/cluster.py starts (on their PYTHONPATH): keep a
one-machine cluster on 127.0.0.1. Ray binds its servers to the node address, but every Ray
process turns 127.0.0.1 into the host's outward address (a multi-node cluster on one machine is
not its case); this leaves the address as given."""

try:
    import ray._private.services as _services

    _services.resolve_ip_for_localhost = lambda host: host
except ImportError:
    pass
