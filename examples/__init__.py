"""Demo data shipped with uadc (installed as the package data of ``uadc.examples``).

``hazelnut_toy_256/`` is Intel's "Hazelnut Toy" anomaly set (CC BY 4.0; attribution and
processing in its ``SOURCE.md``, licence text in its ``LICENSE``), used by the built-in ``demo``
recipe (``recipes/demo.yaml``: ``data.sources[0].root: ../examples/hazelnut_toy_256``)."""
