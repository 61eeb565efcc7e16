"""Generated from protos/authpool/v1 by `make proto`; do not edit."""
