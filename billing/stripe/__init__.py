"""Stripe: the API wrapper, the idempotent push, the cached Stripe state, webhooks."""
