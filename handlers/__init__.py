"""gRPC servicers: translate protobuf <-> domain and map domain errors to status codes."""
