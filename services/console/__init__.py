"""The operator console: the officers' web interface, a client of the platform's gRPC APIs acting as the
signed-in person. It holds no data of its own and writes to no store (see docs/console.md)."""
