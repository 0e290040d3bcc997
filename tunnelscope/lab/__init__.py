"""Lab and control plane: lab files and port plans, the ubridge protocol, streams, extcap."""
