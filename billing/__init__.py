"""Billing: tiers, rating (pure), invoices, period close, Stripe push, webhooks."""
