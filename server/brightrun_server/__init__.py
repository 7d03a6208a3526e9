"""BrightRun server: the gRPC control plane."""
