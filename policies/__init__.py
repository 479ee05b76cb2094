"""Licence and guardrail policies: schema, licence catalogue, guardrails, evaluation, audit log."""
