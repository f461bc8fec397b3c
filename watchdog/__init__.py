"""fwatchdog: a drop-in of-watchdog for OpenFaaS and Knative.

Invariant: nothing under this package's front modules imports torch or
transformers. The LLM side lives in ``fwatchdog.tracer`` and
``fwatchdog.template_cache`` and in the handler processes.
"""

__version__ = "0.1.0"
