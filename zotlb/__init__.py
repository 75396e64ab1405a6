"""zotlb: an OCI-aware load balancer for container registries."""

__version__ = "0.1.0"
