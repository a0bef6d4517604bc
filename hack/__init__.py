"""Development and test tooling, not shipped with the operator: ``python -m hack.<module>`` from the
repository root; the tests import it as ``from hack import ...`` (pytest's ``pythonpath``)."""
