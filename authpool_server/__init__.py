"""AuthPool: leases LLM-provider credentials from a budget-aware pool over gRPC."""

__version__ = "0.1.0"
