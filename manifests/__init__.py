"""Model-folder inventory, strict safetensors checks, hashing, OMS v1.0 signed manifests, lock file."""
