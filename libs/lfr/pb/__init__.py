"""Generated protobuf and gRPC modules for protos/lfr/*/v1."""
