"""pf-metering: usage metering and billing for the Provability Fabric testbed."""

__version__ = "0.1.0"
