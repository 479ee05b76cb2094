"""secure-run: run open-weights language models without trusting anything shipped with the weights.

The import namespace is ``secure_run``; each top-level folder of the repository is one subpackage
(``secure_run.manifests`` <- ``manifests/`` and so on, see DESIGN.md).

    >>> from secure_run.errors import SecureRunError
    >>> issubclass(SecureRunError, Exception)
    True
"""

__version__ = "0.1.0"
