"""The demo, the benchmark and deployment files (Docker, compose, Kubernetes, systemd)."""
