"""Usage alerts: thresholds per tier or tenant, crossings recorded once in an outbox, signed
webhook deliveries (see ``billing.alerts.model``)."""
