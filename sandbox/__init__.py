"""Sandbox policy and launch backends (docker, namespace) plus the in-sandbox worker."""
