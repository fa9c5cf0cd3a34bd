"""Serving a policy over openpi's websocket protocol (`python -m pixelvla_jax.serve`).

msgpack_numpy   the wire format (openpi's: msgpack, numpy arrays as tagged maps, no pickle)
requests        an observation dict -> a checked `Request` (what is wrong, said per key)
batching        requests of concurrent clients run as one padded, precompiled batch
server          the asyncio websocket server (metadata, inference, health, limits)
client          an openpi-shaped client, an action-chunk broker, and a remote policy
                for `evaluate --server`
"""
