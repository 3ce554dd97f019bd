"""Built-in recipes (YAML), installed as the package data of ``uadc.recipes``: ``uadc train demo``
resolves a name to the file here (uadc/config/packaged.py). Not Python code."""
